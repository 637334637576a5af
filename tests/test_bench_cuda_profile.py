"""The bench's CUDA profile on a synthetic Kineto trace: each kernel counted once (not again as its device-side row
or inside a ``gpu_user_annotation`` row), attributed to its launching operator through runtime calls and
annotations, and classified by its name when no operator says what it is."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType
from torch.autograd.profiler_util import Kernel

from vitbn.bench.cases import categorize_kernel, kernel_rows, shares

ADAM = "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>"
NVJET = "nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT"
LN = "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>"
FLASH = "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>"
XMMA = "sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32_warpgroupsize1x1x1_execute_segment_k_off"
ADD = "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>"


def _cpu(name, parent=None, kernels=(), annotation=False):
    event = SimpleNamespace(name=name, device_type=DeviceType.CPU, cpu_parent=parent, is_async=False,
                            is_user_annotation=annotation, is_python_function=False,
                            kernels=[Kernel(k, 0, us) for k, us in kernels])  # fmt: skip
    return event


def _device(name, us):  # a device-side row: the kernel again, or a gpu_user_annotation spanning kernels
    return SimpleNamespace(name=name, device_type=DeviceType.CUDA, cpu_parent=None, is_async=False, kernels=[],
                           is_user_annotation=False, is_python_function=False, duration=us)  # fmt: skip


def _trace():
    # the annotation's device-side span may come back attached to it, named as itself: not a kernel
    step = _cpu("Optimizer.step#Adam.step", annotation=True, kernels=[("Optimizer.step#Adam.step", 31.0)])
    adam = _cpu("aten::_fused_adam_", step)
    linear = _cpu("aten::linear")
    addmm = _cpu("aten::addmm", linear)
    region = _cpu("my_region", annotation=True)  # a record_function with a bare launch: no operator known
    return [
        step, adam, _cpu("cudaLaunchKernel", adam, [(ADAM, 30.0)]),
        linear, addmm, _cpu("cudaLaunchKernel", addmm, [(NVJET, 50.0)]),
        _cpu("aten::native_layer_norm", kernels=[(LN, 10.0)]),  # the operator holds its kernel itself
        _cpu("cudaLaunchKernel", _cpu("aten::_scaled_dot_product_flash_attention"), [(FLASH, 40.0)]),
        region, _cpu("cuLaunchKernel", region, [(XMMA, 20.0)]),
        _cpu("aten::copy_", kernels=[("Memcpy HtoD (Pageable -> Device)", 5.0)]),
        _cpu("aten::add_", kernels=[(ADD, 5.0), ("aten::add_", 6.0)]),  # + the legacy profiler's whole-op time
        _device(ADAM, 30.0), _device(NVJET, 50.0), _device("Optimizer.step#Adam.step", 31.0), _device(FLASH, 40.0),
    ]  # fmt: skip


def test_each_kernel_once_under_its_launching_operator():
    rows = kernel_rows(_trace())
    assert rows == [
        ("aten::_fused_adam_", 30.0, "optimizer"),
        ("aten::addmm", 50.0, "matmul"),
        ("aten::native_layer_norm", 10.0, "norm"),
        ("aten::_scaled_dot_product_flash_attention", 40.0, "matmul"),
        (XMMA, 20.0, "matmul"),  # no operator: the kernel's own name and class
        ("aten::copy_", 5.0, "copy"),
        ("aten::add_", 5.0, "elementwise"),
    ]
    got = shares([(key, us, 1, category) for key, us, category in rows])
    # 160 us in all; the device-side rows (150 us more) and the annotation row are not counted again
    expected = {"matmul": 110, "norm": 10, "softmax": 0, "copy": 5, "optimizer": 30, "elementwise": 5, "other": 0}
    assert got == pytest.approx({k: 100.0 * v / 160 for k, v in expected.items()})


@pytest.mark.parametrize(
    ("name", "category"),
    [(NVJET, "matmul"), (XMMA, "matmul"), ("ampere_sgemm_128x64_tn", "matmul"), (FLASH, "matmul"),
     ("fmha_cutlassF_f32_aligned_64x64_rf_sm80", "matmul"), (LN, "norm"), ("cudnn::bn_fw_tr_1C11_kernel_NCHW", "norm"),
     ("void at::native::batch_norm_collect_statistics_kernel<float>", "norm"),
     ("void at::native::cunn_SoftMaxForward<4, float>", "softmax"), (ADAM, "optimizer"),
     ("Memset (Device)", "copy"), ("void at::native::CatArrayBatchedCopy<float>", "copy"),
     ("void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda>", "copy"),
     (ADD, "elementwise"), ("void at::native::reduce_kernel<512, 1>", "elementwise"), ("mystery", "other")],
)  # fmt: skip
def test_kernel_names_fall_into_their_categories(name, category):
    assert categorize_kernel(name) == category
