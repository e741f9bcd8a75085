# GPU image for slab-deploy on NVIDIA's TensorRT container (TensorRT, CUDA and cuDNN preinstalled).
#
# Base nvcr.io/nvidia/tensorrt:25.11-py3: TensorRT 10.14.1 on CUDA 13.0, Ubuntu 24.04, Python 3.12.
#  - CUDA 13.0 matches torch's cu130 wheels and onnxruntime-gpu's CUDA 13 build, and runs on R580
#    drivers (CUDA 13.0) without a forward-compatibility package;
#  - TensorRT 10 builds both ways: strongly typed (precision from the graph, the only way TensorRT 11
#    has) and `build --weak-fp16`.
# For TensorRT 11 pass a 26.x release (--build-arg TRT_TAG=26.08-py3 is reported to carry TensorRT 11.2;
# check NVIDIA's container release notes) on a host whose driver runs that release's CUDA.
#
# Build: docker build -t slab-deploy .
# Use:   docker run --gpus all --rm slab-deploy slab-deploy bench --device cuda --compare slab_swin_tiny
#        (add -v "$PWD/out:/home/slab/out" and -o out to keep the reports; the user is uid 10001)
ARG TRT_TAG=25.11-py3
FROM nvcr.io/nvidia/tensorrt:${TRT_TAG}

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# The venv sees the base image's TensorRT Python package (system site-packages), and is filled by the
# image's own pip run from the venv's interpreter (no ensurepip needed).
RUN python3 -m venv --without-pip --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN python -m pip install torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130
COPY pyproject.toml README.md /src/
COPY slab_deploy /src/slab_deploy
COPY profiles /src/profiles
# GPU extras; onnxruntime-gpu 1.31.1 is its CUDA 13 build. The last line fails the build when the
# image's TensorRT or the CUDA execution provider cannot be imported.
RUN python -m pip install '/src[gpu,simplify,plot,safetensors,images]' onnxruntime-gpu==1.31.1 \
    && python -c "import tensorrt, onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(); print('tensorrt', tensorrt.__version__)"

RUN groupadd --gid 10001 slab && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash slab
USER 10001:10001
WORKDIR /home/slab
CMD ["slab-deploy", "--help"]
