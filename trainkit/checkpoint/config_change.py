"""On resume, a config whose change would alter the saved state tree is refused, not resumed.

A checkpoint fits the run that wrote it. Most keys may change between attempts (learning
rate, batch size, io_threads, world size: DCP reshards); the ones below change what the
state tree holds or how it is sharded on disk, and resuming under them would either fail
deep inside a load or, worse, silently train a different model:

* ``task`` and every ``model.*`` key (the model's shape),
* ``optim.name`` (the optimizer state's kind),
* ``strategy.name`` when it crosses between DeepSpeed's own format and DCP (``single``,
  ``ddp`` and ``fsdp`` read each other's checkpoints),
* ``trainer.precision`` when it crosses ``fp16`` (the loss scaler joins or leaves the tree).

``checkpoint.allow_config_change=true`` resumes anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainkit.errors import ConfigError


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v
    return out


def _crosses(old: Any, new: Any, side: str) -> bool:
    return (old == side) != (new == side)


def state_tree_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for each key whose change alters the state tree, sorted."""
    a, b = _flat(saved), _flat(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        old, cur = a.get(key, "<unset>"), b.get(key, "<unset>")
        if old == cur:
            continue
        if key == "task" or key.startswith("model.") or key == "optim.name" \
                or (key == "strategy.name" and _crosses(old, cur, "deepspeed")) \
                or (key == "trainer.precision" and _crosses(old, cur, "fp16")):
            changes.append(f"{key}: {old} -> {cur}")
    return changes


def check_resume_config(saved: Mapping[str, Any] | None, new: Mapping[str, Any], *, allow: bool, where: str) -> None:
    """Raises :class:`~trainkit.errors.ConfigError` (one line, exit 2) when resuming ``where``
    under ``new`` would change the state tree ``saved`` described; ``saved`` None (no earlier
    config) passes."""
    if saved is None or allow:
        return
    changes = state_tree_changes(saved, new)
    if changes:
        raise ConfigError(f"refusing to resume {where}: the config changes the saved state tree "
                          f"({'; '.join(changes)}); use a new run_dir, or checkpoint.allow_config_change=true")
