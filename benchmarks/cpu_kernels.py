"""CPU kernel checks behind the dtype policy and the profile: GEMM / GEMV per dtype, DaViT channel attention layouts.

```bash
python benchmarks/cpu_kernels.py                               # this CPU as it is
ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/cpu_kernels.py  # oneDNN without AVX512-BF16 (a Skylake-class CPU)
ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_kernels.py         # oneDNN on AVX2 only (most laptops before 2022)
```

`gemm`: best-of-N GFLOP/s of a 1024^3 matmul and of a prefill-shaped linear (610 x 3072 -> 16384), and GB/s of a
decode-shaped linear (1 x 3072 -> 16384, the weight read once), float32 vs bfloat16; bf16 also with oneDNN off
(`torch.backends.mkldnn.flags(enabled=False)`: ATen's own kernels). `channel_attention`: Florence-2-large's DaViT
channel attention at 768 px per stage, in bf16, as transformers computes it (q/k/v permuted to (B, groups, C/g, N)
and given to SDPA with a "head dim" of N tokens) vs the same product contracted over N on the (B, N, groups, C/g)
layout (two batched matmuls, no copies); the float32 results agree to ~1e-6. `davit`: the whole Florence-2-large
vision path at 768 px in bf16 with the model's channel attention (`FlorenceVLChannelAttention`, the second form) vs
transformers' (same modules, class swapped), interleaved rounds, median of paired ratios.
"""

import json
import os
import statistics
import time

import torch
from bench_cpu import best_seconds  # best of `repeats` after one warm-up call
from timing import paired_ratio

from florence_vl.modeling_florence_vl import channel_attention_on_layout  # what the model runs

F = torch.nn.functional


def best(fn, repeats: int = 5) -> float:
    return best_seconds(fn, repeats)


def gemm(prefill_shape: bool = True) -> dict:
    results = {}
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    weight, prefill, token = torch.randn(16384, 3072), torch.randn(610, 3072), torch.randn(1, 3072)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        x, y, w, p, t = (tensor.to(dtype) for tensor in (a, b, weight, prefill, token))
        results[f"{name}_gemm_1024_gflops"] = 2 * 1024 ** 3 / best(lambda: torch.mm(x, y)) / 1e9
        if prefill_shape:
            results[f"{name}_prefill_linear_gflops"] = 2 * 610 * 3072 * 16384 / best(lambda: F.linear(p, w), 3) / 1e9
        results[f"{name}_decode_linear_gb_per_s"] = w.nbytes / best(lambda: F.linear(t, w), 20) / 1e9
        if dtype == torch.bfloat16:
            with torch.backends.mkldnn.flags(enabled=False):
                if prefill_shape:
                    results["bfloat16_no_onednn_prefill_linear_gflops"] = (
                        2 * 610 * 3072 * 16384 / best(lambda: F.linear(p, w), 3) / 1e9)
                results["bfloat16_no_onednn_decode_linear_gb_per_s"] = w.nbytes / best(lambda: F.linear(t, w), 20) / 1e9
    return results


def channel_attention_stock(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    """transformers' Florence2VisionChannelAttention after the qkv projection (SDPA, head dim = tokens)."""
    batch, tokens, _, groups, width = qkv.shape
    query, key, value = qkv.permute(2, 0, 3, 4, 1).unbind(0)
    output = F.scaled_dot_product_attention(query, key, value, scale=scale)
    return output.transpose(1, 2).contiguous().permute(0, 3, 2, 1).reshape(batch, tokens, groups * width)


def channel_attention() -> dict:
    results = {}
    for stage, (dim, groups, side, blocks) in enumerate([(256, 8, 192, 1), (512, 16, 96, 1), (1024, 32, 48, 9),
                                                         (2048, 64, 24, 1)]):
        tokens = side * side
        qkv = torch.randn(1, tokens, 3, groups, dim // groups, dtype=torch.bfloat16)
        scale = tokens ** -0.5
        stock = best(lambda: channel_attention_stock(qkv, scale), 3)
        layout = best(lambda: channel_attention_on_layout(qkv), 3)
        error = (channel_attention_stock(qkv.float(), scale) - channel_attention_on_layout(qkv.float())).abs()
        results[f"stage{stage}"] = {"tokens": tokens, "blocks": blocks, "stock_ms": stock * 1e3,
                                    "on_layout_ms": layout * 1e3, "speedup": stock / layout,
                                    "fp32_max_abs_diff": error.max().item()}
    results["per_image_stock_ms"] = sum(r["stock_ms"] * r["blocks"] for r in results.values())
    results["per_image_on_layout_ms"] = sum(r["on_layout_ms"] * r["blocks"] for k, r in results.items()
                                            if k.startswith("stage"))
    return results


def davit(rounds: int = 3) -> dict:
    """Florence-2-large's vision path at 768 px in bf16 (random weights), with our channel attention
    (FlorenceVLChannelAttention, what the model runs) and with transformers' (the class swapped back on the same
    modules), interleaved: DaViT alone and `get_image_features` (DaViT + 3 prompts through BART + projector)."""
    from transformers.models.florence2.modeling_florence2 import Florence2VisionChannelAttention
    from sizes import florence_vl_config

    from florence_vl import FlorenceVLForConditionalGeneration
    from florence_vl.modeling_florence_vl import FlorenceVLChannelAttention

    model = FlorenceVLForConditionalGeneration._from_config(florence_vl_config("large", "toy", 768),
                                                            dtype=torch.bfloat16).eval()
    attention = [m for m in model.modules() if isinstance(m, FlorenceVLChannelAttention)]
    pixels = torch.randn(1, 3, 768, 768, dtype=torch.bfloat16)
    times = {f"{part}_{kind}": [] for part in ("davit", "vision") for kind in ("ours", "stock")}
    outputs = {}
    for round_ in range(rounds + 1):  # round 0: warm-up
        for kind, cls in (("ours", FlorenceVLChannelAttention), ("stock", Florence2VisionChannelAttention)):
            for module in attention:
                module.__class__ = cls
            for part, fn in (("davit", lambda: model.model.vision_tower.davit(pixels).last_hidden_state),
                             ("vision", lambda: model.model.get_image_features(pixels).pooler_output)):
                start = time.perf_counter()
                outputs[part, kind] = fn()
                if round_:
                    times[f"{part}_{kind}"].append(time.perf_counter() - start)
    for module in attention:
        module.__class__ = FlorenceVLChannelAttention
    result = {name: statistics.median(values) for name, values in times.items()}
    for part in ("davit", "vision"):
        result[f"{part}_speedup"] = paired_ratio(times[f"{part}_stock"], times[f"{part}_ours"])
        result[f"{part}_bf16_max_abs_diff"] = (outputs[part, "ours"].float() - outputs[part, "stock"].float()).abs(
        ).max().item()
    result["rounds"] = rounds
    return result


if __name__ == "__main__":
    with torch.inference_mode():
        report = {"onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(native)"),
                  "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                  "gemm": gemm(prefill_shape="ONEDNN_MAX_CPU_ISA" not in os.environ)}
        if "ONEDNN_MAX_CPU_ISA" not in os.environ:  # bf16 attention on a capped ISA would take minutes
            report["channel_attention"] = channel_attention()
            report["davit"] = davit()
    print(json.dumps(report, indent=1))
