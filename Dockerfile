# The image of conf/cluster/rayjob.yaml (KubeRay) and conf/cluster/ray-cluster.yaml (Ray's cluster
# launcher, docker: block): bptt with its pinned dependencies and the CUDA build of torch 2.13.0.
#   docker build -t YOUR-REGISTRY/bptt:latest .
#   docker push YOUR-REGISTRY/bptt:latest
# TORCH_INDEX must be a CUDA build that the base image's CUDA (and the nodes' driver) runs: the
# wheel brings its own CUDA libraries; the base image supplies the rest of the user space.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 from Ubuntu 22.04 (bptt needs >= 3.11); libsndfile for soundfile
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libsndfile1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv $VIRTUAL_ENV \
    && pip install --upgrade pip

# torch first, from the PyTorch index: the CUDA build of the version pyproject.toml pins
RUN pip install "torch==2.13.0" --index-url ${TORCH_INDEX}

WORKDIR /app
# dependencies before the code, so that a code change rebuilds only the last layers
COPY pyproject.toml README.md ./
COPY bptt/__init__.py bptt/__init__.py
RUN pip install "ray[default,tune,train]==2.60.0" \
    && pip install . && pip uninstall -y bptt

COPY . .
# editable: the RayJob's entrypoint runs in /app, and `bptt sweep --config conf/sweep/...` finds its files there
RUN pip install --no-deps -e . && bptt --help > /dev/null
