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
installed() { [ -x .venv/bin/python ] && [ -x .tools/skypilot/bin/python ]; }  # every tool installed below
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
echo "$want" > "$STAMP"
