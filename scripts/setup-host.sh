#!/usr/bin/env bash
# Idempotent host setup for labrat: Docker engine, debootstrap, gVisor (runsc) registered, engine running.
# Installs only what is missing; prints one line and exits non-zero when it cannot proceed.
set -euo pipefail

say() { printf 'labrat setup: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

engine_up() { docker info >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
command -v runsc >/dev/null || missing+=(runsc)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/tmp/labrat-apt.log 2>&1 \
    || die "cannot install ${missing[*]}: run as root (or with passwordless sudo), or install them yourself"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >>/tmp/labrat-apt.log 2>&1 \
    || die "apt-get install ${missing[*]} failed: install them yourself and re-run"
fi

# gVisor: bookworm's own runsc (2022) fails statx from bookworm's coreutils (ls, stat: EINVAL) and
# cannot run the rootfs without its overlay; bookworm-backports carries a 2024 release that can.
runsc_version() { runsc --version 2>/dev/null | awk '/runsc version/{print $3}' | sed 's/^0.0~//; s/[.].*//'; }
if [ "$(runsc_version)" \< "20240101" ] && grep -q 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
  mirror=$(awk '/^URIs:/{print $2; exit} /^deb /{print $2; exit}' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null | head -n1)
  say "installing runsc from bookworm-backports (the bookworm release is too old)"
  as_root sh -c "printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' '${mirror:-http://deb.debian.org/debian}' > /etc/apt/sources.list.d/labrat-backports.sources" \
    && as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/tmp/labrat-apt.log 2>&1 \
    && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports runsc >>/tmp/labrat-apt.log 2>&1 \
    || say "could not install runsc from bookworm-backports; gVisor tests will fail on this machine"
fi

# Register gVisor as a Docker runtime: no network inside its sandbox either, and no in-sandbox
# rootfs overlay, so files written in the container land in the writable layer `docker commit` reads.
# On a host with an NVIDIA driver, --nvproxy too: GPU containers under gVisor reach the GPU through
# its proxy driver (`labrat doctor` says whether this runsc supports the driver and GPU).
daemon_json=/etc/docker/daemon.json
runsc_path=$(command -v runsc || echo /usr/bin/runsc)
nvproxy=no
nvidia-smi -L >/dev/null 2>&1 && nvproxy=yes
changed=$(as_root python3 - "$daemon_json" "$runsc_path" "$nvproxy" <<'PY' || echo error
import json, os, sys
path, runsc, nvproxy = sys.argv[1], sys.argv[2], sys.argv[3] == "yes"
cfg = json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else {}
want = {"path": runsc, "runtimeArgs": ["--network=none", "--overlay2=none"] + (["--nvproxy"] if nvproxy else [])}
if cfg.get("runtimes", {}).get("runsc") == want:
    print("no")
else:
    cfg.setdefault("runtimes", {})["runsc"] = want
    os.makedirs(os.path.dirname(path), exist_ok=True)
    json.dump(cfg, open(path, "w"), indent=2)
    print("yes")
PY
)
[ "$changed" = error ] && say "could not register runsc in $daemon_json (not root?); gVisor will be unavailable"

if engine_up; then
  if [ "$changed" = yes ]; then
    say "runsc registered; reloading dockerd"
    as_root pkill -HUP -x dockerd || true
    sleep 1
  fi
else
  say "starting dockerd"
  if [ -d /run/systemd/system ] && as_root systemctl start docker 2>/dev/null; then :
  else
    as_root true || die "the Docker engine is not running and I am not root: start it (sudo systemctl start docker) and re-run"
    as_root setsid dockerd >/var/log/labrat-dockerd.log 2>&1 < /dev/null &
  fi
  for _ in $(seq 1 90); do engine_up && break; sleep 1; done
  engine_up || die "dockerd did not come up in 90 s; see /var/log/labrat-dockerd.log"
fi
docker info --format '{{.ServerVersion}}' >/dev/null 2>&1 \
  || die "the Docker engine is running but not reachable by $(id -un): add yourself to the 'docker' group (sudo usermod -aG docker $USER) and log in again"
say "engine ready (Docker $(docker info --format '{{.ServerVersion}}'), runtimes: $(docker info --format '{{range $k, $v := .Runtimes}}{{$k}} {{end}}'))"
