"""Peak FLOP/s table, FLOP counting and MFU (all on CPU)."""

from __future__ import annotations

import pytest
import torch

from trainkit.metrics import mfu as M


def test_cpu_has_no_peak_and_no_mfu():
    peak = M.peak_flops(torch.device("cpu"), torch.bfloat16)
    assert peak is None
    assert M.mfu(1000.0, 1e9, peak, world_size=8) is None


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", torch.float16, 756.5),
    ("NVIDIA H100 NVL", torch.bfloat16, 835.5),
    ("NVIDIA H200", torch.bfloat16, 989.4),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
    ("NVIDIA A100-PCIE-40GB", torch.bfloat16, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.float16, 312.0),
    ("NVIDIA L4", torch.bfloat16, 121.0),
    ("NVIDIA L40S", torch.bfloat16, 362.05),
    ("NVIDIA A10G", torch.bfloat16, 125.0),
    ("Tesla V100-SXM2-16GB", torch.float16, 125.0),
    ("Tesla V100-PCIE-32GB", torch.float16, 112.0),
    ("Tesla T4", torch.float16, 65.0),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2),
    ("AMD Instinct MI300X", torch.bfloat16, 1307.4),
])
def test_peak_by_device_name(name, dtype, tflops):
    assert M.peak_for_name(name, dtype) == pytest.approx(tflops * 1e12)


def test_unknown_and_unsupported():
    assert M.peak_for_name("NVIDIA GeForce GTX 1080", torch.bfloat16) is None
    assert M.peak_for_name("Tesla T4", torch.bfloat16) is None  # Turing has no bf16 tensor cores
    assert M.peak_for_name("Tesla V100-SXM2-16GB", torch.bfloat16) is None
    assert M.peak_for_name("NVIDIA H100 80GB HBM3", torch.int8) is None


def test_fp32_peak_follows_tf32_setting():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert M.peak_for_name("NVIDIA A100-SXM4-80GB", torch.float32) == pytest.approx(19.5e12)
        assert M.peak_for_name("Tesla T4", torch.float32) == pytest.approx(8.1e12)
        torch.set_float32_matmul_precision("high")
        assert M.peak_for_name("NVIDIA A100-SXM4-80GB", torch.float32) == pytest.approx(156e12)
        assert M.peak_for_name("Tesla T4", torch.float32) == pytest.approx(8.1e12)  # no tf32 there
    finally:
        torch.set_float32_matmul_precision(before)


def test_register_peak():
    M.register_peak(r"Trainium-ish X1", M.Peak(100.0, 100.0, 50.0, 10.0))
    try:
        assert M.peak_for_name("Trainium-ish X1 (rev 2)", torch.bfloat16) == pytest.approx(100e12)
    finally:
        M._NAME_PATTERNS.pop(0)
        M.PEAK_TFLOPS.pop(r"Trainium-ish X1")


def test_linear_flops_are_2mnk_times_3():
    m, k, n = 16, 64, 32
    layer = torch.nn.Linear(k, n, bias=False)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        layer(torch.randn(m, k))
    assert counter.get_total_flops() == 2 * m * n * k
    per_sample = M.flops_per_sample(layer, lambda: torch.randn(m, k))
    assert per_sample == 3 * 2 * m * n * k / m


def test_flops_per_sample_input_shapes():
    class TwoIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 4, bias=False)

        def forward(self, x, y):
            return self.a(x) + y

    model = TwoIn()
    expected = 3 * 2 * 8 * 4
    assert M.flops_per_sample(model, lambda: (torch.randn(5, 8), torch.randn(5, 4))) == expected
    assert M.flops_per_sample(model, lambda: {"x": torch.randn(5, 8), "y": torch.randn(5, 4)}) == expected
    assert M.flops_per_sample(model, lambda: (torch.randn(5, 8), torch.randn(5, 4)), batch_size=1) == 5 * expected


def test_mfu_formula():
    # 1000 samples/s × 1 GFLOP per sample = 1 TFLOP/s, over 2 GPUs of 1 TFLOP/s peak: 50%.
    assert M.mfu(1000.0, 1e9, 1e12, world_size=2) == pytest.approx(0.5)
    assert M.mfu(1000.0, 0.0, 1e12) is None
