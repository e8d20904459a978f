"""Resuming under a config that changes the state tree is refused in one line (exit 2)."""

from __future__ import annotations

import pytest

from trainkit.checkpoint.config_change import check_resume_config, state_tree_changes
from trainkit.errors import ConfigError

SAVED = {"task": "gpt", "model": {"width": 256, "layers": 4}, "optim": {"name": "adamw", "lr": 1e-3},
         "strategy": {"name": "ddp"}, "trainer": {"precision": "bf16", "max_steps": 100},
         "data": {"batch_size": 64}, "checkpoint": {"io_threads": 2}}


def changed(**edits) -> dict:
    import copy

    new = copy.deepcopy(SAVED)
    for dotted, value in edits.items():
        section, key = dotted.split("__")
        new[section][key] = value
    return new


def test_keys_that_keep_the_tree_resume():
    new = changed(optim__lr=3e-4, trainer__max_steps=500, data__batch_size=32, strategy__name="fsdp",
                  trainer__precision="fp32", checkpoint__io_threads=4)
    assert state_tree_changes(SAVED, new) == []
    check_resume_config(SAVED, new, allow=False, where="runs/a")


def test_a_tree_change_is_one_line_naming_the_keys():
    new = changed(model__width=512, optim__name="sgd", strategy__name="deepspeed", trainer__precision="fp16")
    new["model"]["heads"] = 8
    with pytest.raises(ConfigError) as info:
        check_resume_config(SAVED, new, allow=False, where="runs/a")
    msg = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in msg
    for part in ("model.width: 256 -> 512", "model.heads: <unset> -> 8", "optim.name: adamw -> sgd",
                 "strategy.name: ddp -> deepspeed", "trainer.precision: bf16 -> fp16", "allow_config_change"):
        assert part in msg
    check_resume_config(SAVED, new, allow=True, where="runs/a")
    check_resume_config(None, new, allow=False, where="runs/a")
