# rlad_pl on NVIDIA GPUs: the package with its `gpu` extra (vLLM, which brings its CUDA build of PyTorch).
#   docker build -t rlad_pl .
#   docker run --gpus all --ipc=host -p 6006:6006 -v "$PWD:/workspace" rlad_pl \
#       fit --config configs/gpu_qwen3_8b_to_1p7b_trrd.yaml
# /workspace (the mounted checkout) holds configs/, models/, data/ and receives runs/.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python, plus a C toolchain and headers for the kernels Triton compiles at run time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/rlad_pl
COPY pyproject.toml README.md ./
COPY rlad_pl ./rlad_pl
COPY configs ./configs
# the project itself (dependency ranges live in pyproject.toml)
# hadolint ignore=DL3013
RUN pip install ".[gpu]"

WORKDIR /workspace
# TensorBoard: tensorboard --logdir runs --bind_all
EXPOSE 6006
ENTRYPOINT ["python", "-m", "rlad_pl"]
CMD ["--help"]
