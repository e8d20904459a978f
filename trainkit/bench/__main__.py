"""``python -m trainkit.bench step|data|checkpoint|memory|node-loss|spot|scale|ft [options]``."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "step": "trainkit.bench.step",
    "data": "trainkit.bench.data",
    "checkpoint": "trainkit.bench.checkpoint",
    "memory": "trainkit.bench.memory",
    "node-loss": "trainkit.bench.node_loss",
    "spot": "trainkit.bench.spot",
    "scale": "trainkit.bench.scale",
    "ft": "trainkit.bench.ft",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        print(f"usage: python -m trainkit.bench {{{'|'.join(BENCHES)}}} [options]", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(BENCHES[sys.argv[1]])
    (getattr(module, "main", None) or module.run)(sys.argv[2:])


if __name__ == "__main__":
    main()
