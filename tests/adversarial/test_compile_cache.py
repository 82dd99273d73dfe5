"""The opt-in compile cache (labrat.toml's compile_cache_mb), through the agent's own tools in real containers.

A training run finds the lab's cache in its workspace, with inductor and Triton pointed at it, and offers
its own cache back when it ends; the harness keeps it only within the bound. It never reaches an
evaluation, and with the default (off) nothing passes from one run to the next. The cache *is* a channel
between training runs, up to its bound: that is why it is off by default (docs/security.md).
"""

from __future__ import annotations

import tarfile

import pytest

from harness.lab import lab_compile_cache
from harness.run import LabRun
from sandbox.sandbox import wait_for_removals
from sandbox.snapshots import SnapshotStore
from tests.adversarial.conftest import Attacker, attack_config

MAIN = 'if __name__ == "__main__":'
CACHE_MB = 1
# Counts the runs that came before in the cache, prints what it found, and can write past the bound. Its
# model refuses to load where the cache exists outside training: an evaluation that saw it would crash.
PROBE = '''
import os as _os

BLOAT_BYTES = 0


def _cache_probe():
    cache = _os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/workspace/.labrat-cache/torchinductor")
    _os.makedirs(cache, exist_ok=True)
    runs_file = _os.path.join(cache, "runs")
    runs = int(open(runs_file).read()) + 1 if _os.path.exists(runs_file) else 1
    open(runs_file, "w").write(str(runs))
    # env: whether the harness pointed inductor at the lab's cache (the image points it into the home otherwise)
    print(f"probe: env={cache.startswith('/workspace/.labrat-cache/')} runs={runs}", flush=True)
    if BLOAT_BYTES:
        triton = _os.environ.get("TRITON_CACHE_DIR", cache)
        _os.makedirs(triton, exist_ok=True)
        open(_os.path.join(triton, "bloat"), "wb").write(b"w" * BLOAT_BYTES)


_honest_build_model = build_model


def build_model(config):
    if _os.path.exists("/workspace/.labrat-cache") and "LABRAT_DEADLINE" not in _os.environ:
        raise RuntimeError("the compile cache reached the evaluation")
    return _honest_build_model(config)


SAVE_RESERVE_SECONDS = 1e9  # nothing to learn here: save at once
'''


def plant_probe(attack: Attacker, bloat: int = 0) -> None:
    """The probe in train.py (the working copy is the last kept one: it may have it already), writing `bloat`."""
    source = attack.box.read_text("trainer/train.py")
    if "_cache_probe" not in source:
        attack.patch_train(MAIN, f"{PROBE}\n\n{MAIN}\n    _cache_probe()")
        source = attack.box.read_text("trainer/train.py")
    current = next(line for line in source.splitlines() if line.startswith("BLOAT_BYTES = "))
    if current != f"BLOAT_BYTES = {bloat}":
        attack.patch_train(current, f"BLOAT_BYTES = {bloat}")


def cached_runs(lab) -> int:
    with tarfile.open(lab_compile_cache(lab)) as tar:
        return int(tar.extractfile("torchinductor/runs").read())


def probe_line(experiment) -> str:
    return next(line for line in experiment.log_tail.splitlines() if line.startswith("probe: "))


@pytest.fixture(scope="module")
def cached_lab(tmp_path_factory):
    lab = tmp_path_factory.mktemp("compile-cache")
    with LabRun(lab, attack_config("runc").model_copy(update={"compile_cache_mb": CACHE_MB}), agent="attacker") as run:
        yield lab, Attacker(run, "runc")
    wait_for_removals()
    SnapshotStore().gc(keep=[], name_prefix=run.lab_id)


def test_a_run_finds_the_cache_the_last_one_left_and_the_evaluation_never_does(cached_lab):
    lab, attack = cached_lab
    plant_probe(attack)
    first = attack.run_experiment("cold")
    assert first.status in ("keep", "discard"), first.log_tail  # evaluated: its workers never saw the cache
    assert first.compile_cache == "cold" and probe_line(first) == "probe: env=True runs=1"
    plant_probe(attack)
    second = attack.run_experiment("warm")
    assert second.status in ("keep", "discard"), second.log_tail
    assert second.compile_cache == "warm" and probe_line(second) == "probe: env=True runs=2"
    attack.run.executor.wait_for_compile_cache()
    assert cached_runs(lab) == 2


def test_a_cache_over_its_bound_is_not_kept_and_a_corrupt_one_is_dropped(cached_lab):
    lab, attack = cached_lab
    before = cached_runs(lab) if lab_compile_cache(lab).exists() else 0
    plant_probe(attack, bloat=CACHE_MB * 1024 * 1024)  # with the run counter, just over the bound
    bloated = attack.run_experiment("a cache over its bound")
    assert probe_line(bloated) == f"probe: env=True runs={before + 1}", bloated.log_tail
    attack.run.executor.wait_for_compile_cache()
    assert cached_runs(lab) == before  # the old cache stayed; the bloated offer was refused
    with tarfile.open(lab_compile_cache(lab)) as tar:
        assert "triton/bloat" not in tar.getnames()
    lab_compile_cache(lab).write_bytes(b"not a tar archive" * 64)
    plant_probe(attack)
    fresh = attack.run_experiment("after a corrupt cache")
    assert fresh.compile_cache == "cold" and probe_line(fresh) == "probe: env=True runs=1", fresh.log_tail
    attack.run.executor.wait_for_compile_cache()
    assert cached_runs(lab) == 1


def test_with_the_default_nothing_passes_between_training_runs(tmp_path):
    config = attack_config("runc")
    assert config.compile_cache_mb == 0
    with LabRun(tmp_path, config, agent="attacker") as run:
        attack = Attacker(run, "runc")
        for _ in range(2):
            plant_probe(attack)
            trained = attack.run_experiment("no cache")
            assert trained.compile_cache == "off" and probe_line(trained) == "probe: env=False runs=1", trained.log_tail
    wait_for_removals()
    SnapshotStore().gc(keep=[], name_prefix=run.lab_id)
    assert not lab_compile_cache(tmp_path).exists()
