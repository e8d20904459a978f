#!/usr/bin/env bash
# The GPU check: one command on a lent H100/H200 (<= 6 minutes) that measures bf16 throughput
# and MFU, single vs fsdp, torch.compile on/off, checkpoint blocking and MB/s from GPU memory,
# the sync-debug test and the step overhead vs a hand-written loop, and writes them with the
# machine, the commit and the exact commands to docs/benchmarks/gpu-check-<date>.md.
#
#   scripts/gpu-check.sh                              # on the GPU machine, from a bare checkout
#   scripts/gpu-check.sh --dry-run --out-dir DIR      # a CPU: tiny versions of what runs there
#
# Without a GPU (and without --dry-run) it prints one line and exits 0, which is what CI runs.
# Python: $PYTHON, else ./.venv/bin/python, else python3; the first whose torch sees CUDA.
# trainkit runs from this checkout (PYTHONPATH). Missing dependencies are installed with pip,
# from the index when it can be reached, else from wheels in ./.whl (for a machine without
# network: `pip download hydra-core omegaconf antlr4-python3-runtime -d .whl` beforehand).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done

if [ "$dry" = 0 ] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }; then
    echo "gpu-check: skipped: no NVIDIA GPU on this machine"
    exit 0
fi

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
py=""
for c in ${PYTHON:-} ./.venv/bin/python python3; do
    command -v "$c" >/dev/null 2>&1 || continue
    if [ "$dry" = 1 ] || has_cuda "$c"; then py=$c; break; fi
done
if [ -z "$py" ]; then
    echo "gpu-check: no Python with a CUDA torch; installing one into .venv-gpu" >&2
    python3 -m venv .venv-gpu && .venv-gpu/bin/python -m pip install -q torch >&2 && has_cuda .venv-gpu/bin/python \
        && py=.venv-gpu/bin/python
    if [ -z "$py" ]; then
        echo "gpu-check: cannot install a CUDA torch wheel here (no network?); set PYTHON to a Python with one" >&2
        exit 3
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# trainkit's own dependencies (torch aside) and what the recipes and tests use.
missing=$("$py" - <<'PY'
import importlib.util
need = {"hydra": "hydra-core", "omegaconf": "omegaconf", "fsspec": "fsspec", "safetensors": "safetensors",
        "tqdm": "tqdm", "psutil": "psutil", "numpy": "numpy", "sklearn": "scikit-learn", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu-check: installing $missing" >&2
    "$py" -m pip install -q $missing >&2 2>/dev/null \
        || { [ -d .whl ] && "$py" -m pip install -q --no-index --find-links .whl $missing >&2; } \
        || { echo "gpu-check: cannot install $missing (no network and no ./.whl wheels)" >&2; exit 3; }
fi
exec "$py" scripts/gpu_check.py "$@"
