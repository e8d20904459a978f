"""DeepSpeed ZeRO stage 1/2/3 through DeepSpeed's own engine.

DeepSpeed owns accumulation, clipping and loss scaling once it is configured, so this
strategy translates trainkit's config into a DeepSpeed config and forwards each call.
The user's torch optimizer is kept (``zero_allow_untested_optimizer``) so DeepSpeed never
JIT-builds its fused optimizers.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from trainkit.strategies.base import OptimizerArg, Strategy, default_units


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # fp16 loss scaling is DeepSpeed's job here; never stack a torch GradScaler on it.
        self.scaler = None
        self.base_optimizer: torch.optim.Optimizer | None = None

    def ds_config(self) -> dict[str, Any]:
        cfg = self.cfg
        world = self.dist.world_size
        return {
            "train_batch_size": cfg.data.batch_size,
            "train_micro_batch_size_per_gpu": cfg.data.batch_size // (world * cfg.trainer.grad_accum),
            "gradient_accumulation_steps": cfg.trainer.grad_accum,
            "gradient_clipping": cfg.trainer.grad_clip,
            "zero_optimization": {"stage": cfg.strategy.zero_stage},
            "bf16": {"enabled": cfg.trainer.precision == "bf16"},
            "fp16": {"enabled": cfg.trainer.precision == "fp16", "initial_scale_power": 16},
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
        if self.cfg.trainer.activation_checkpointing:
            from trainkit.strategies.base import checkpoint_activations

            checkpoint_activations(default_units(model) if units is None else units)
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(list(model.parameters()))
        self.base_optimizer = optimizer
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config()
        )
        if self.cfg.trainer.compile:
            engine.compile()
        self.model = engine
        return engine, ds_optimizer

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        self.model.backward(loss)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> float | None:
        self.model.step()
        if self.cfg.trainer.grad_clip > 0:
            norm = self.model.get_global_grad_norm()
            return None if norm is None else float(norm)
        return None

    def micro_step(self) -> None:
        """DeepSpeed counts micro-steps itself: it must see every one."""
        self.model.step()

    def scheduler_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        assert self.base_optimizer is not None
        return self.base_optimizer

    def checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        # The engine saves model, optimizer and loss scaler itself; see EngineCheckpointer.
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

    def checkpointer(self, root: str, **options: Any) -> Any:
        from trainkit.checkpoint import DeepSpeedCheckpointer

        async_save = options.pop("async_save", True)
        options.pop("overlap_staging", None)  # DeepSpeed writes its files itself, synchronously
        options.pop("io_threads", None)
        return EngineCheckpointer(DeepSpeedCheckpointer(root, async_upload=async_save, **options), self.model)


class EngineCheckpointer:
    """The Checkpointer interface over DeepSpeed's engine checkpoints plus the rest of the tree."""

    def __init__(self, inner: Any, engine: Any) -> None:
        self.inner = inner
        self.engine = engine

    def save(self, step: int, state: dict[str, Any], *, blocking: bool = False) -> None:
        self.inner.save(step, self.engine, state, blocking=blocking)

    def load(self, state: dict[str, Any], step: int | None = None) -> int | None:
        return self.inner.load(self.engine, state, step)

    def wait(self) -> None:
        self.inner.wait()

    def staged(self) -> float:
        """DeepSpeed's local write is done when ``save`` returns: nothing to wait for."""
        return 0.0

    def latest_step(self) -> int | None:
        return self.inner.latest_step()

    @property
    def commits(self) -> list[int]:
        return self.inner.commits

    def close(self) -> None:
        self.inner.close()
