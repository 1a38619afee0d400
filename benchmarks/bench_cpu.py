"""Real-size CPU benchmark: Florence-VL-3B / -8B widths in float32 vs bfloat16 (and int8 weight-only), against the
machine's own limits measured in the same run.

```bash
# fp32 vs bf16 vs bf16 + int8 weight-only LLM, Florence-2-large + Phi-3.5-mini widths with 2 LLM layers (~6 GB)
flock /work/bigmem.lock python benchmarks/bench_cpu.py --llm phi3.5-mini --layers 2 --out benchmarks/results.cpu.3b-2l.json
# full-depth Florence-VL-3B in bf16 only (~9 GB): real TTFT, decode tokens/s, peak memory
flock /work/bigmem.lock python benchmarks/bench_cpu.py --llm phi3.5-mini --layers 32 --variants bfloat16 --out ...
python benchmarks/bench_cpu.py --llm toy --florence2 toy --image-size 64 --repeats 1 --out /tmp/smoke.json  # seconds
```

Random weights from the real configs (Florence-2-large: DaViT + BART-large encoder at 768 px; Phi-3.5-mini /
Llama-3.1-8B shapes), nothing downloaded. One process builds the model once in float32 and derives the other
variants from the same weights, then times them interleaved (round 0 is a warm-up):
- `vision`: `model.model.get_image_features` (DaViT once, 3 prompts through the BART encoder, DBFusion projector);
- `generate`: greedy generate of `--new-tokens` tokens: TTFT (vision + prefill + first token) and decode tokens/s.
Floors, measured in the same process: GEMM rate (2048^3 matmul) per dtype and memory bandwidth (a 1 GiB copy,
counted as read + write; and a 1 GiB sum, read only). FLOPs are counted with torch's FlopCounterMode. So:
vision and TTFT as a fraction of FLOPs / bf16 GEMM rate, and decode tokens/s against read bandwidth / bytes read
per token (every LLM weight except the embedding table, plus the KV cache). Peak memory is the process's VmHWM:
one variant per process (`--variants bfloat16`) gives that variant's peak.
`--profile` adds a torch.profiler table (top ops by self CPU time) of one bf16 vision pass and one prefill.
The LLM is timed on a text-only prompt as long as the image + text prompt, so each round runs the vision path once
per dtype (int8 weight-only leaves the vision part in bf16: it shares the bf16 vision timing); TTFT = vision + LLM
TTFT of the same round.
"""

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import LlamaConfig, Phi3Config  # noqa: E402

from bench_end_to_end import prompt_ids, timed_generate  # noqa: E402
from florence_vl import FlorenceVLForConditionalGeneration  # noqa: E402
from sizes import florence_vl_config  # noqa: E402
from timing import paired_ratio, summarize  # noqa: E402

VARIANTS = ("float32", "bfloat16", "bfloat16-int8wo")
# The released LLMs' shapes (Phi-3.5-mini-instruct, Llama-3.1-8B-Instruct); rope scaling left at the default
# (no effect on speed below 4,096 positions).
LLMS = {
    "phi3.5-mini": lambda layers: Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=layers,
                                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                             max_position_embeddings=4096, pad_token_id=32000, bos_token_id=1,
                                             eos_token_id=32000, tie_word_embeddings=False),
    "llama3.1-8b": lambda layers: LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                              max_position_embeddings=8192, rope_theta=500000.0, pad_token_id=0,
                                              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    "toy": lambda layers: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=272, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2),
}


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_floors(size: int = 2048, bandwidth_mib: int = 1024, repeats: int = 5) -> dict:
    """Best-of-`repeats` GEMM rate per dtype (interleaved) and memory bandwidth: the limits this run is held to."""
    a32, b32 = torch.randn(size, size), torch.randn(size, size)
    pairs = {"float32": (a32, b32), "bfloat16": (a32.bfloat16(), b32.bfloat16())}
    best = {name: float("inf") for name in pairs}
    for _ in range(repeats):
        for name, (a, b) in pairs.items():
            best[name] = min(best[name], best_seconds(lambda a=a, b=b: torch.mm(a, b), 1))
    gemm = {name: 2 * size ** 3 / seconds / 1e9 for name, seconds in best.items()}
    big = torch.empty(bandwidth_mib * 2 ** 18)  # float32: 4 bytes each
    big.normal_()
    out = torch.empty_like(big)
    copy_s = best_seconds(lambda: out.copy_(big), repeats)
    sum_s = best_seconds(lambda: big.sum(), repeats)
    return {"gemm_size": size, "gemm_gflops": gemm, "copy_gb_per_s": 2 * big.nbytes / copy_s / 1e9,
            "read_gb_per_s": big.nbytes / sum_s / 1e9}


def build(florence2: str, llm: str, layers: int, image_size: int,
          dtype: torch.dtype) -> FlorenceVLForConditionalGeneration:
    """Random weights, created directly in `dtype` (a full-depth 3B never exists in float32 here)."""
    text = LLMS[llm](layers)
    config = florence_vl_config(florence2, "toy", image_size, text_config=text.to_dict(),
                                image_token_id=text.vocab_size - 1)
    return FlorenceVLForConditionalGeneration._from_config(config, dtype=dtype).eval()


def make_variant(model_fp32, variant: str, keep_fp32: bool):
    """The variant's model from the same float32 weights (a copy when float32 is also kept)."""
    if variant == "float32":
        return model_fp32
    if keep_fp32:  # copy with each parameter converted on the way: never a second float32 copy in memory
        memo = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                for p in model_fp32.parameters()}
        model_fp32 = copy.deepcopy(model_fp32, memo)
    model = model_fp32.to(torch.bfloat16)
    if variant.endswith("-int8wo"):  # what TorchAoConfig(Int8WeightOnlyConfig()) does: LLM linears, not lm_head
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model.model.language_model, Int8WeightOnlyConfig())
    return model


def llm_decode_bytes(model) -> int:
    """Bytes one decoded token reads from the LLM: every weight except the input embedding table (gathered)."""
    llm = model.model.language_model
    total = sum(tensor.nbytes if not hasattr(tensor, "qdata") else tensor.qdata.nbytes + tensor.scale.nbytes
                for name, tensor in llm.state_dict().items() if "embed_tokens" not in name)
    return total + model.lm_head.weight.nbytes


def profile(model, pixel_values: torch.Tensor, llm_inputs: dict, rows: int = 25) -> dict:
    """Top ops by self CPU time for one vision pass + one LLM prefill; GEMM-like ops summed apart."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model.model.get_image_features(pixel_values)
        model(**llm_inputs, logits_to_keep=1)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    gemm_ops = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn", "aten::_weight_int8pack_mm",
                "aten::mkldnn_convolution", "aten::_scaled_dot_product_flash_attention_for_cpu")
    gemm = sum(e.self_cpu_time_total for e in events if e.key.startswith(gemm_ops))
    top = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
            "calls": e.count} for e in events[:rows]]
    return {"total_self_s": total / 1e6, "gemm_attention_conv_s": gemm / 1e6, "top": top,
            "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)}


def format_report(report: dict) -> str:
    """Markdown: one row per variant (medians), each time also as a multiple of its floor."""
    floors, config = report["floors"], report["config"]
    lines = [f"`{report['command']}`: Florence-2-{config['florence2']} at {config['image_size']} px + {config['llm']} "
             f"widths, {config['layers']} LLM layers, {report['prompt_tokens']} prompt tokens, "
             f"{config['new_tokens']} new tokens, {config['repeats']} timed rounds; "
             f"torch {report['versions']['torch']}, "
             f"{report['machine']['threads']} threads, load average at start "
             f"{report['machine']['load_average'][0]:.1f}.",
             f"Floors measured in the run: GEMM fp32 {floors['gemm_gflops']['float32']:.0f} / bf16 "
             f"{floors['gemm_gflops']['bfloat16']:.0f} GFLOP/s, read bandwidth {floors['read_gb_per_s']:.1f} GB/s "
             f"(copy {floors['copy_gb_per_s']:.1f}); FLOPs vision {report['flops']['vision'] / 1e12:.2f} T, "
             f"LLM prefill {report['flops']['llm_prefill'] / 1e12:.2f} T; "
             f"peak RSS {report['peak_rss_mb'] / 1024:.1f} GiB.", "",
             "| variant | vision s (x floor) | TTFT s (x floor) | decode tokens/s (fraction of floor) | bytes/token |",
             "|---|---|---|---|---|"]
    for variant, row in report["results"].items():
        lines.append(f"| {variant} | {row['vision']['median_s']:.2f} ({row['vision_vs_floor']:.1f}x) "
                     f"| {row['ttft']['median_s']:.2f} ({row['ttft_vs_floor']:.1f}x) "
                     f"| {row['decode_tokens_per_s']['median']:.2f} ({row['decode_fraction_of_floor']:.2f}) "
                     f"| {row['decode_bytes_per_token'] / 1e9:.2f} GB |")
    for variant, ratios in report.get("speedup_vs_float32", {}).items():
        lines.append(f"\n{variant} vs float32 (paired per round): vision {ratios['vision']:.2f}x, TTFT "
                     f"{ratios['ttft']:.2f}x, decode {ratios['decode']:.2f}x")
    if "int8wo_vs_bfloat16_decode" in report:
        lines.append(f"\nint8 weight-only vs bf16 decode (paired): {report['int8wo_vs_bfloat16_decode']:.2f}x")
    if "load_check" in report:
        load = report["load_check"]
        lines.append(f"\nfrom_pretrained of the saved {load['safetensors_gb']:.1f} GB in a fresh process: "
                     f"{load['load_s']:.1f} s (warm page cache), peak RSS {load['peak_rss_mb'] / 1024:.1f} GiB")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--florence2", default="large")
    parser.add_argument("--llm", default="phi3.5-mini", choices=tuple(LLMS))
    parser.add_argument("--layers", type=int, default=2, help="LLM layers (32 = the real depth of both LLMs)")
    parser.add_argument("--image-size", type=int, default=768)
    parser.add_argument("--variants", default="float32,bfloat16,bfloat16-int8wo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--gemm-size", type=int, default=2048, help="GEMM floor: an N x N x N matmul")
    parser.add_argument("--bandwidth-mib", type=int, default=1024, help="bandwidth floor: copy / sum of this many MiB")
    parser.add_argument("--flops-from", type=Path, metavar="JSON", help="skip counting: take the FLOPs of a report of "
                        "the same vision, widths and prompt at another depth (LLM prefill scaled by layers)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--load-check", metavar="DIR", help="at the end: save the model (its last variant) under DIR "
                        "and time from_pretrained of it in a fresh process (weights in the page cache: a warm load)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--format", nargs="+", type=Path, metavar="JSON", help="print the tables of saved reports")
    args = parser.parse_args(argv)
    if args.format:
        for path in args.format:
            print(format_report(json.loads(path.read_text())) + "\n")
        return {}
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}; use some of {VARIANTS}")
    if "float32" not in variants and len(variants) > 1:
        parser.error("without float32, give one variant (--variants bfloat16 or bfloat16-int8wo): the others are "
                     "derived from a float32 copy")
    torch.manual_seed(0)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"processor": platform.processor(), "threads": torch.get_num_threads(),
                          "capability": torch.backends.cpu.get_cpu_capability(),
                          "load_average": os.getloadavg()},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "config": vars(args) | {"out": str(args.out)}}

    def write():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")

    report["floors"] = machine_floors(args.gemm_size, args.bandwidth_mib)
    print(json.dumps(report["floors"]), flush=True)
    rss_start = status_mb("VmRSS")
    start = time.perf_counter()
    keep_fp32 = "float32" in variants
    model = build(args.florence2, args.llm, args.layers, args.image_size,
                  torch.float32 if keep_fp32 else torch.bfloat16)
    models = {}
    for variant in variants:  # float32 first (the source of the others' weights when it is kept)
        models[variant] = model if variant == "float32" or not keep_fp32 and variant == "bfloat16" else \
            make_variant(model, variant, keep_fp32)
    report["build_s"] = time.perf_counter() - start
    report["rss_after_build_mb"] = status_mb("VmRSS") - rss_start
    config = model.config
    report["params"] = {"total": sum(p.numel() for p in model.parameters()),
                        "vision": sum(p.numel() for p in model.model.vision_tower.parameters()),
                        "llm": sum(p.numel() for p in model.model.language_model.parameters())
                        + model.lm_head.weight.numel()}
    text_ids = [3 + (17 * i) % (config.text_config.vocab_size - 8) for i in range(args.text_tokens)]
    ids = prompt_ids(config.num_image_tokens, config.image_token_id, text_ids, torch.device("cpu"))
    pixels = torch.randn(1, 3, args.image_size, args.image_size)

    def pixels_for(variant):
        return pixels.to(torch.float32 if variant == "float32" else torch.bfloat16)

    report["prompt_tokens"] = ids.shape[1]
    # The LLM part is timed on a text-only prompt of the same length (no second vision pass per round); TTFT is
    # reported as vision + LLM TTFT of the same round (the projector is in the vision part; splicing is negligible).
    vocab = config.text_config.vocab_size
    llm_ids = torch.tensor([[1] + [3 + (17 * i) % (vocab - 8) for i in range(ids.shape[1] - 1)]])
    llm_inputs = {"input_ids": llm_ids, "attention_mask": torch.ones_like(llm_ids)}
    vision_variants = [v for v in models if v in ("float32", "bfloat16")] or list(models)[:1]
    flop_variant = "bfloat16" if "bfloat16" in models else variants[0]
    if args.flops_from:  # same vision and widths at another depth: vision as counted, LLM prefill per layer
        counted = json.loads(args.flops_from.read_text())
        if (counted["config"]["florence2"], counted["config"]["llm"], counted["prompt_tokens"]) != (
                args.florence2, args.llm, ids.shape[1]):
            raise ValueError(f"--flops-from {args.flops_from} counted another model or prompt length")
        vision_flops = counted["flops"]["vision"]
        llm_flops = counted["flops"]["llm_prefill"] * args.layers / counted["config"]["layers"]
        report["flops_source"] = f"vision counted in {args.flops_from}; LLM prefill scaled by layers from it"
    else:
        with torch.inference_mode():
            with FlopCounterMode(display=False) as counter:
                models[flop_variant].model.get_image_features(pixels_for(flop_variant))
            vision_flops = counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                models[flop_variant](**llm_inputs, logits_to_keep=1)
            llm_flops = counter.get_total_flops()
    report["flops"] = {"vision": vision_flops, "llm_prefill": llm_flops, "ttft": vision_flops + llm_flops}
    print(json.dumps(report["flops"]), flush=True)
    write()
    vision = {v: [] for v in vision_variants}
    ttft_llm = {v: [] for v in models}
    decode = {v: [] for v in models}
    features, last_logits = {}, {}
    with torch.inference_mode():
        for round_index in range(args.repeats + 1):
            for variant, variant_model in models.items():
                seconds = float("nan")
                if variant in vision_variants:
                    began = time.perf_counter()
                    output = variant_model.model.get_image_features(pixels_for(variant)).pooler_output
                    seconds = time.perf_counter() - began
                    features.setdefault(variant, output.float())
                    if round_index:
                        vision[variant].append(seconds)
                first, rate = timed_generate(variant_model, llm_inputs, args.new_tokens, torch.device("cpu"))
                print(f"round {round_index} {variant}: vision {seconds:.2f} s, LLM TTFT {first:.2f} s, "
                      f"decode {rate:.2f} tokens/s", flush=True)
                if round_index:
                    ttft_llm[variant].append(first)
                    decode[variant].append(rate)
            if round_index == 0:
                for variant, variant_model in models.items():
                    last_logits[variant] = variant_model(**llm_inputs, logits_to_keep=1).logits[0, -1].float()
    if "float32" in models and "bfloat16" in models:  # same weights: how far bf16 drifts from float32
        feature_error = (features["bfloat16"] - features["float32"]).norm() / features["float32"].norm()
        report["bf16_vs_fp32"] = {"image_features_relative_error": feature_error.item()}
        for variant in models:
            if variant != "float32":
                diff = (last_logits[variant] - last_logits["float32"]).abs()
                report["bf16_vs_fp32"][f"{variant}_llm_logits"] = {
                    "max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
                    "fp32_std": last_logits["float32"].std().item(),
                    "same_argmax": bool(last_logits[variant].argmax() == last_logits["float32"].argmax()),
                    "top5_overlap": len(set(last_logits[variant].topk(5).indices.tolist())
                                        & set(last_logits["float32"].topk(5).indices.tolist()))}
        print(json.dumps(report["bf16_vs_fp32"]), flush=True)
    ttft = {v: [vision["float32" if v == "float32" else vision_variants[-1]][i] + t for i, t in enumerate(ttft_llm[v])]
            for v in models}
    bf16_rate = report["floors"]["gemm_gflops"]["bfloat16"] * 1e9
    fp32_rate = report["floors"]["gemm_gflops"]["float32"] * 1e9
    results = {}
    for variant, variant_model in models.items():
        rate = fp32_rate if variant == "float32" else bf16_rate
        vision_floor = report["flops"]["vision"] / rate
        ttft_floor = report["flops"]["ttft"] / rate
        decode_bytes = llm_decode_bytes(variant_model)
        kv_bytes = (2 * config.text_config.num_hidden_layers * (ids.shape[1] + args.new_tokens // 2)
                    * config.text_config.num_key_value_heads * config.text_config.head_dim
                    * (4 if variant == "float32" else 2)) if hasattr(config.text_config, "head_dim") else 0
        decode_floor = report["floors"]["read_gb_per_s"] * 1e9 / (decode_bytes + kv_bytes)
        results[variant] = {
            "vision": summarize(vision["float32" if variant == "float32" else vision_variants[-1]]),
            "llm_ttft": summarize(ttft_llm[variant]), "ttft": summarize(ttft[variant]),
            "decode_tokens_per_s": {"median": statistics.median(decode[variant]), "all": decode[variant]},
            "floor_vision_s": vision_floor, "floor_ttft_s": ttft_floor,
            "vision_vs_floor": statistics.median(vision["float32" if variant == "float32" else vision_variants[-1]])
            / vision_floor,
            "ttft_vs_floor": statistics.median(ttft[variant]) / ttft_floor,
            "decode_bytes_per_token": decode_bytes + kv_bytes, "floor_decode_tokens_per_s": decode_floor,
            "decode_fraction_of_floor": statistics.median(decode[variant]) / decode_floor,
        }
    report["results"] = results
    if "float32" in models:
        report["speedup_vs_float32"] = {
            variant: {"vision": paired_ratio(vision["float32"], vision[vision_variants[-1]]),
                      "llm_ttft": paired_ratio(ttft_llm["float32"], ttft_llm[variant]),
                      "ttft": paired_ratio(ttft["float32"], ttft[variant]),
                      "decode": paired_ratio(decode[variant], decode["float32"])}
            for variant in models if variant != "float32"}
    if "bfloat16" in models and "bfloat16-int8wo" in models:
        report["int8wo_vs_bfloat16_decode"] = paired_ratio(decode["bfloat16-int8wo"], decode["bfloat16"])
    report["peak_rss_mb"] = status_mb("VmHWM")
    write()
    if args.profile:
        report["profile"] = profile(models[flop_variant], pixels_for(flop_variant), llm_inputs)
        print(report["profile"]["table"], flush=True)
        write()
    if args.load_check:  # save the last variant, free every model here, then load it in a fresh process
        import gc
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(dir=args.load_check)
        try:
            started = time.perf_counter()
            models[variants[-1]].save_pretrained(folder)
            saved = {"save_s": time.perf_counter() - started,
                     "safetensors_gb": sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 1e9}
            del models, model, variant_model
            gc.collect()
            report["load_check"] = dict(load_in_fresh_process(folder), **saved)
        finally:
            shutil.rmtree(folder)
        print(json.dumps(report["load_check"]), flush=True)
        write()
    print(json.dumps({k: report[k] for k in ("results", "peak_rss_mb") if k in report}, indent=1), flush=True)
    return report


LOAD_WORKER = """
import json, sys, time, torch
from pathlib import Path
from florence_vl import FlorenceVLForConditionalGeneration
def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024
before = status("VmRSS")
start = time.perf_counter()
model = FlorenceVLForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
seconds = time.perf_counter() - start
with torch.no_grad():
    sum(float(p.float().sum()) for p in model.parameters())  # touch every weight (mapped pages become resident)
print(json.dumps({"load_s": seconds, "rss_after_touch_mb": status("VmRSS") - before, "peak_rss_mb": status("VmHWM"),
                  "python_torch_baseline_mb": before}))
"""


def load_in_fresh_process(folder: str) -> dict:
    """`from_pretrained(folder, dtype=bfloat16)` in a new process: seconds and resident memory."""
    import subprocess

    line = subprocess.run([sys.executable, "-c", LOAD_WORKER, folder], check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]
    return json.loads(line)


if __name__ == "__main__":
    main()
