"""Quantized loading (bitsandbytes, LLM only) next to full precision: held-out accuracy and memory, one run.

```bash
python benchmarks/quant_eval.py --out benchmarks/results.quant.cpu.json                 # ~10 min on 2 busy CPU cores
python benchmarks/quant_eval.py --sections memory --memory-llm medium --out /tmp/q.json  # memory only
```

`accuracy`: the shipped tiny shapes-and-words checkpoint loaded as float32, 8-bit (LLM.int8) and 4-bit (NF4),
exact-match accuracy on held-out examples (`florence_vl.train.shapes.evaluate`, the `florence-vl eval-shapes` task)
and how many answers equal the float32 model's. Variants run one after another in one process.

`memory`: a random Florence-VL (Florence-2 `--memory-florence2` + a Llama LLM `--memory-llm`) saved once, then
loaded in a fresh subprocess per variant: weight bytes (`get_memory_footprint`), resident memory after loading and
the peak (`VmHWM`), each minus the subprocess's resident memory before loading. Every weight is read once after
loading: float32 weights stay memory-mapped from the safetensors file and only count as resident once touched.
"""

import argparse
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
CHECKPOINT = REPO / "checkpoints" / "florence-vl-tiny-shapes"
VARIANTS = ("float32", "8bit", "4bit-nf4")
# LLMs for the memory section (Llama layout, sizes multiples of 32); "phi3.5-mini" needs ~16 GB to save.
MEMORY_LLMS = {
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=272),  # tests/test_quantization.py
    "medium": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=16, vocab_size=32064),
    "phi3.5-mini": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32064),
}


def quantization_config(variant: str):
    from transformers import BitsAndBytesConfig

    if variant == "float32":
        return None
    if variant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if variant == "4bit-nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")


def load(folder, variant: str):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, quantization_config=quantization_config(variant)).eval()


def weight_bytes(model) -> dict:
    """Bytes of parameters and buffers: all, and the LLM's linear layers only (what gets quantized)."""
    llm = sum(tensor.numel() * tensor.element_size() for name, tensor in model.named_parameters()
              if ".language_model." in name and ("_proj." in name))
    return {"weights_mb": model.get_memory_footprint() / 2**20, "llm_linear_mb": llm / 2**20}


def accuracy_section(args) -> dict:
    from transformers import AutoProcessor

    from dtype_eval import held_out_answers  # the same greedy batched answers as the dtype comparison

    processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
    results, reference = {}, None
    for variant in args.variants:
        model = load(CHECKPOINT, variant)
        start = time.perf_counter()
        scores, rows = held_out_answers(model, processor, args.n, args.seed, args.batch_size)
        answers = [row["answer"] for row in rows]
        seconds = time.perf_counter() - start
        reference = reference if reference is not None else answers
        same = sum(a == b for a, b in zip(answers, reference)) / len(answers)
        results[variant] = dict(scores, same_answer_as_first=same, eval_seconds=seconds, **weight_bytes(model))
        print(f"{variant:>9}: overall {scores['overall']:.3f}  same answer as {args.variants[0]} {same:.3f}  "
              f"weights {results[variant]['weights_mb']:.2f} MB  {seconds:.0f} s", flush=True)
        del model
    return results


def memory_worker(folder: str, variant: str) -> None:
    """Runs in a fresh subprocess: prints one JSON line with the memory of loading `folder` as `variant`."""
    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
        raise KeyError(key)

    import transformers  # noqa: F401 - imported before the baseline, like the model code

    import bitsandbytes  # noqa: F401

    before, anon_before = status("VmRSS"), status("RssAnon")
    start = time.perf_counter()
    model = load(folder, variant)
    seconds = time.perf_counter() - start
    mapped = status("RssFile")
    with torch.no_grad():  # own copy of every weight (as on a GPU): unquantized weights are views of the mmapped file
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    gc.collect()
    print(json.dumps(dict(weight_bytes(model), rss_after_load_mb=status("VmRSS") - before,
                          anon_after_load_mb=status("RssAnon") - anon_before, file_mapped_at_load_mb=mapped,
                          file_mapped_after_copy_mb=status("RssFile"), peak_rss_mb=status("VmHWM") - before,
                          load_seconds=seconds)))


def memory_section(args) -> dict:
    from sizes import florence_vl_config

    from florence_vl import FlorenceVLForConditionalGeneration

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = florence_vl_config(args.memory_florence2, "cpu", 768)
        text = dict(config.text_config.to_dict(), **MEMORY_LLMS[args.memory_llm])
        config = florence_vl_config(args.memory_florence2, "cpu", 768, text_config=text,
                                    image_token_id=text["vocab_size"] - 1)
        model = FlorenceVLForConditionalGeneration(config)
        params = {"total": sum(p.numel() for p in model.parameters()),
                  "llm": sum(p.numel() for p in model.model.language_model.parameters())}
        model.save_pretrained(tmp)
        del model
        results["params"] = params
        for variant in args.variants:
            line = subprocess.run([sys.executable, __file__, "--memory-worker", tmp, variant], check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[variant] = json.loads(line)
            print(f"{variant:>9}: " + "  ".join(f"{k} {v:.0f}" for k, v in results[variant].items()), flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="accuracy,memory")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--memory-florence2", default="base", help="Florence-2 size for the memory section")
    parser.add_argument("--memory-llm", default="medium", choices=sorted(MEMORY_LLMS))
    parser.add_argument("--memory-worker", nargs=2, metavar=("FOLDER", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(*args.memory_worker)
    args.variants = args.variants.split(",")
    for variant in args.variants:
        quantization_config(variant)  # validates the name
    import bitsandbytes
    import transformers

    report = dict(command=" ".join(sys.argv), device="cpu", machine=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
                  bitsandbytes=bitsandbytes.__version__, n=args.n, seed=args.seed)
    for section in args.sections.split(","):
        if section not in ("accuracy", "memory"):
            raise ValueError(f"unknown section {section!r}; use accuracy and/or memory")
        report[section] = accuracy_section(args) if section == "accuracy" else memory_section(args)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
