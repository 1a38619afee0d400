"""The shipped checkpoint's held-out answers in float32 and bfloat16 (and int8 weight-only), side by side.

```bash
python benchmarks/dtype_eval.py --out benchmarks/results.dtype.cpu.json            # 500 images, seed 12345
python benchmarks/dtype_eval.py --variants float32,bfloat16,bfloat16-int8wo --n 100  # + torchao int8 weights
```

Each variant loads `checkpoints/florence-vl-tiny-shapes` the way `florence-vl chat --dtype ...` does, answers the
`florence-vl eval-shapes` held-out questions greedily (batched, 32 new tokens) and is scored by exact match. The
report lists every question whose answer differs from the first variant's, with both answers and the truth.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "florence-vl-tiny-shapes"
VARIANTS = ("float32", "bfloat16", "bfloat16-int8wo")


def load(folder, variant: str):
    """float32 / bfloat16: plain `from_pretrained`; `-int8wo`: the LLM's linears int8 weight-only via torchao."""
    from transformers import AutoModelForImageTextToText

    dtype, _, quantized = variant.partition("-")
    if dtype not in ("float32", "bfloat16") or quantized not in ("", "int8wo"):
        raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    kwargs = {}
    if quantized:  # torchao int8 weight-only through transformers; the model keeps its vision part unquantized
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        kwargs["quantization_config"] = TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=getattr(torch, dtype),
                                                       **kwargs).eval()


def held_out_answers(model, processor, n: int, seed: int, batch_size: int) -> tuple[dict, list[dict]]:
    """Scores of `florence_vl.train.shapes.evaluate` and every (question, truth, answer) in order."""
    from florence_vl.train.shapes import make_examples, evaluate

    answers = []

    def answer_batch(images, questions):
        prompts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True) for question in questions]
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        batch = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.extend(batch)
        return batch

    scores = evaluate(answer_batch, n=n, seed=seed, batch_size=batch_size, progress=False)
    rows = [{"question": example["messages"][0]["content"][1]["text"], "truth": example["answer"], "answer": answer}
            for example, answer in zip(make_examples(n, seed, "heldout"), answers)]
    return scores, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="float32,bfloat16")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--reference", help="a report of this script: compare with its first variant's answers "
                        "instead of running that variant again")
    parser.add_argument("--out")
    args = parser.parse_args()
    from transformers import AutoProcessor

    import transformers

    processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
    report = dict(command=" ".join([Path(sys.executable).name, *sys.argv]),
                  machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                  torch=torch.__version__, transformers=transformers.__version__, n=args.n, seed=args.seed,
                  variants={})
    reference, reference_name = None, args.variants.split(",")[0]
    if args.reference:
        saved = json.loads(Path(args.reference).read_text())
        if (saved["n"], saved["seed"]) != (args.n, args.seed):
            raise ValueError(f"--reference has n={saved['n']}, seed={saved['seed']}; give --n {saved['n']} "
                             f"--seed {saved['seed']}")
        reference_name, first = next(iter(saved["variants"].items()))
        reference = first["answers"]
        report["reference"] = f"{reference_name} answers from {args.reference}"
    for variant in args.variants.split(","):
        model = load(CHECKPOINT, variant)
        start = time.perf_counter()
        scores, rows = held_out_answers(model, processor, args.n, args.seed, args.batch_size)
        seconds = time.perf_counter() - start
        reference = reference or rows
        differ = [dict(row, reference_answer=ref["answer"]) for row, ref in zip(rows, reference)
                  if row["answer"] != ref["answer"]]
        report["variants"][variant] = dict(scores=scores, same_answers=len(rows) - len(differ), differ=differ,
                                           eval_seconds=seconds, answers=rows)
        print(f"{variant:>16}: overall {scores['overall']:.3f}, {len(rows) - len(differ)}/{len(rows)} answers equal "
              f"to {reference_name}'s, {seconds:.0f} s", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        del model


if __name__ == "__main__":
    main()
