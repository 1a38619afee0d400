"""One-shot GPU readiness check: real-size Florence-VL (random weights) in bf16 with each attention implementation.

    python benchmarks/gpu_check.py --out gpu_check.json     # CUDA: Florence-2-large + Phi-3.5-mini shapes, bf16
    python benchmarks/gpu_check.py --tiny                   # CPU, toy sizes, float32: the same steps in seconds
    python benchmarks/gpu_check.py --tiny --zero3           # ... plus the ZeRO-3 launch on 2 CPU processes

For `sdpa` and `flash_attention_2` (when flash-attn is installed; with `--tiny` and no flash-attn, `eager` stands
in so that the comparison still runs) on one set of weights (`set_attn_implementation` switches in place):
which implementation every attention layer resolved to (DaViT must stay on SDPA), greedy `generate` with TTFT and
decode tokens/s, the prefill logits, and one training step (forward, backward, AdamW with lr 0 so the weights stay
the same for the next implementation), with the loss and peak memory. Exits non-zero when an implementation
crashes, DaViT is not on SDPA, or the outputs differ beyond bf16 tolerance.

Then (on by default with CUDA, `--zero3` with `--tiny`) one DeepSpeed ZeRO-3 run of the real training script:
`accelerate launch --config_file train/accelerate/zero3.yaml train/sft.py` on every visible GPU (`zero3_cpu.yaml`, two
CPU processes, with `--tiny`), bf16, 2 AdamW steps of stage 1 from `--model_config` (the same sizes) with the vision
warm-up, then the saved folder: every tensor complete (ZeRO-3 gathers the 16-bit weights), bf16, and it loads and
runs a forward pass. Needs `pip install florence-vl[deepspeed]`. Under 10 minutes on one H100/H200.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers.utils import is_flash_attn_2_available  # noqa: E402

from bench_end_to_end import prompt_ids, timed_generate  # noqa: E402
from florence_vl import FlorenceVLForConditionalGeneration  # noqa: E402
from sizes import florence_vl_config  # noqa: E402
from timing import synchronize  # noqa: E402

SETTINGS = {  # florence2, llm, image px, text tokens for the training step, new tokens, dtype, device
    "real": dict(florence2="large", llm="phi3.5-mini", image_size=768, train_text_tokens=512, new_tokens=64,
                 dtype="bfloat16", device="cuda"),
    "tiny": dict(florence2="toy", llm="toy", image_size=64, train_text_tokens=16, new_tokens=8, dtype="float32",
                 device="cpu"),
}
# Agreement across implementations: bf16 moves logits by a few 1e-2; greedy tokens may part at near-ties, so only
# the first one is compared, and only where its margin exceeds the logit difference.
MIN_LOGIT_COSINE = 0.99
MAX_LOSS_RELATIVE_DIFF = 0.02


def attention_by_part(model) -> dict[str, str]:
    tower = model.model.vision_tower
    return {"davit": tower.davit.config._attn_implementation, "bart": tower.prompt_encoder.config._attn_implementation,
            "llm": model.model.language_model.config._attn_implementation}


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def check_one(model, implementation: str, inputs: dict, train_batch: dict, new_tokens: int,
              device: torch.device) -> dict:
    model.set_attn_implementation(implementation)
    result = {"implementation": implementation, "attention": attention_by_part(model)}
    model.eval()
    reset_peak(device)
    with torch.inference_mode():
        timed_generate(model, inputs, 2, device)  # warm-up (kernels, allocator)
        ttft, decode = timed_generate(model, inputs, new_tokens, device)
        tokens = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        logits = model(**inputs).logits[0].float()
    result.update(ttft_s=ttft, decode_tokens_per_s=decode, generate_peak_memory_mb=peak_memory_mb(device),
                  new_tokens=tokens[0, inputs["input_ids"].shape[1]:].tolist())

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # a real step that leaves the weights as they are
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    loss = model(**train_batch).loss
    loss.backward()
    optimizer.step()
    synchronize(device)
    result.update(train_step_s=time.perf_counter() - start, loss=loss.item(),
                  train_peak_memory_mb=peak_memory_mb(device),
                  grad_norm=torch.linalg.vector_norm(torch.stack(
                      [p.grad.float().norm() for p in model.parameters() if p.grad is not None])).item())
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    model.eval()
    return result, logits


def run(setting: str, implementations: list[str]) -> dict:
    options = SETTINGS[setting]
    device, dtype = torch.device(options["device"]), getattr(torch, options["dtype"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run on a GPU machine, or pass --tiny for the CPU run of the same steps.")
    torch.manual_seed(0)
    config = florence_vl_config(options["florence2"], options["llm"], options["image_size"])
    start = time.perf_counter()
    with torch.device(device):
        model = FlorenceVLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    build_s = time.perf_counter() - start
    vocab = config.text_config.vocab_size
    text_ids = [3 + (17 * i) % (vocab - 8) for i in range(32)]
    image = torch.randn(1, 3, options["image_size"], options["image_size"], device=device, dtype=dtype)
    input_ids = prompt_ids(config.num_image_tokens, config.image_token_id, text_ids, device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": image}
    train_ids = prompt_ids(config.num_image_tokens, config.image_token_id,
                           [3 + (29 * i) % (vocab - 8) for i in range(options["train_text_tokens"])], device)
    train_batch = {"input_ids": train_ids, "attention_mask": torch.ones_like(train_ids), "pixel_values": image,
                   "labels": train_ids}

    report = {"setting": setting, **options, "torch": torch.__version__, "build_s": build_s,
              "parameters": sum(p.numel() for p in model.parameters()),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "results": []}
    logits, failures = {}, []
    for implementation in implementations:
        try:
            result, logits[implementation] = check_one(model, implementation, inputs, train_batch,
                                                       options["new_tokens"], device)
        except Exception as error:  # report every implementation, then fail
            failures.append(f"{implementation}: {type(error).__name__}: {error}")
            continue
        report["results"].append(result)
        if result["attention"]["davit"] != "sdpa" and implementation != "eager":
            failures.append(f"{implementation}: DaViT resolved to {result['attention']['davit']}, not sdpa")
    reference = report["results"][0] if report["results"] else None
    for result in report["results"][1:]:
        name, base = result["implementation"], reference["implementation"]
        cosine = torch.nn.functional.cosine_similarity(logits[name].flatten(), logits[base].flatten(), dim=0).item()
        loss_diff = abs(result["loss"] - reference["loss"]) / abs(reference["loss"])
        # the first generated token is the argmax of the last prefill logits: it may differ only where the
        # reference's top-2 margin is within the difference the implementations make there (a near-tie)
        top2 = logits[base][-1].topk(2).values
        margin, last_diff = (top2[0] - top2[1]).item(), (logits[name][-1] - logits[base][-1]).abs().max().item()
        same_token = result["new_tokens"][0] == reference["new_tokens"][0]
        result["vs_" + base] = {"logit_cosine": cosine, "loss_relative_diff": loss_diff,
                                "first_token_equal": same_token, "top2_margin": margin,
                                "last_logits_max_abs_diff": last_diff}
        if cosine < MIN_LOGIT_COSINE or loss_diff > MAX_LOSS_RELATIVE_DIFF or (not same_token and margin > last_diff):
            failures.append(f"{name} disagrees with {base}: logit cosine {cosine:.4f}, loss relative diff "
                            f"{loss_diff:.4f}, first tokens {result['new_tokens'][0]} vs {reference['new_tokens'][0]} "
                            f"(top-2 margin {margin:.4f}, logit diff {last_diff:.4f})")
    report["failures"] = failures
    return report


REPO = Path(__file__).resolve().parents[1]


def zero3_step(setting: str, workdir: Path) -> tuple[dict, list[str]]:
    """DeepSpeed ZeRO-3: `accelerate launch` of train/sft.py (bf16, 2 steps from `--model_config`), then the saved
    folder is checked: every tensor complete and bf16, and the model loads and runs. Returns (result, failures)."""
    options = SETTINGS[setting]
    config = florence_vl_config(options["florence2"], options["llm"], options["image_size"])
    (workdir / "model.json").write_text(json.dumps(config.to_dict()))
    out = workdir / "zero3"
    on_cuda = options["device"] == "cuda"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if not on_cuda:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = ["accelerate", "launch", "--config_file",
               str(REPO / "train/accelerate" / ("zero3.yaml" if on_cuda else "zero3_cpu.yaml")),
               "--num_processes", str(torch.cuda.device_count() if on_cuda else 2), "--mixed_precision", "bf16",
               str(REPO / "train/sft.py"), "--stage", "pretrain", "--model_config", str(workdir / "model.json"),
               "--tokenizer", "shapes", "--shapes_train_size", "16", "--per_device_train_batch_size", "2",
               "--max_steps", "2", "--vision_freeze_steps", "1", "--optim", "adamw_torch", "--learning_rate", "1e-4",
               "--bf16", "true", "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none",
               "--output_dir", str(out), "--use_cpu", str(not on_cuda).lower()]
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    result = {"command": " ".join(command), "seconds": time.perf_counter() - start,
              "losses": [float(value) for value in re.findall(r"'loss': '([0-9.e+-]+)'", completed.stdout)]}
    if completed.returncode != 0:
        return result, [f"zero3: the launch failed (exit {completed.returncode}): {completed.stderr[-3000:]}"]
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    saved = {}
    for file in sorted(out.glob("*.safetensors")):
        saved.update(load_file(file))
    with torch.device("meta"):
        expected = FlorenceVLForConditionalGeneration(config).state_dict()
    failures = []
    tied = {"lm_head.weight"} if config.text_config.tie_word_embeddings else set()  # saved once, as the embedding
    wrong = sorted(name for name in expected.keys() - tied if name not in saved or saved[name].numel() == 0)
    if wrong:
        failures.append(f"zero3: {len(wrong)} tensors missing or empty in the saved folder, e.g. {wrong[:3]}")
    dtypes = {str(tensor.dtype) for name, tensor in saved.items() if "pos_idx_to_embed" not in name}
    if dtypes != {"torch.bfloat16"}:
        failures.append(f"zero3: saved weights are {dtypes}, not bfloat16")
    if len(result["losses"]) != 2 or not all(0 < loss < 100 for loss in result["losses"]):
        failures.append(f"zero3: expected 2 finite losses, got {result['losses']}")
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).to(options["device"])
    text_ids = [token for token in range(3, 10) if token != model.config.image_token_id][:3]
    ids = prompt_ids(model.config.num_image_tokens, model.config.image_token_id, text_ids, options["device"])
    pixels = torch.randn(1, 3, options["image_size"], options["image_size"], device=options["device"])
    with torch.inference_mode():
        logits = model(input_ids=ids, pixel_values=pixels.to(model.dtype)).logits
    result.update(saved_tensors=len(saved), saved_dtypes=sorted(dtypes),
                  loaded_forward_finite=bool(torch.isfinite(logits.float()).all()))
    if not result["loaded_forward_finite"]:
        failures.append("zero3: the saved model's logits are not finite")
    return result, failures


def print_table(report: dict) -> None:
    print(f"{report['device_name']}: Florence-2 `{report['florence2']}` + LLM `{report['llm']}` "
          f"({report['parameters'] / 1e9:.2f} B parameters), {report['dtype']}, {report['image_size']} px, "
          f"built in {report['build_s']:.1f} s")
    print("| implementation | DaViT / BART / LLM | TTFT s | decode tok/s | generate peak MB | train step s | loss "
          "| train peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        mb = (lambda value: "-" if value is None else f"{value:.0f}")
        attention = " / ".join(r["attention"][part] for part in ("davit", "bart", "llm"))
        print(f"| {r['implementation']} | {attention} | {r['ttft_s']:.3f} | {r['decode_tokens_per_s']:.1f} "
              f"| {mb(r['generate_peak_memory_mb'])} | {r['train_step_s']:.3f} | {r['loss']:.4f} "
              f"| {mb(r['train_peak_memory_mb'])} |")
        for key, value in r.items():
            if key.startswith("vs_"):
                print(f"  {r['implementation']} {key.replace('_', ' ')}: {value}")
    if report.get("zero3"):
        zero3 = report["zero3"]
        print(f"DeepSpeed ZeRO-3 (train/sft.py, bf16, 2 steps): {zero3['seconds']:.1f} s, losses {zero3['losses']}, "
              f"saved {zero3.get('saved_tensors')} tensors {zero3.get('saved_dtypes')}")
    for failure in report["failures"]:
        print("FAILED:", failure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU in float32 (checks the script runs)")
    parser.add_argument("--out", type=Path, help="where to write the JSON report")
    parser.add_argument("--zero3", action=argparse.BooleanOptionalAction, default=None,
                        help="the DeepSpeed ZeRO-3 launch of train/sft.py (default: on with CUDA, off with --tiny)")
    args = parser.parse_args(argv)
    implementations = ["sdpa"]
    if is_flash_attn_2_available():
        implementations.append("flash_attention_2")
    elif args.tiny:
        implementations.append("eager")  # flash-attn needs CUDA; the comparison logic still runs
    else:
        print("flash-attn is not installed: checking sdpa only (pip install flash-attn for the flash row).")
    started = time.perf_counter()
    setting = "tiny" if args.tiny else "real"
    report = run(setting, implementations)
    if args.zero3 if args.zero3 is not None else not args.tiny:
        if torch.cuda.is_available():  # hand the cached GPU memory of the checks above to the launched processes
            torch.cuda.empty_cache()
        with tempfile.TemporaryDirectory() as workdir:
            try:
                report["zero3"], failures = zero3_step(setting, Path(workdir))
            except Exception as error:  # a check of the saved folder crashed: report it with the rest
                report["zero3"], failures = {}, [f"zero3: {type(error).__name__}: {error}"]
        report["failures"] += failures
    report["total_s"] = time.perf_counter() - started
    print_table(report)
    print(f"total {report['total_s']:.1f} s")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
