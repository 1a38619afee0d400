"""Which dtype to run a model in: bfloat16 where the hardware computes in it natively, else float32 (CPU) or
float16 (older GPUs).

On a CPU with bf16 dot-product instructions (x86 AVX512-BF16 or AMX, Arm BF16) bfloat16 is 3-4x faster than float32
for the vision path and prefill and halves the bytes each decoded token reads; on CPUs without them oneDNN emulates
bf16 with conversions and float32 is the safe choice. Measured in `benchmarks/bench_cpu.py`.

The CPU flags come from `torch.cpu.get_capabilities()` (torch >= 2.11; cpuinfo, the same detection torch's own
kernels use, on every OS). Not used: `torch.backends.cpu.get_cpu_capability()`, which says "AVX512" for CPUs with and
without AVX512-BF16, `torch.ops.mkldnn._is_mkldnn_bf16_supported()`, which is also true where oneDNN only emulates
bf16 (any AVX512BW CPU), and `/proc/cpuinfo`, which only Linux has.

This file needs only torch and the standard library: `florence-vl demo --export-space` copies it beside the
Space's `app.py` (the demo module), which imports it from there.
"""

from collections.abc import Mapping

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16, x86 AMX-BF16, Arm FEAT_BF16


def cpu_capabilities() -> Mapping[str, object]:
    """This CPU's instruction-set flags as torch reports them (`torch.cpu.get_capabilities()`)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        return get_capabilities()
    # torch < 2.11: the private probes that exist since torch 2.3 (x86 only; Arm CPUs then count as without bf16)
    probe = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return {flag: bool(getattr(torch.cpu, name, lambda: False)()) for flag, name in probe.items()}


def cpu_has_native_bf16(capabilities: Mapping[str, object]) -> bool:
    """True when the flags include a bf16 dot-product instruction set (see NATIVE_BF16_FLAGS)."""
    return any(bool(capabilities.get(flag)) for flag in NATIVE_BF16_FLAGS)


def choose_dtype(device: str | torch.device = "cpu", requested: str = "auto", *,
                 cpu_flags: Mapping[str, object] | None = None, cuda_bf16: bool | None = None) -> str:
    """The dtype name to load a model in on `device`: `requested` unless it is "auto".

    auto: CPU -> "bfloat16" if the CPU has native bf16 (`cpu_flags`, default: this CPU's), else "float32";
    CUDA -> "bfloat16" if the GPU supports it (`cuda_bf16`, default: `torch.cuda.is_bf16_supported()`), else
    "float16"; any other device (mps, xpu, ...) -> "float32".

    >>> choose_dtype("cpu", cpu_flags={"avx512_bf16": True}), choose_dtype("cpu", cpu_flags={"avx2": True})
    ('bfloat16', 'float32')
    >>> choose_dtype("cuda", cuda_bf16=False), choose_dtype("cpu", "float16")
    ('float16', 'float16')
    """
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; use one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps, ...") from error
    if device_type == "cpu":
        return "bfloat16" if cpu_has_native_bf16(cpu_capabilities() if cpu_flags is None else cpu_flags) else "float32"
    if device_type == "cuda":
        supported = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        return "bfloat16" if supported else "float16"
    return "float32"
