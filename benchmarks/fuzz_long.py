"""Long robustness profile: the fuzz strategies of tests/test_fuzz.py with many more cases (outcome counts instead
of a failure), and the long versions of tests/test_batch_invariance.py.

    OMP_NUM_THREADS=1 python benchmarks/fuzz_long.py --n 10000 --out fuzz.json    # ~6 min on one CPU core
    OMP_NUM_THREADS=1 python benchmarks/fuzz_long.py --n 0 --requests 64 --rss_requests 500  # pipeline only

Every case ends in one of: `valid` (output checked: placeholders per row, one pixel tensor per `<image>`,
`generate` returns prompt + continuation without the image token), `ValueError` / `TypeError` with a message
that names the problem, or `other` (anything else: a crash from deep inside, a failed check, an unclear message,
a case over the per-case deadline). `other` is grouped by exception and message with the first input that
raised it. Batch invariance: `--requests` chats of mixed images and prompt lengths through
pipeline("image-text-to-text") in batches of 1, 4 and 16 (identical greedy answers expected). Memory: RSS
(VmRSS) before and after `--rss_requests` sequential requests. Exit status 1 on any `other` or mismatch.
"""

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

import test_batch_invariance  # noqa: E402
import test_fuzz  # noqa: E402
from transformers import pipeline  # noqa: E402


def describe(value) -> str:
    """A short, reproducible description: arrays and tensors by shape and dtype, images by mode and size."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__name__}(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, Image.Image):
        return f"Image.new({value.mode!r}, {value.size})"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe(item) for item in value) + "]"
    if isinstance(value, test_fuzz.Case):
        return (f"Case(text={value.text!r}, images={describe(value.images)}, "
                f"processor_kwargs={value.processor_kwargs}, max_new_tokens={value.max_new_tokens})")
    return repr(value)


def fuzz(strategy, run_one, n: int, random_seed: int) -> tuple[collections.Counter, dict]:
    """Run `n` drawn inputs through `run_one`; count outcomes and keep the first input of each `other` kind."""
    counts, others = collections.Counter(), {}

    @seed(random_seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value):
        try:
            with torch.no_grad():
                counts[run_one(value)] += 1
        except Exception as error:  # noqa: BLE001 - counting every failure kind is the point
            counts["other"] += 1
            message = re.sub(r"\d+", "N", str(error).splitlines()[0][:120]) if str(error) else ""
            kind = f"{type(error).__name__}: {message}"  # numbers masked: one kind per message pattern
            others.setdefault(kind, {"count": 0, "first_input": describe(value)[:800]})
            others[kind]["count"] += 1

    run()
    return counts, others


def batch_invariance(pipe, count: int) -> dict:
    requests = test_batch_invariance.make_requests(count)
    by_size = {size: test_batch_invariance.answers(pipe, requests, size) for size in (1, 4, 16)}
    mismatches = {size: sum(a != b for a, b in zip(by_size[1], answers)) for size, answers in by_size.items()}
    return {"requests": count, "distinct_answers": len(set(by_size[1])), "mismatches_vs_batch_1": mismatches}


def sequential_rss(pipe, count: int) -> dict:
    requests = test_batch_invariance.make_requests(50, seed=1)
    for request in requests[:10]:  # warm-up, as in the test
        test_batch_invariance.answers(pipe, [request], batch_size=1)
    start = test_batch_invariance.rss_mb()
    trace = []
    for index in range(count):
        test_batch_invariance.answers(pipe, [requests[index % len(requests)]], batch_size=1)
        if (index + 1) % 100 == 0:
            trace.append(round(test_batch_invariance.rss_mb(), 1))
    end = test_batch_invariance.rss_mb()
    return {"requests": count, "rss_start_mib": round(start, 1), "rss_end_mib": round(end, 1),
            "rss_every_100_mib": trace}


def pipeline_checks(requests: int, rss_requests: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        pipe = pipeline("image-text-to-text", model=str(test_batch_invariance.save_tiny_checkpoint(Path(folder))),
                        trust_remote_code=True)
        report = {}
        if requests:
            report["batch_invariance"] = batch_invariance(pipe, requests)
            print(f"batch invariance: {report['batch_invariance']}")
        if rss_requests:
            report["sequential_rss"] = sequential_rss(pipe, rss_requests)
            print(f"sequential requests: {report['sequential_rss']}")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000, help="processor + model + generate cases")
    parser.add_argument("--n_pixel_values", type=int, default=None, help="direct pixel_values cases (default n/10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=64, help="batch-invariance requests (0: skip)")
    parser.add_argument("--rss_requests", type=int, default=500, help="sequential requests for RSS (0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = test_fuzz.build_model_and_processor()
    report = {"seed": args.seed}
    for name, strategy, run_one, n in (
        ("processor+model+generate", test_fuzz.cases(), lambda case: test_fuzz.run_case(processor, model, case),
         args.n),
        ("pixel_values to the model", test_fuzz.pixel_value_inputs(),
         lambda values: test_fuzz.run_pixel_values(model, values),
         args.n // 10 if args.n_pixel_values is None else args.n_pixel_values),
    ):
        if n == 0:
            continue
        start = time.perf_counter()
        counts, others = fuzz(strategy, run_one, n, args.seed)
        seconds = time.perf_counter() - start
        report[name] = {"cases": sum(counts.values()), "seconds": round(seconds, 1),
                        "outcomes": {key: counts[key] for key in ("valid", "ValueError", "TypeError", "other")},
                        "other_kinds": others}
        print(f"{name}: {sum(counts.values())} cases in {seconds:.0f} s: "
              + ", ".join(f"{key} {counts[key]}" for key in ("valid", "ValueError", "TypeError", "other")))
        for kind, detail in others.items():
            print(f"  other x{detail['count']}: {kind}\n    first input: {detail['first_input'][:300]}")
    report.update(pipeline_checks(args.requests, args.rss_requests))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    fuzz_failed = any(value["outcomes"]["other"] for value in report.values() if isinstance(value, dict)
                      and "outcomes" in value)
    batch_failed = any(report.get("batch_invariance", {}).get("mismatches_vs_batch_1", {}).values())
    return 1 if fuzz_failed or batch_failed else 0


if __name__ == "__main__":
    sys.exit(main())
