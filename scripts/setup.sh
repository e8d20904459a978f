#!/usr/bin/env bash
# Creates .venv with trainkit and every extra (tests included) on a CPU-only machine.
# torch is pinned to the CPU wheel here only: other packages' looser ranges would otherwise
# pull a multi-GB CUDA build. On a GPU machine, `pip install -e ".[all]"` is enough.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A rerun with the same inputs is a no-op: the stamp records what the last complete set-up installed.
STAMP=.venv/.trainkit-setup
inputs() { cat pyproject.toml .ci/constraints-*.txt scripts/setup.sh; "$PY" --version; }
want=$(inputs | sha256sum | cut -d' ' -f1)
installed() { [ -x .venv/bin/python ] && [ -x .tools/skypilot/bin/python ] && [ -x .tools/azurite/node_modules/.bin/azurite-blob ]; }  # every tool installed below
if installed && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
    echo "setup: .venv is up to date (remove $STAMP to reinstall)"
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_CONSTRAINT="$PWD/.ci/constraints-cpu.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[all,test,docs]"
# SkyPilot in its own environment: the tool tests/clusters/test_skypilot.py validates
# launchers/skypilot-*.yaml with, offline. It pins click<8.2, which huggingface_hub cannot share.
[ -x .tools/skypilot/bin/python ] || "$PY" -m venv .tools/skypilot
PIP_CONSTRAINT="$PWD/.ci/constraints-skypilot.txt" .tools/skypilot/bin/python -m pip install -q skypilot==0.14.1
# Azurite, the Azure Blob emulator the tests start on loopback (npm; node and npm must be on PATH).
[ -x .tools/azurite/node_modules/.bin/azurite-blob ] || npm install --silent --no-audit --no-fund --prefix .tools/azurite azurite@3.35.0
# mosaicml-streaming, whose MDSWriter the tests write MDS datasets with: without its dependencies
# (they would replace torch and numpy), plus the small packages the writer imports (catalogue:
# its StreamingDataset, which python -m trainkit.bench data reads with).
.venv/bin/python -m pip install -q --no-deps mosaicml-streaming==0.13.0 Brotli python-snappy cramjam zstd xxhash catalogue
# DeepSpeed's CPU shared-memory op (strategy=deepspeed on CPU), built here once (~45 s) rather
# than by the first run; the build is tied to this checkout's path, so a moved tree rebuilds it.
TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/trainkit/torch_extensions} .venv/bin/python -c \
    "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" >/dev/null
echo "$want" > "$STAMP"
