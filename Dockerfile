# GPU image for slab-deploy: CUDA runtime + cuDNN, torch with CUDA, onnxruntime-gpu.
# Build:  docker build -t slab-deploy .
# Run:    docker run --gpus all --rm -v $PWD:/work -w /work slab-deploy bench --device cuda --compare slab_swin_tiny --profile h200
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch built for CUDA 12.6, then onnxruntime-gpu (its CUDA 12 build) instead of the CPU onnxruntime.
RUN pip install torch --index-url https://download.pytorch.org/whl/cu126
COPY pyproject.toml README.md /src/
COPY slab_deploy /src/slab_deploy
COPY profiles /src/profiles
RUN pip install -e '/src[gpu,simplify,plot,safetensors]'
# TensorRT is optional and comes from NVIDIA's index:
#   RUN pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12

WORKDIR /work
ENTRYPOINT ["slab-deploy"]
CMD ["--help"]
