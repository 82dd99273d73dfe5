# labrat CPU sandbox image. Built by `labrat image build` (offline: the base is a debootstrap'd Debian
# imported with `docker import`, torch comes from a local wheelhouse). Any Debian bookworm image with
# python3 (3.11) and python3-venv works as BASE_IMAGE.
ARG BASE_IMAGE=labrat-base:bookworm

# Stage 1: install torch from the wheelhouse; the wheels stay in this stage, not in the image.
FROM ${BASE_IMAGE} AS torch
COPY wheelhouse /wheelhouse
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse torch==2.13.0 numpy \
 && /opt/venv/bin/python -c "import torch; print('torch', torch.__version__)"

FROM ${BASE_IMAGE}
COPY --from=torch /opt/venv /opt/venv
# The agent's user writes only /workspace, its home and the /tmp tmpfs: every other world-writable
# directory is closed, so the workspace and home hold all state a snapshot must keep.
RUN useradd --create-home --home-dir /home/agent --uid 1000 --user-group --shell /bin/bash agent \
 && mkdir -p /workspace && chown agent:agent /workspace \
 && find / -xdev -type d -perm -0002 ! -path /tmp -exec chmod o-w {} + \
 && rm -rf /var/tmp && ln -s /tmp /var/tmp
# Compiled kernels (torch.compile on CPU too) are shared objects that must be mapped executable: the
# sandbox's /tmp is noexec, so inductor's and Triton's caches live in the agent's home, as in Dockerfile.gpu.
# glibc malloc keeps freed tensor memory instead of returning it with munmap: each mmap/munmap is a
# syscall, and under gVisor a costly one (cpu-tiny training: 0.78x bare without this, ~0.95x with it).
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/home/agent \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TORCHINDUCTOR_CACHE_DIR=/home/agent/.cache/torchinductor \
    TRITON_CACHE_DIR=/home/agent/.cache/triton \
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=4294967296 \
    MALLOC_TOP_PAD_=268435456
# The training core belongs to root: the agent edits train.py and nothing else of it. (The metric never
# depends on this: the harness evaluates with its own pristine copy of the rest of trainer/.)
COPY trainer /workspace/trainer
RUN chown agent:agent /workspace/trainer/train.py
WORKDIR /workspace
LABEL org.opencontainers.image.title="labrat sandbox (CPU)"
CMD ["sleep", "infinity"]
