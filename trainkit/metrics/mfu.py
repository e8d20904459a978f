"""Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak.

``mfu = samples_per_s * flops_per_sample / (peak_flops * world_size)``, where
``flops_per_sample`` counts one training step's forward + backward (≈ 3 × forward) for one
sample and ``peak_flops`` is the *dense* tensor-core peak of one accelerator for the dtype
the matmuls run in. MFU is only reported where the peak is known: never on CPU, never on a
GPU missing from :data:`PEAK_TFLOPS` (add yours with :func:`register_peak`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import torch


class Peak(NamedTuple):
    """Dense peak TFLOP/s of one accelerator (no structured sparsity). ``None``: unsupported."""

    bf16: float | None
    fp16: float | None
    tf32: float | None  # fp32 matmuls on tensor cores (torch's "high"/"medium" precision)
    fp32: float  # plain fp32 (torch's default "highest" matmul precision)


# Source kind: vendor datasheets (NVIDIA product datasheets / architecture whitepapers, AMD
# Instinct datasheet). Datasheets print tensor numbers "with sparsity" (marked *); the
# values below are the dense ones, i.e. half the starred figure. fp16/bf16 are with fp32
# accumulate, which is what PyTorch uses.
PEAK_TFLOPS: dict[str, Peak] = {
    # NVIDIA A100 datasheet (SXM4 and PCIe, 40 and 80 GB share the peak): 312 / 156 / 19.5.
    "A100 SXM": Peak(312.0, 312.0, 156.0, 19.5),
    "A100 PCIe": Peak(312.0, 312.0, 156.0, 19.5),
    # NVIDIA H100 datasheet: SXM 1979* / 989* / 67; PCIe 1513* / 756* / 51; NVL 1671* / 835* / 60.
    "H100 SXM": Peak(989.4, 989.4, 494.7, 66.9),
    "H100 PCIe": Peak(756.5, 756.5, 378.0, 51.2),
    "H100 NVL": Peak(835.5, 835.5, 417.5, 60.0),
    # NVIDIA H200 datasheet: SXM 1979* / 989* / 67; NVL 1671* / 835* / 60.
    "H200 SXM": Peak(989.4, 989.4, 494.7, 66.9),
    "H200 NVL": Peak(835.5, 835.5, 417.5, 60.0),
    # NVIDIA L4 datasheet: bf16/fp16 242*, tf32 120*, fp32 30.3.
    "L4": Peak(121.0, 121.0, 60.0, 30.3),
    # NVIDIA L40S datasheet: bf16/fp16 362.05 | 733*, tf32 183 | 366*, fp32 91.6.
    "L40S": Peak(362.05, 362.05, 183.0, 91.6),
    # NVIDIA A10 datasheet: bf16/fp16 125 | 250*, tf32 62.5 | 125*, fp32 31.2. The A10G (AWS
    # G5) has no NVIDIA datasheet of its own; we use the A10 figures, an upper bound for it.
    "A10G": Peak(125.0, 125.0, 62.5, 31.2),
    "A10": Peak(125.0, 125.0, 62.5, 31.2),
    # NVIDIA V100 datasheet (Volta: no bf16, no tf32): SXM2 125 fp16 tensor / 15.7 fp32,
    # PCIe 112 / 14.
    "V100 SXM": Peak(None, 125.0, None, 15.7),
    "V100 PCIe": Peak(None, 112.0, None, 14.0),
    # NVIDIA T4 datasheet (Turing: no bf16, no tf32): 65 fp16 mixed precision, 8.1 fp32.
    "T4": Peak(None, 65.0, None, 8.1),
    # NVIDIA Ada Lovelace whitepaper (GeForce RTX 4090): fp16/bf16 with fp32 accumulate
    # 165.2 | 330.4*, tf32 82.6 | 165.2*, fp32 82.6.
    "RTX 4090": Peak(165.2, 165.2, 82.6, 82.6),
    # AMD Instinct MI300X datasheet: fp16/bf16 1307.4 (2614.9 with sparsity), tf32 653.7,
    # fp32 163.4.
    "MI300X": Peak(1307.4, 1307.4, 653.7, 163.4),
}

# torch.cuda.get_device_name() strings → table keys; first match wins, so the more specific
# patterns come first (L40S before L4, A100 before A10, H100 PCIe before H100).
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"H200.*NVL", "H200 NVL"),
    (r"H200", "H200 SXM"),
    (r"H100.*NVL", "H100 NVL"),
    (r"H100.*PCI", "H100 PCIe"),
    (r"H100", "H100 SXM"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"A100.*PCI", "A100 PCIe"),
    (r"A100", "A100 SXM"),
    (r"L40S", "L40S"),
    (r"\bL4\b", "L4"),
    (r"A10G", "A10G"),
    (r"\bA10\b", "A10"),
    (r"V100.*PCI", "V100 PCIe"),
    (r"V100", "V100 SXM"),
    (r"\bT4\b", "T4"),
    (r"RTX 4090", "RTX 4090"),
    (r"MI300X", "MI300X"),
]


def register_peak(pattern: str, peak: Peak) -> None:
    """Adds a GPU: ``pattern`` is a regex matched against ``torch.cuda.get_device_name()``."""
    PEAK_TFLOPS[pattern] = peak
    _NAME_PATTERNS.insert(0, (pattern, pattern))


def lookup(name: str) -> Peak | None:
    """The table entry for a device name as CUDA/ROCm reports it, or ``None``."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return PEAK_TFLOPS[key]
    return None


def _uses_tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def peak_for_name(name: str, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s (not TFLOP/s) of the named device for matmuls in ``dtype``."""
    peak = lookup(name)
    if peak is None:
        return None
    if dtype == torch.bfloat16:
        tflops = peak.bf16
    elif dtype == torch.float16:
        tflops = peak.fp16
    elif dtype == torch.float32:
        tflops = peak.tf32 if _uses_tf32() and peak.tf32 is not None else peak.fp32
    else:
        return None
    return tflops * 1e12 if tflops else None


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one ``device`` for ``dtype``; ``None`` on CPU or an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_for_name(torch.cuda.get_device_name(device), dtype)


def flops_per_sample(model: torch.nn.Module, example_batch_fn: Callable[[], Any],
                     *, batch_size: int | None = None) -> float:
    """Training FLOPs per sample: one counted forward pass × 3 (forward + 2× for backward).

    ``example_batch_fn()`` returns the model's input: a tensor, a tuple/list of positional
    arguments or a dict of keyword arguments. ``batch_size`` defaults to the first dimension
    of the first tensor in it. Counts with ``torch.utils.flop_counter.FlopCounterMode``
    (matmuls, convolutions, attention); elementwise ops are not counted, as is usual for MFU.
    """
    from torch.utils.flop_counter import FlopCounterMode

    batch = example_batch_fn()
    if batch_size is None:
        batch_size = _batch_size(batch)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        if isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        else:
            model(batch)
    return 3.0 * counter.get_total_flops() / max(1, batch_size)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else []
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim():
            return int(item.shape[0])
    raise ValueError("cannot infer the batch size from the example batch; pass batch_size=")


def mfu(samples_per_s: float, flops_per_sample: float, peak: float | None, world_size: int = 1) -> float | None:
    """Achieved over peak FLOP/s for the whole job; ``None`` when the peak is unknown."""
    if not peak or not flops_per_sample:
        return None
    return samples_per_s * flops_per_sample / (peak * max(1, world_size))
