"""What every strategy does for the user's loop; subclasses differ only in wrapping.

A strategy owns the parts of a training step that change with the parallelism: how the
model and optimizer are wrapped, how ``backward`` behaves on accumulation micro-steps,
and how gradients are clipped and applied. The loop itself stays the user's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from trainkit.distributed import DistInfo
from trainkit.errors import ConfigError
from trainkit.options import Options

if TYPE_CHECKING:
    from trainkit.checkpoint.protocol import CheckpointerProtocol
    from trainkit.config import Config

OptimizerArg = torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_units(model: nn.Module) -> list[nn.Module]:
    """Repeated blocks (members of any ``nn.ModuleList``): the natural unit to shard or recompute."""
    units: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            units.extend(module)
    return units


def checkpoint_activations(units: list[nn.Module]) -> None:
    """Recomputes each unit's activations in backward; patches ``forward`` so state-dict keys stay."""
    from torch.utils.checkpoint import checkpoint

    for unit in units:
        inner = unit.forward

        @functools.wraps(inner)
        def forward(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        unit.forward = forward


def is_meta(model: nn.Module) -> bool:
    """Built under ``torch.device("meta")`` (or ``accelerate.init_empty_weights``): shapes, no storage."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def initialise(model: nn.Module, device: torch.device) -> None:
    """Gives a meta-built (and possibly already sharded) model storage on ``device`` and its
    initial values: the model's own ``init_weights()`` when it has one, else every
    submodule's ``reset_parameters()``. On sharded parameters each rank allocates only its
    shard; whether the values equal an eager build's depends on the init (see
    :func:`copy_full_`)."""
    # accelerate.init_empty_weights leaves buffers real: their values survive to_empty.
    kept = {name: b.to(device) for name, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    init = getattr(model, "init_weights", None)
    with torch.no_grad():
        if callable(init):
            init()
        else:
            for module in model.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        buffers = dict(model.named_buffers())
        for name, value in kept.items():
            buffers[name].copy_(value)


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copies the part of ``full`` (the whole tensor's values, the same on every rank) that
    this rank holds into ``param``, a plain tensor or a sharded DTensor. An init that draws
    each whole tensor from its own generator and hands it here gives a sharded model exactly
    the weights an eager build gets, at the cost of one whole tensor at a time."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            part = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(part.to_local())
        else:
            param.copy_(full)


def rebuild_optimizer(optimizer: OptimizerArg, old: list[nn.Parameter], new: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Recreates ``optimizer`` over ``new`` params that replaced ``old`` ones one-for-one.

    FSDP2 swaps every parameter for a sharded DTensor, so an optimizer made before sharding
    points at dead tensors. Groups and hyper-parameters carry over by parameter position.
    """
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer(new)
    if optimizer.state:
        raise ValueError("the optimizer already has state; hand it to setup() before the first step")
    position = {id(p): i for i, p in enumerate(old)}
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({"params": [new[position[id(p)]] for p in group["params"]], **hyper})
    return type(optimizer)(groups, **optimizer.defaults)


@dataclass
class StrategyOptions(Options):
    """Options every strategy has; a strategy extends this with its own (``Strategy.Options``).

    ``name: auto`` is resolved by the config before a strategy is built: ``single`` for one
    process, ``ddp`` for more.
    """

    name: str = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def check(self, cfg: Config) -> None:
        from trainkit.distributed import expected_world_size

        if self.name == "single" and expected_world_size(cfg.launcher.world_size) > 1:
            raise ConfigError(
                f"strategy=single runs one process but launcher.workers={cfg.launcher.workers}"
                f"{f' x nodes={cfg.launcher.nodes}' if cfg.launcher.nodes > 1 else ''}; "
                "pick strategy=auto, ddp, fsdp or deepspeed"
            )


@dataclass(frozen=True)
class StepSettings:
    """The parts of the trainer's config that change how a strategy runs a step."""

    precision: str = "fp32"
    grad_accum: int = 1
    grad_clip: float = 0.0
    activation_checkpointing: bool = False
    compile: bool = False
    # Samples per optimizer step over all ranks (DeepSpeed checks its own batch arithmetic).
    global_batch: int = 1

    @classmethod
    def of(cls, cfg: Config) -> StepSettings:
        t = cfg.trainer
        return cls(t.precision, t.grad_accum, t.grad_clip, t.activation_checkpointing, t.compile,
                   cfg.data.batch_size)


class Strategy:
    """Single-process training; the base the torch-native strategies extend.

    A strategy gets its own options, the distributed context and the step settings, never
    the whole config: what it may depend on is visible in its constructor.
    """

    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: ``wrap`` shards a meta-device model as it is, so only each rank's shard is then
    #: allocated; otherwise a meta model is materialised whole before ``wrap``.
    shards_meta: ClassVar[bool] = False

    def __init__(self, options: StrategyOptions, dist: DistInfo, settings: StepSettings) -> None:
        self.options = options
        self.dist = dist
        self.settings = settings
        self.precision = settings.precision
        self.grad_accum = settings.grad_accum
        self.scaler = torch.amp.GradScaler(dist.device.type) if self.precision == "fp16" else None
        self.model: nn.Module | None = None

    @property
    def name(self) -> str:
        return self.options.name

    # -- setup ---------------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: OptimizerArg, units: list[nn.Module] | None = None
              ) -> tuple[nn.Module, torch.optim.Optimizer]:
        meta = is_meta(model)
        if meta and not self.shards_meta:
            initialise(model, self.dist.device)
        if not (meta and self.shards_meta):
            model = model.to(self.dist.device)
        units = default_units(model) if units is None else units
        if self.settings.activation_checkpointing:
            checkpoint_activations(units)
        old = list(model.parameters())
        model = self.wrap(model, units)
        if meta and self.shards_meta:
            initialise(model, self.dist.device)
        if self.settings.compile:
            model.compile()
        new = list(model.parameters())
        if isinstance(optimizer, torch.optim.Optimizer) and all(a is b for a, b in zip(old, new)):
            opt = optimizer
        else:
            opt = rebuild_optimizer(optimizer, old, new)
        self.model = model
        return model, opt

    def wrap(self, model: nn.Module, units: list[nn.Module]) -> nn.Module:
        return model

    # -- step ----------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=DTYPES[self.precision])

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skips gradient communication on accumulation micro-steps that do not step."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        loss = loss / self.grad_accum
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        with self.no_sync(sync):
            loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | float | None:
        """Unscales, clips and applies gradients; returns the pre-clip global norm when clipping,
        as a device tensor: reading it would make the host wait for the step."""
        norm = None
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.settings.grad_clip > 0:
            assert self.model is not None
            total = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            norm = total.full_tensor() if hasattr(total, "full_tensor") else total
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The strategy-owned part of the state tree: model, optimizer and loss scaler."""
        from trainkit.checkpoint import ModelOptimState

        state: dict[str, Any] = {"model_optim": ModelOptimState(model, optimizer)}
        if self.scaler is not None:
            state["scaler"] = self.scaler
        return state

    def before_save(self, model: nn.Module) -> None:
        """Makes replicated buffers (BatchNorm statistics) rank 0's on every rank.

        Each rank updates its own running statistics; DDP overwrites them with rank 0's at the
        next forward anyway. A checkpoint stores one copy of a replicated tensor, from
        whichever rank the planner picks, so without this a resumed run could continue from
        another rank's statistics and drift from an uninterrupted one.
        """
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer.data if not hasattr(buffer, "to_local") else buffer.to_local(), 0)

    def checkpointer(self, root: str, **options: Any) -> CheckpointerProtocol:
        """Saves and loads the state tree under ``root`` (sharded DCP for torch-native strategies)."""
        from trainkit.checkpoint import Checkpointer

        return Checkpointer(root, **options)

    def export(self, model: nn.Module, url: str) -> None:
        """Writes the full weights as safetensors at ``url`` (all ranks call it); a sharded
        model as Hugging Face-style shards beside it, one per rank, written in parallel."""
        from trainkit.checkpoint.export import export_model

        export_model(model, url)

    def micro_step(self) -> None:
        """Called on accumulation micro-steps that do not step the optimizer."""

    def torch_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The torch optimizer under the strategy's wrapper: what an LR scheduler drives, and
        where step hooks go (a wrapper may not be a full ``Optimizer``)."""
        return optimizer
