"""DeepSpeed ZeRO stage 1/2/3 through DeepSpeed's own engine.

DeepSpeed owns accumulation, clipping and loss scaling once it is configured, so this
strategy translates trainkit's config into a DeepSpeed config and forwards each call.
The user's torch optimizer is kept (``zero_allow_untested_optimizer``) so DeepSpeed never
JIT-builds its fused optimizers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from trainkit.strategies.base import OptimizerArg, Strategy, StrategyOptions, default_units

if TYPE_CHECKING:
    from trainkit.checkpoint.protocol import CheckpointerProtocol


@dataclass
class DeepSpeedOptions(StrategyOptions):
    name: str = "deepspeed"
    zero_stage: Literal[1, 2, 3] = 2


class DeepSpeedStrategy(Strategy):
    Options = DeepSpeedOptions
    options: DeepSpeedOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # fp16 loss scaling is DeepSpeed's job here; never stack a torch GradScaler on it.
        self.scaler = None
        self.base_optimizer: torch.optim.Optimizer | None = None

    def ds_config(self) -> dict[str, Any]:
        s = self.settings
        world = self.dist.world_size
        return {
            "train_batch_size": s.global_batch,
            "train_micro_batch_size_per_gpu": s.global_batch // (world * s.grad_accum),
            "gradient_accumulation_steps": s.grad_accum,
            "gradient_clipping": s.grad_clip,
            "zero_optimization": {"stage": self.options.zero_stage},
            "bf16": {"enabled": s.precision == "bf16"},
            "fp16": {"enabled": s.precision == "fp16", "initial_scale_power": 16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def setup(self, model: nn.Module, optimizer: OptimizerArg, units: list[nn.Module] | None = None
              ) -> tuple[nn.Module, torch.optim.Optimizer]:
        import deepspeed

        os.environ.setdefault(
            "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/trainkit/torch_extensions")
        )
        model = model.to(self.dist.device)
        if self.settings.activation_checkpointing:
            from trainkit.strategies.base import checkpoint_activations

            checkpoint_activations(default_units(model) if units is None else units)
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(list(model.parameters()))
        self.base_optimizer = optimizer
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config()
        )
        if self.settings.compile:
            engine.compile()
        self.model = engine
        return engine, ds_optimizer

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        self.model.backward(loss)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> float | None:
        self.model.step()
        if self.settings.grad_clip > 0:
            norm = self.model.get_global_grad_norm()
            return None if norm is None else float(norm)
        return None

    def micro_step(self) -> None:
        """DeepSpeed counts micro-steps itself: it must see every one."""
        self.model.step()

    def torch_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        assert self.base_optimizer is not None
        return self.base_optimizer

    def checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        # The engine saves model, optimizer and loss scaler itself; see DeepSpeedCheckpointer.
        return {}

    def before_save(self, model: nn.Module) -> None:
        """DeepSpeed saves the module from rank 0 only: nothing to reconcile."""

    def export(self, model: nn.Module, url: str) -> None:
        """Gathers ZeRO-3's partitioned parameters (a no-op for stages 1-2), rank 0 writes."""
        import deepspeed
        from safetensors.torch import save as st_save

        from trainkit import storage

        module = model.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if self.dist.rank == 0:
                state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
                blob = st_save(state)
                fs, path = storage.filesystem(url)
                storage.retry(lambda: fs.pipe(path, blob), what=url)

    def checkpointer(self, root: str, **options: Any) -> CheckpointerProtocol:
        """A :class:`~trainkit.checkpoint.DeepSpeedCheckpointer` of this engine; an option it
        does not know is a TypeError, not ignored."""
        from trainkit.checkpoint import DeepSpeedCheckpointer

        return DeepSpeedCheckpointer(root, self.model, **options)
