"""Florence-VL benchmarks: speed and memory side by side with stock Florence-2 and transformers' LLaVA-1.5.

    python benchmarks/run.py --suite cpu --out results.json     # CPU: Florence-2-base vision, reduced LLM
    python benchmarks/run.py --suite gpu --out results.gpu.json # CUDA: base + large vision, Phi-3.5-mini LLM, bf16
    python benchmarks/run.py --suite smoke --out /tmp/smoke.json  # toy sizes, one repeat, a few seconds

Random weights throughout (speed does not depend on them). Every comparison is timed interleaved in one
process, so report the ratios: absolute times move with the load of a shared machine.
"""

import argparse
import datetime
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

import bench_compile  # noqa: E402
import bench_end_to_end  # noqa: E402
import bench_training  # noqa: E402
import bench_vision  # noqa: E402
import sizes  # noqa: E402

SECTIONS = ("vision", "end_to_end", "training", "compile")
TARGETS = {"vision_speedup_vs_naive": ">= 2.5", "ttft_ratio_cpu": "<= 1.25", "ttft_ratio_gpu": "<= 1.10",
           "decode_ratio": ">= 0.97", "stage2_vs_stage1_speed": ">= 1.4", "stage2_vs_stage1_peak_memory": "<= 0.70",
           "gradient_checkpointing_peak_memory": "<= 0.60"}


@dataclass
class Suite:
    device: str
    dtype: str
    vision_sizes: tuple[str, ...]
    vision_image_size: int
    vision_repeats: int
    e2e_florence2_sizes: tuple[str, ...]
    e2e_clip: str
    e2e_llm: str
    e2e_image_size: int
    e2e_new_tokens: int
    e2e_repeats: int
    train_florence2: str
    train_llm: str
    train_image_size: int
    train_batch_size: int
    train_text_tokens: int
    train_steps: int
    train_modes: tuple[str, ...] = bench_training.MODES
    train_isolated: bool = True  # one subprocess per configuration, so each peak memory is its own
    train_interleaved_rounds: int = 0  # > 0: speed ratios from all configurations stepped in turn in one process
    compile_florence2: str = "toy"  # decode tokens/s, torch.compile(fullgraph) + static cache vs eager
    compile_llm: str = "toy"
    compile_image_size: int = 64
    compile_new_tokens: int = 8
    compile_repeats: int = 1
    compile_mode: str = "default"  # "reduce-overhead" (CUDA graphs) on GPU
    compile_backend: str = "inductor"
    notes: list[str] = field(default_factory=list)


SUITES = {
    "smoke": Suite(device="cpu", dtype="float32", vision_sizes=("toy",), vision_image_size=64, vision_repeats=1,
                   e2e_florence2_sizes=("toy",), e2e_clip="toy", e2e_llm="toy", e2e_image_size=64,
                   e2e_new_tokens=4, e2e_repeats=1, train_florence2="toy", train_llm="toy", train_image_size=64,
                   train_batch_size=2, train_text_tokens=8, train_steps=1, train_isolated=False,
                   train_interleaved_rounds=1, compile_repeats=1, compile_backend="aot_eager",
                   notes=["Toy sizes: checks that the benchmark runs; the numbers mean nothing.",
                          "Compile section with the aot_eager backend: full-graph tracing without inductor's "
                          "minute of code generation.",
                          "All training configurations share one subprocess: peak memory is cumulative."]),
    "cpu": Suite(device="cpu", dtype="float32", vision_sizes=("base",), vision_image_size=768, vision_repeats=2,
                 e2e_florence2_sizes=("base", "large"), e2e_clip="vit-l-336", e2e_llm="cpu", e2e_image_size=768,
                 e2e_new_tokens=64, e2e_repeats=2, train_florence2="small", train_llm="cpu", train_image_size=384,
                 train_batch_size=2, train_text_tokens=64, train_steps=2, train_interleaved_rounds=5,
                 compile_florence2="small", compile_llm="cpu", compile_image_size=384, compile_new_tokens=64,
                 compile_repeats=3,
                 notes=["Repeats are few (2 + 1 warm-up round) to keep the suite near 8 minutes on 2 shared cores.","Vision vs naive at Florence-2-base only: one large round (3 stock calls + 2 of ours) "
                        "takes ~80 s on 2 cores; the large vision cost shows in the end-to-end TTFT rows.",
                        "Reduced LLM (sizes.LLM['cpu']): Llama, hidden 512, 4 layers, 8 heads, vocab 32064."]),
    "gpu": Suite(device="cuda", dtype="bfloat16", vision_sizes=("base", "large"), vision_image_size=768,
                 vision_repeats=10, e2e_florence2_sizes=("large",), e2e_clip="vit-l-336", e2e_llm="phi3.5-mini",
                 e2e_image_size=768, e2e_new_tokens=128, e2e_repeats=5, train_florence2="large",
                 train_llm="phi3.5-mini", train_image_size=768, train_batch_size=1, train_text_tokens=512,
                 train_steps=5, compile_florence2="large", compile_llm="phi3.5-mini", compile_image_size=768,
                 compile_new_tokens=128, compile_repeats=5, compile_mode="reduce-overhead",
                 notes=["Phi-3.5-mini shapes in a Llama layout (same FLOPs and bytes as the fused Phi-3 layers).",
                        "MFU = counted FLOPs of one step (torch FlopCounterMode) / step time / dense bf16 peak."]),
}


def environment(device: torch.device) -> dict:
    info = {"type": device.type, "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info


def versions() -> dict:
    import peft

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def write_json(report: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


def run_suite(name: str, sections: tuple[str, ...], out: Path | None = None) -> dict:
    """Run the sections of a suite; the JSON is rewritten after each one, so an interrupted run keeps its results."""
    suite = SUITES[name]
    if suite.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--suite {name} needs a CUDA device and none is available; use --suite cpu.")
    device, dtype = torch.device(suite.device), getattr(torch, suite.dtype)
    torch.manual_seed(0)
    report = {"suite": name, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": environment(device), "versions": versions(), "config": asdict(suite),
              "sizes": {"florence2_vision": sizes.FLORENCE2_VISION, "bart": sizes.BART, "llm": sizes.LLM,
                        "clip_vision": sizes.CLIP_VISION},
              "targets": TARGETS}
    if "vision" in sections:
        report["vision"] = bench_vision.run(list(suite.vision_sizes), suite.vision_image_size, device, dtype,
                                            suite.vision_repeats)
        write_json(report, out)
    if "end_to_end" in sections:
        report["end_to_end"] = bench_end_to_end.run(list(suite.e2e_florence2_sizes), suite.e2e_clip, suite.e2e_llm,
                                                    suite.e2e_image_size, device, dtype, suite.e2e_repeats,
                                                    suite.e2e_new_tokens)
        write_json(report, out)
    if "training" in sections:
        specs = [bench_training.TrainSpec(mode, gc, suite.train_florence2, suite.train_llm, suite.train_image_size,
                                          suite.train_batch_size, suite.train_text_tokens, suite.train_steps,
                                          suite.device, suite.dtype)
                 for gc in (False, True) for mode in suite.train_modes]
        results = bench_training.run_isolated(specs, Path(__file__).resolve(), suite.train_isolated)
        if suite.train_interleaved_rounds:
            timings = bench_training.run_interleaved(specs, suite.train_interleaved_rounds, Path(__file__).resolve())
            for result in results:
                result["step_interleaved"] = timings[bench_training.spec_key(result["spec"])]
        report["training"] = {"results": results, "ratios": bench_training.add_ratios(results)}
        write_json(report, out)
    if "compile" in sections:
        report["compile"] = bench_compile.run(suite.compile_florence2, suite.compile_llm, suite.compile_image_size,
                                              device, dtype, suite.compile_repeats, suite.compile_new_tokens,
                                              suite.compile_mode, suite.compile_backend)
        write_json(report, out)
    return report


def spread(timing: dict) -> str:
    return f"{timing['median_s']:.3f} [{timing['min_s']:.3f}-{timing['max_s']:.3f}]"


def times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def both(row: dict, key: str) -> str:
    """Ratio of medians, then the median of per-round (paired) ratios in parentheses."""
    return f"{row[key]:.2f}x ({row['paired'][key]:.2f}x)"


def format_table(report: dict) -> str:
    """Markdown tables: medians with [min-max] over the repeats; ratios as `of medians (paired)`."""
    lines = [f"Suite `{report['suite']}` on {report['device'].get('name', report['device']['processor'] or 'cpu')} "
             f"({report['device']['torch_threads']} threads), torch {report['versions']['torch']}, "
             f"transformers {report['versions']['transformers']}, {report['config']['dtype']}."]
    for row in report.get("vision", []):
        if row is report["vision"][0]:
            lines += ["", f"Vision, {row['image_size']} px, {row['num_prompts']} prompts: seconds per image, "
                      "median [min-max]", "",
                      "| Florence-2 | naive: 3x stock Florence-2 | ours, batched prompts | ours, per prompt "
                      "| speedup batched | speedup per prompt | batched vs per prompt |", "|---|---|---|---|---|---|---|"]
        t = row["timings"]
        lines.append(f"| {row['florence2_size']} | {spread(t['naive_3x_florence2'])} | {spread(t['ours_batched'])} "
                     f"| {spread(t['ours_per_prompt'])} | {both(row, 'speedup_batched_vs_naive')} "
                     f"| {both(row, 'speedup_per_prompt_vs_naive')} | {both(row, 'batched_vs_per_prompt')} |")
    for row in report.get("end_to_end", []):
        if row is report["end_to_end"][0]:
            lines += ["", f"End to end vs LLaVA-1.5 ({row['clip_tower']} tower), LLM `{row['llm']}`, greedy, "
                      f"{row['new_tokens']} new tokens: TTFT seconds and decode tokens/s, median [min-max]", "",
                      "| Florence-2 | TTFT Florence-VL | TTFT LLaVA | TTFT ratio | decode Florence-VL "
                      "| decode LLaVA | decode ratio |", "|---|---|---|---|---|---|---|"]
        ttft, dec = row["ttft"], row["decode_tokens_per_s"]
        lines.append(f"| {row['florence2_size']} | {spread(ttft['florence_vl'])} | {spread(ttft['llava'])} "
                     f"| {both(row, 'ttft_ratio')} | {dec['florence_vl']['median']:.1f} "
                     f"[{dec['florence_vl']['min']:.1f}-{dec['florence_vl']['max']:.1f}] "
                     f"| {dec['llava']['median']:.1f} [{dec['llava']['min']:.1f}-{dec['llava']['max']:.1f}] "
                     f"| {both(row, 'decode_ratio')} |")
    if "training" in report:
        results = report["training"]["results"]
        spec = results[0]["spec"]
        lines += ["", f"Training step (fwd + bwd + AdamW), Florence-2 `{spec['florence2']}` at {spec['image_size']} px "
                  f"+ LLM `{spec['llm']}`, batch {spec['batch_size']}, sequence {results[0]['sequence_length']}; "
                  f"memory: {results[0]['memory_kind']}", "",
                  "| mode | grad. ckpt | trainable params | samples/s (isolated) | step s (interleaved) | peak MB "
                  "| training MB (peak - before) |", "|---|---|---|---|---|---|---|"]
        for result in results:
            interleaved = result.get("step_interleaved")
            lines.append(f"| {result['spec']['mode']} | {'yes' if result['spec']['gradient_checkpointing'] else 'no'} "
                         f"| {result['trainable_params']:,} | {result['samples_per_s']:.2f} "
                         f"| {spread(interleaved) if interleaved else '-'} "
                         f"| {result['peak_memory_mb']:.0f} | {result['training_memory_mb']:.0f} |")
        lines += ["", "Speed ratios from the interleaved step times where measured; memory from the isolated runs.",
                  "", "| ratio | speed | peak memory | training memory |", "|---|---|---|---|"]
        for key, ratio in report["training"]["ratios"].items():
            lines.append(f"| {key} | {times(ratio['speed'])} | {times(ratio['peak_memory'])} "
                         f"| {times(ratio['training_memory'])} |")
    if "compile" in report:
        row = report["compile"]
        ttft, dec = row["ttft"], row["decode_tokens_per_s"]
        lines += ["", f"torch.compile(model.forward, fullgraph=True, mode={row['compile_mode']!r}, "
                  f"backend={row['compile_backend']!r}) + static cache vs "
                  f"eager, Florence-2 `{row['florence2_size']}` + LLM `{row['llm']}`, {row['new_tokens']} new tokens "
                  f"(first compiled call {row['first_compiled_call_s']:.1f} s; same greedy output: "
                  f"{row['same_greedy_output']})", "",
                  "| forward | TTFT s | decode tokens/s |", "|---|---|---|"]
        for name in ("eager", "compiled"):
            lines.append(f"| {name} | {spread(ttft[name])} | {dec[name]['median']:.1f} "
                         f"[{dec[name]['min']:.1f}-{dec[name]['max']:.1f}] |")
        lines.append(f"| compiled / eager | | {row['decode_speedup']:.2f}x ({row['paired']['decode_speedup']:.2f}x) |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=tuple(SUITES), help="which sizes and repeats to run")
    parser.add_argument("--out", type=Path, help="where to write the JSON report")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)  # internal: one training subprocess
    args = parser.parse_args(argv)
    if args.train_worker is None and args.suite is None:
        parser.error("--suite is required (cpu, gpu or smoke).")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections has unknown names {sorted(unknown)}; use a subset of {SECTIONS}.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.train_worker is not None:
        bench_training.worker(args.train_worker)
        return
    sections = tuple(name for name in SECTIONS if name in args.sections.split(","))
    report = run_suite(args.suite, sections, args.out)
    print(format_table(report))
    if args.out is not None:
        print(f"\nWrote {args.out}")


if __name__ == "__main__":
    main()
