"""The benchmark runs end to end on toy sizes and writes a complete JSON report (numbers are not asserted)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    completed = subprocess.run([sys.executable, str(RUN_PY), "--suite", "smoke", "--out", str(out)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


def is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_report_records_environment_and_config(smoke_report):
    report, _ = smoke_report
    assert report["suite"] == "smoke"
    assert {"torch", "transformers", "peft", "python"} <= set(report["versions"])
    assert report["device"]["type"] == "cpu"
    assert report["config"]["e2e_llm"] == "toy" and "toy" in report["sizes"]["llm"]


def test_vision_rows_have_timings_and_speedups(smoke_report):
    report, _ = smoke_report
    (row,) = report["vision"]
    assert set(row["timings"]) == {"naive_3x_florence2", "ours_batched", "ours_per_prompt"}
    for timing in row["timings"].values():
        assert timing["min_s"] <= timing["median_s"] <= timing["max_s"] and timing["repeats"] == 1
    assert all(is_positive_number(row[key]) for key in
               ("speedup_batched_vs_naive", "speedup_per_prompt_vs_naive", "batched_vs_per_prompt"))


def test_end_to_end_rows_compare_both_models(smoke_report):
    report, _ = smoke_report
    (row,) = report["end_to_end"]
    assert set(row["ttft"]) == set(row["decode_tokens_per_s"]) == {"florence_vl", "llava"}
    assert is_positive_number(row["ttft_ratio"]) and is_positive_number(row["decode_ratio"])
    assert row["prompt_tokens"]["florence_vl"] == row["prompt_tokens"]["llava"] + 1  # 577 vs 576 at real size


def test_training_covers_every_mode_with_and_without_checkpointing(smoke_report):
    report, _ = smoke_report
    results = report["training"]["results"]
    configurations = {(r["spec"]["mode"], r["spec"]["gradient_checkpointing"]) for r in results}
    assert configurations == {(mode, gc) for mode in ("stage1", "stage2", "stage2_no_grad", "lora")
                              for gc in (False, True)}
    by_mode = {r["spec"]["mode"]: r for r in results if not r["spec"]["gradient_checkpointing"]}
    # stage 2 freezes the vision tower, LoRA trains adapters and the projector only
    assert by_mode["lora"]["trainable_params"] < by_mode["stage2"]["trainable_params"] \
        < by_mode["stage1"]["trainable_params"] == by_mode["stage1"]["total_params"]
    assert all(is_positive_number(r["samples_per_s"]) and is_positive_number(r["peak_memory_mb"]) for r in results)
    assert "stage2_vs_stage1" in report["training"]["ratios"] and "stage1_gc_vs_no_gc" in report["training"]["ratios"]
    # speed ratios come from one process stepping every configuration in turn
    assert all(r["step_interleaved"]["repeats"] == 1 and is_positive_number(r["step_interleaved"]["median_s"])
               for r in results)
    stage1, stage2 = by_mode["stage1"]["step_interleaved"], by_mode["stage2"]["step_interleaved"]
    assert report["training"]["ratios"]["stage2_vs_stage1"]["speed"] == stage1["median_s"] / stage2["median_s"]


def test_table_is_printed(smoke_report):
    _, stdout = smoke_report
    assert "| Florence-2 | naive: 3x stock Florence-2 |" in stdout and "| mode | grad. ckpt |" in stdout


def test_unknown_section_is_rejected():
    completed = subprocess.run([sys.executable, str(RUN_PY), "--suite", "smoke", "--sections", "vision,speed"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0 and "unknown names ['speed']" in completed.stderr


def test_compile_section_compares_compiled_and_eager_decode(smoke_report):
    report, stdout = smoke_report
    row = report["compile"]
    assert row["same_greedy_output"] is True
    assert set(row["decode_tokens_per_s"]) == {"eager", "compiled"} and is_positive_number(row["decode_speedup"])
    assert "| compiled / eager |" in stdout


def test_gpu_check_runs_its_steps_end_to_end_on_cpu(tmp_path):
    """`gpu_check.py --tiny`: the GPU script's logic (dispatch check, generate, training step, agreement) on CPU."""
    out = tmp_path / "gpu_check.json"
    completed = subprocess.run([sys.executable, str(RUN_PY.parent / "gpu_check.py"), "--tiny", "--out", str(out)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == [] and [r["implementation"] for r in report["results"]][0] == "sdpa"
    assert len(report["results"]) == 2 and "logit_cosine" in report["results"][1]["vs_sdpa"]
    assert all(is_positive_number(r["decode_tokens_per_s"]) and math.isfinite(r["loss"]) for r in report["results"])


def test_cpu_dtype_benchmark_compares_variants_against_floors(tmp_path):
    """bench_cpu.py at toy sizes: float32 and bf16 from the same weights, floors, FLOPs, the table.

    (The int8 weight-only variant needs torchao, which is not a dependency.)"""
    out = tmp_path / "cpu.json"
    script = RUN_PY.parent / "bench_cpu.py"
    completed = subprocess.run([sys.executable, str(script), "--florence2", "toy", "--llm", "toy", "--image-size", "64",
                                "--repeats", "1", "--new-tokens", "3", "--text-tokens", "4", "--gemm-size", "256",
                                "--bandwidth-mib", "64", "--variants", "float32,bfloat16", "--out", str(out)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"float32", "bfloat16"}
    assert all(is_positive_number(value) for value in (*report["floors"]["gemm_gflops"].values(),
                                                       report["floors"]["read_gb_per_s"], report["flops"]["vision"]))
    for row in report["results"].values():
        assert is_positive_number(row["ttft_vs_floor"]) and is_positive_number(row["decode_fraction_of_floor"])
    bf16, fp32 = (report["results"][name]["decode_bytes_per_token"] for name in ("bfloat16", "float32"))
    assert bf16 < fp32
    assert report["bf16_vs_fp32"]["bfloat16_llm_logits"]["same_argmax"]
    table = subprocess.run([sys.executable, str(script), "--format", str(out)], capture_output=True, text=True)
    assert "| bfloat16 |" in table.stdout and "bfloat16 vs float32 (paired per round)" in table.stdout
