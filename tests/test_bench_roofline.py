"""The bench's roofline: bytes that products and layout changes move, the bound from FLOPs and bytes, the memory
bandwidth case, and the CPU features the bench names."""

from __future__ import annotations

import pytest
import torch

from vitbn.bench.roofline import bandwidth_case, bytes_moved, roofline
from vitbn.bench.system import cpu_features
from vitbn.bench.timing import warm_up


def test_bytes_of_products_and_layout_changes():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    counted = bytes_moved(lambda: a @ b)
    assert counted == {"products": (8 * 16 + 16 * 4 + 8 * 4) * 4, "layout": 0, "total": (8 * 16 + 16 * 4 + 8 * 4) * 4}
    x = torch.randn(3, 5, 7)
    # a transposed view costs nothing; making it contiguous copies it (read + write); cat reads both, writes both
    assert bytes_moved(lambda: x.transpose(1, 2))["total"] == 0
    assert bytes_moved(lambda: x.transpose(1, 2).contiguous())["layout"] == 2 * x.numel() * 4
    assert bytes_moved(lambda: torch.cat([x, x]))["layout"] == 4 * x.numel() * 4
    assert bytes_moved(lambda: x.to(torch.bfloat16))["layout"] == x.numel() * (4 + 2)
    assert bytes_moved(lambda: torch.relu(x))["total"] == 0  # element-wise work is not counted


def test_bytes_of_a_linear_layer_forward_and_backward():
    layer = torch.nn.Linear(16, 32)
    x = torch.randn(10, 16, requires_grad=True)
    counted = bytes_moved(lambda: layer(x).sum().backward())
    fwd = (10 * 16 + 32 * 16 + 32 + 10 * 32) * 4  # addmm: bias, input, weight -> output
    grads = (10 * 32 + 32 * 16 + 10 * 16) * 4 + (32 * 10 + 10 * 16 + 32 * 16) * 4  # dX = dY W, dW = dY^T X
    assert counted["products"] == fwd + grads


def test_roofline_is_the_slower_of_compute_and_memory():
    # 2 GFLOP at 100 GFLOP/s = 20 ms; 0.1 GB at 10 GB/s = 10 ms: compute-bound, 50 img/s
    assert roofline(2e9, 1e8, 100.0, 10.0) == {"roof_img_s": pytest.approx(50.0), "bound": "compute"}
    assert roofline(2e9, 4e8, 100.0, 10.0) == {"roof_img_s": pytest.approx(25.0), "bound": "memory"}
    assert roofline(None, 4e8, 100.0, 10.0) == {"roof_img_s": None, "bound": None}


def test_bandwidth_case_reads_as_gb_per_second():
    case = bandwidth_case(torch.device("cpu"), mib=4)
    assert case.images == pytest.approx(2 * 4 * 2**20 / 1e9)
    warm_up(case, 1, 0.0)
    case.seconds = [0.001]
    assert case.img_s == pytest.approx(case.images / 0.001)


def test_cpu_features_name_the_instruction_sets():
    flags = {"sse4_2", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert cpu_features(flags) == "AVX2 AVX-512 AVX512-BF16 AMX-BF16"
    assert cpu_features({"avx2", "fma"}) == "AVX2"
    assert cpu_features(set()) == "no AVX2"
