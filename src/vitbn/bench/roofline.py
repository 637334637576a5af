"""The roofline of a benchmark case: what the hardware allows for it, from its FLOPs and the bytes it moves.

A case cannot run faster than its matrix products at the measured matmul peak, nor faster than the bytes that its
products and layout changes read and write at the measured memory bandwidth. The larger of the two times is the
case's roofline bound (``roof img/s``); utilization is then read against that bound as well as against the peak:
a step bound by memory traffic cannot reach the matmul peak, however well it is written.

The bytes are counted at the operator level (``TorchDispatchMode``): for every matrix product (``mm``, ``addmm``,
``bmm``, fused attention, convolution; forward and backward) and every layout change or cast (``copy_``,
``clone``, ``cat``, ``stack``, ``_to_copy``), the sizes of its tensor inputs and outputs. That is the traffic of
an implementation with no reuse between operators and none of the element-wise work, so the bound is an optimistic
one for the memory side (caches can only lower the traffic of an operator, element-wise operators add to it).
The bandwidth is that of a large copy, well beyond the caches: the main-memory figure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vitbn.bench.timing import Case

# aten overload packets (``func.overloadpacket.__name__``) counted as products and as layout changes
PRODUCT_OPS = frozenset(
    {
        "mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "convolution_backward",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
        "_flash_attention_forward", "_flash_attention_backward",
    }
)  # fmt: skip
LAYOUT_OPS = frozenset({"copy_", "clone", "cat", "stack", "_to_copy", "_copy_from", "_copy_from_and_resize"})


def _nbytes(tensors) -> int:
    leaves, _ = tree_flatten(tensors)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


class ByteCounter(TorchDispatchMode):
    """Counts the bytes read and written by products and layout changes while active (``products``, ``layout``)."""

    def __init__(self) -> None:
        super().__init__()
        self.products = 0
        self.layout = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in PRODUCT_OPS or name in LAYOUT_OPS:
            # an in-place copy reads its source and writes its destination: inputs + output counts the destination
            # twice, so count copy_'s destination once
            moved = _nbytes(args) + _nbytes(kwargs) + (0 if name == "copy_" else _nbytes(out))
            if name in PRODUCT_OPS:
                self.products += moved
            else:
                self.layout += moved
        return out


def bytes_moved(run: Callable[[], object]) -> dict[str, int]:
    """Bytes that one call of ``run`` moves through products and layout changes: ``{"products", "layout",
    "total"}``. Run it on an eager (not compiled) callable: compiled kernels do not pass through the dispatcher."""
    counter = ByteCounter()
    with counter:
        run()
    return {"products": counter.products, "layout": counter.layout, "total": counter.products + counter.layout}


def bandwidth_case(device: torch.device, mib: int = 512) -> Case:
    """A copy of ``mib`` MiB of float32 into another buffer: main-memory bandwidth. ``images`` is the bytes read
    plus written / 1e9, so ``case.img_s`` reads as GB/s."""
    n = mib * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    return Case(f"copy {mib} MiB fp32", lambda: dst.copy_(src), images=2 * n * 4 / 1e9, device=device)


def roofline(flops_img: float | None, bytes_img: float | None, peak_gflops: float, bandwidth_gb_s: float) -> dict:
    """The bound of a case: ``{"roof_img_s", "bound"}`` where ``bound`` is ``"compute"`` when the products at the
    peak take longer than the bytes at the bandwidth, else ``"memory"``; ``None`` values where a figure is missing.
    """
    if not flops_img or bytes_img is None or not peak_gflops or not bandwidth_gb_s:
        return {"roof_img_s": None, "bound": None}
    compute_s = flops_img / (peak_gflops * 1e9)
    memory_s = bytes_img / (bandwidth_gb_s * 1e9)
    return {"roof_img_s": 1.0 / max(compute_s, memory_s), "bound": "compute" if compute_s >= memory_s else "memory"}
