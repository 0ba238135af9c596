# syntax=docker/dockerfile:1.7
# mini-vLLM worker, three main stages (+ `model`, which only stages a baked model):
#   essentials  CUDA runtime, Python, the CUDA build of torch, our dependencies   rarely rebuilt
#   cuda        FlashAttention-3 (hopper/, sm_90a, hdim 64, bf16) + csrc/ ext     rebuilt on kernel changes
#   model       MODEL_NAME downloaded by builder/download_model.py (if given)     rebuilt when the model changes
#   server      our code on top of the kernels and the model                      fast rebuild
#
#   docker buildx bake                          # both images of docker-bake.hcl
#   docker build -t minivllm-worker .           # the base worker (downloads MODEL_NAME at start-up)
#   HF_TOKEN=hf_... docker build --build-arg MODEL_NAME=openai/gpt-oss-20b --build-arg BASE_PATH=/models \
#       --build-arg RUN_AS=worker --secret id=HF_TOKEN,env=HF_TOKEN -t minivllm-worker:gpt-oss-20b .
#
# CUDA 12.8 runs on hosts with driver >= 570; for CUDA 13 (driver >= 580) build with
# CUDA_VERSION=13.0.2 and TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130.

ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=ubuntu24.04

# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU_VERSION} AS essentials

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc + python3.12-dev stay in the runtime image: Triton compiles its small launcher module with
# the host C compiler the first time a kernel runs. Ubuntu package versions are left to the
# pinned base image (pinning them breaks the build on every Ubuntu security update).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv \
    && pip install --upgrade "pip>=25.1" "setuptools>=77" "wheel>=0.45"

# The CUDA wheel of torch (brings triton); pyproject.toml's range (torch>=2.6) keeps it.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Our dependencies from pyproject.toml alone, so code changes do not reinstall them.
COPY pyproject.toml /tmp/minivllm/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/minivllm/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/minivllm/requirements.txt \
    && pip install -r /tmp/minivllm/requirements.txt \
    && python -c "import torch; assert torch.version.cuda, 'torch lost its CUDA build'" \
    && rm -rf /tmp/minivllm

# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU_VERSION} AS cuda

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TORCH_CUDA_ARCH_LIST=9.0a

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# The same interpreter and packages as the runtime, so the wheels built here match it exactly.
COPY --from=essentials /opt/venv /opt/venv
RUN pip install "ninja>=1.11.1" "packaging>=24"

ARG MAX_JOBS=4
ARG NVCC_THREADS=2
ENV MAX_JOBS=${MAX_JOBS} \
    NVCC_THREADS=${NVCC_THREADS}

# FlashAttention-3 from flash-attention's hopper/ sources at a pinned commit: sm_90a, forward only,
# bf16, head dim 64 (GPT-OSS), with paged KV, varlen, split-KV, local (sliding window) and PackGQA
# kept; everything else off to keep the build short.
ARG FLASH_ATTN_REPO=https://github.com/Dao-AILab/flash-attention.git
ARG FLASH_ATTN_COMMIT=0251105a2fb19d2957484b7f023cd8c115286ced
ENV FLASH_ATTENTION_FORCE_BUILD=TRUE \
    FLASH_ATTENTION_DISABLE_BACKWARD=TRUE \
    FLASH_ATTENTION_DISABLE_SM80=TRUE \
    FLASH_ATTENTION_DISABLE_FP16=TRUE \
    FLASH_ATTENTION_DISABLE_FP8=TRUE \
    FLASH_ATTENTION_DISABLE_HDIM96=TRUE \
    FLASH_ATTENTION_DISABLE_HDIM128=TRUE \
    FLASH_ATTENTION_DISABLE_HDIM192=TRUE \
    FLASH_ATTENTION_DISABLE_HDIM256=TRUE \
    FLASH_ATTENTION_DISABLE_HDIMDIFF64=TRUE \
    FLASH_ATTENTION_DISABLE_HDIMDIFF192=TRUE \
    FLASH_ATTENTION_DISABLE_SOFTCAP=TRUE \
    FLASH_ATTENTION_DISABLE_APPENDKV=TRUE
WORKDIR /build/flash-attention
RUN git init -q . \
    && git remote add origin "${FLASH_ATTN_REPO}" \
    && git fetch -q --depth 1 origin "${FLASH_ATTN_COMMIT}" \
    && git checkout -q FETCH_HEAD \
    && git submodule update -q --init --depth 1 csrc/cutlass
WORKDIR /build/flash-attention/hopper
RUN pip wheel --no-build-isolation --no-deps -w /wheels . \
    && python -c "import glob, zipfile; names = zipfile.ZipFile(glob.glob('/wheels/flash_attn_3-*.whl')[0]).namelist(); assert 'flash_attn_interface.py' in names, names"

# Our csrc/ extension as the prebuilt module `minivllm_csrc` (csrc changes do not rebuild FA3).
WORKDIR /build
COPY builder/build_csrc.py /build/build_csrc.py
COPY csrc /build/csrc
RUN python /build/build_csrc.py --csrc /build/csrc --arch "${TORCH_CUDA_ARCH_LIST}" --out /wheels

# ---------------------------------------------------------------------------------------------
# The baked model, in a stage of its own that sees only the download script and the model args,
# so code changes never download it again. Without MODEL_NAME it stages nothing.
FROM essentials AS model

ARG BASE_PATH=/runpod-volume
ARG MODEL_NAME=""
# MODEL_REVISION and TOKENIZER_NAME reach the script as environment variables, as ARGs do in RUN.
ARG MODEL_REVISION=""
# hadolint ignore=DL3064
ARG TOKENIZER_NAME=""
COPY builder/download_model.py /tmp/download_model.py
# The token is a BuildKit secret that the script reads from /run/secrets/HF_TOKEN: never a build
# arg, never in a layer. HF_HOME points at scratch so no hub cache or Xet chunk cache is staged.
RUN --mount=type=secret,id=HF_TOKEN,required=false \
    mkdir -p /baked \
    && if [ -n "${MODEL_NAME}" ]; then \
        HF_HOME=/tmp/hf-home python /tmp/download_model.py "${MODEL_NAME}" --base-path "${BASE_PATH}" \
            --destdir /baked --output /local_model_args.json; \
    fi

# ---------------------------------------------------------------------------------------------
FROM essentials AS server

# The kernels from the cuda stage (bind-mounted: the wheels themselves stay out of the image).
RUN --mount=type=bind,from=cuda,source=/wheels,target=/tmp/wheels \
    pip install --no-deps /tmp/wheels/*.whl

# Non-root user for images that never write outside their own folders (baked models).
# RunPod mounts network volumes owned by root, so the base image, which downloads into the
# volume, runs as root by default (RUN_AS=root); docker-bake.hcl builds baked images as `worker`.
RUN useradd -l --create-home --uid 10001 --user-group worker \
    && mkdir -p /opt/minivllm/cache /runpod-volume \
    && chown worker:worker /opt/minivllm/cache /runpod-volume

# BASE_PATH=/runpod-volume: downloads land on the network volume when one is attached. A baked
# image uses another BASE_PATH (e.g. /models): the volume's mount would hide files baked there.
ARG BASE_PATH=/runpod-volume
ARG MODEL_NAME=""
# The model under BASE_PATH and /local_model_args.json (MODEL_NAME = its snapshot folder,
# SERVED_MODEL_NAME = the repo id), before our code so code changes leave this layer alone.
COPY --from=model /baked/ /

# Our package, without the [cpu] extra: the image's CUDA torch satisfies `torch>=2.6`.
# The source is bind-mounted read-write so build leftovers (build/, *.egg-info) are discarded.
# kernels/ (no __init__.py) lands as minivllm/kernels/*.py: import a module, not just the package.
RUN --mount=type=bind,source=.,target=/tmp/minivllm-src,rw \
    pip install /tmp/minivllm-src \
    && python -c "import torch, minivllm.kernels.moe_gemm, minivllm.kernels.attention_decode; assert torch.version.cuda"
COPY src/handler.py /src/handler.py
COPY builder /builder

ENV BASE_PATH=${BASE_PATH} \
    HF_HOME=${BASE_PATH}/huggingface-cache \
    MINIVLLM_CACHE=/opt/minivllm/cache \
    TRITON_CACHE_DIR=/opt/minivllm/cache/triton \
    LOCAL_MODEL_ARGS_PATH=/local_model_args.json
RUN python /builder/warmup.py \
    && chown -R worker:worker /opt/minivllm/cache

# A baked image never needs the hub at run time: HF_HUB_OFFLINE=1 exactly when MODEL_NAME was set.
ENV HF_HUB_OFFLINE=${MODEL_NAME:+1}

ARG RUN_AS=root
USER ${RUN_AS}
WORKDIR /src
CMD ["python", "-u", "/src/handler.py"]
