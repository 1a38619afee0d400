"""Training step speed and peak memory: stage 1 (all trainable) vs stage 2 (vision frozen) vs LoRA.

Each configuration runs in a fresh subprocess (`run.py --train-worker`), so its peak memory is its own:
peak RSS on CPU (VmHWM: the whole process: Python, torch, weights, optimizer state, activations) and
`torch.cuda.max_memory_allocated` on GPU. A step is forward + backward + AdamW step + zero_grad.
"""

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from florence_vl import FlorenceVLForConditionalGeneration
from sizes import florence_vl_config
from timing import summarize, synchronize

MODES = ("stage1", "stage2", "stage2_no_grad", "lora")
# LoRA on the LLM only: the Florence-2 BART encoder has q_proj/k_proj/v_proj too (same regex as train/sft.py).
LLM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj)"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense tensor-core peaks, for MFU


@dataclass
class TrainSpec:
    mode: str
    gradient_checkpointing: bool
    florence2: str
    llm: str
    image_size: int
    batch_size: int
    text_tokens: int
    steps: int
    device: str
    dtype: str

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is unknown; use one of {MODES}.")


def configure(model: FlorenceVLForConditionalGeneration, spec: TrainSpec):
    """Set trainable parameters for the mode; returns the module to train (a PEFT wrapper for LoRA)."""
    if spec.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if spec.mode == "stage1":
        model.requires_grad_(True)
    elif spec.mode in ("stage2", "stage2_no_grad"):
        model.requires_grad_(True)
        model.model.vision_tower.requires_grad_(False)
        if spec.mode == "stage2_no_grad":
            # The model has no built-in switch: wrap the tower's forward so it explicitly builds no graph.
            model.model.vision_tower.forward = torch.no_grad()(model.model.vision_tower.forward)
    else:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=16, lora_alpha=32, target_modules=LLM_LORA_TARGETS,
                          modules_to_save=["multi_modal_projector"])
        model = get_peft_model(model, lora)
    return model


def make_batch(model_config, spec: TrainSpec, device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    vocab = model_config.text_config.vocab_size
    text = torch.randint(3, vocab - 8, (spec.batch_size, spec.text_tokens), generator=generator)
    images = torch.full((spec.batch_size, model_config.num_image_tokens), model_config.image_token_id)
    input_ids = torch.cat([torch.ones(spec.batch_size, 1, dtype=torch.long), images, text], dim=1).to(device)
    pixel_values = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone(),
            "pixel_values": pixel_values.to(device, dtype)}


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB: VmRSS (resident now) or VmHWM (peak resident).

    VmHWM belongs to this process image, unlike `ru_maxrss`, which Linux carries across `exec` from the
    parent: a worker started by a parent holding 5 GB reports >= 5 GB there whatever it does itself.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status (Linux only).")


def prepare(spec: TrainSpec):
    """Build and configure the model of `spec`; returns (step function, metadata, memory after building)."""
    device, dtype = torch.device(spec.device), getattr(torch, spec.dtype)
    torch.manual_seed(0)
    model = FlorenceVLForConditionalGeneration(florence_vl_config(spec.florence2, spec.llm, spec.image_size))
    model.to(device, dtype).train()
    batch = make_batch(model.config, spec, device, dtype)
    model = configure(model, spec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    memory_before = proc_status_mb("VmRSS") if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    meta = {"spec": asdict(spec), "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()),
            "sequence_length": batch["input_ids"].shape[1]}
    return step, meta, memory_before


def timed(step, device: torch.device) -> float:
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def train_one(spec: TrainSpec) -> dict:
    """Build, configure and time `spec.steps` training steps after one warm-up step (peak memory is its own)."""
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step, result, memory_before = prepare(spec)
    timed(step, device)  # warm-up; also allocates the optimizer state
    timing = summarize([timed(step, device) for _ in range(spec.steps)])
    result.update(step=timing, samples_per_s=spec.batch_size / timing["median_s"])
    if device.type == "cpu":
        result["peak_memory_mb"] = proc_status_mb("VmHWM")
        result["memory_before_training_mb"] = memory_before
        result["memory_kind"] = "process peak RSS (VmHWM); before = RSS after building the model"
        result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # see proc_status_mb
    else:
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["memory_before_training_mb"] = memory_before
        result["memory_kind"] = "torch.cuda.max_memory_allocated; before = allocated after building the model"
        result["mfu"] = model_flops_utilization(step, timing["median_s"], device)
    # What training adds on top of the weights: gradients, optimizer state, activations.
    result["training_memory_mb"] = result["peak_memory_mb"] - memory_before
    return result


def interleaved_speed(specs: list[TrainSpec], rounds: int) -> dict[str, dict]:
    """Step times of all `specs` built in one process and stepped in turn (A B C A B C ...), so that a change of
    machine load hits every configuration alike: the speed ratios to report. Keyed by `spec_key`."""
    prepared = [(spec, prepare(spec)[0]) for spec in specs]
    for spec, step in prepared:
        timed(step, torch.device(spec.device))  # warm-up
    seconds = {spec_key(spec): [] for spec in specs}
    for _ in range(rounds):
        for spec, step in prepared:
            seconds[spec_key(spec)].append(timed(step, torch.device(spec.device)))
    return {key: summarize(values) for key, values in seconds.items()}


def spec_key(spec: TrainSpec | dict) -> str:
    spec = asdict(spec) if isinstance(spec, TrainSpec) else spec
    return f"{spec['mode']}{'_gc' if spec['gradient_checkpointing'] else ''}"


def model_flops_utilization(step, step_seconds: float, device: torch.device) -> float | None:
    """Counted FLOPs of one step / step time / the GPU's dense bf16 peak; None for an unknown GPU."""
    name = torch.cuda.get_device_name(device)
    peak = next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)
    if peak is None:
        return None
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / step_seconds / (peak * 1e12)


def run_worker(payload, run_py: Path):
    """`run.py --train-worker` in a fresh subprocess; the JSON it prints last."""
    payload = json.dumps(payload)
    completed = subprocess.run([sys.executable, str(run_py), "--train-worker", payload], capture_output=True,
                               text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"training worker failed for {payload}:\n{completed.stderr[-4000:]}")
    return json.loads([line for line in completed.stdout.splitlines() if line[:1] in ("{", "[")][-1])


def run_isolated(specs: list[TrainSpec], run_py: Path, isolate: bool) -> list[dict]:
    """Each spec in its own subprocess (isolate=True), or all in one (smoke: peak memory is then cumulative)."""
    groups = [[spec] for spec in specs] if isolate else [specs]
    results = []
    for group in groups:
        for result in run_worker([asdict(spec) for spec in group], run_py):
            result["peak_memory_isolated"] = isolate
            results.append(result)
    return results


def worker(payload: str) -> None:
    """Entry point of the subprocess: run the given specs and print their results as one JSON line.

    `{"interleaved": rounds, "specs": [...]}` times the specs in turn instead (`interleaved_speed`)."""
    request = json.loads(payload)
    if isinstance(request, dict):
        specs = [TrainSpec(**spec) for spec in request["specs"]]
        print(json.dumps(interleaved_speed(specs, request["interleaved"])))
        return
    print(json.dumps([train_one(TrainSpec(**spec)) for spec in request]))


def run_interleaved(specs: list[TrainSpec], rounds: int, run_py: Path) -> dict[str, dict]:
    """`interleaved_speed` in one fresh subprocess."""
    return run_worker({"interleaved": rounds, "specs": [asdict(spec) for spec in specs]}, run_py)


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None where the denominator is not positive (e.g. no measurable growth)."""
    return numerator / denominator if denominator > 0 else None


def compare(result: dict, base: dict) -> dict:
    """Ratios of `result` to `base`; speed from the interleaved timing where there is one (base time / time)."""
    speed = ratio(result["samples_per_s"], base["samples_per_s"])
    if "step_interleaved" in result and "step_interleaved" in base:
        speed = ratio(base["step_interleaved"]["median_s"], result["step_interleaved"]["median_s"])
    return {"speed": speed,
            "peak_memory": ratio(result["peak_memory_mb"], base["peak_memory_mb"]),
            "training_memory": ratio(result["training_memory_mb"], base["training_memory_mb"])}


def add_ratios(results: list[dict]) -> dict:
    """Speed and peak-memory ratios vs stage 1 with the same gradient-checkpointing setting, and gc on vs off."""
    by_key = {(r["spec"]["mode"], r["spec"]["gradient_checkpointing"]): r for r in results}
    ratios = {}
    for (mode, gc), result in by_key.items():
        base = by_key.get(("stage1", gc))
        if base is not None and mode != "stage1":
            ratios[f"{mode}_vs_stage1{'_gc' if gc else ''}"] = compare(result, base)
        off = by_key.get((mode, False))
        if gc and off is not None:
            ratios[f"{mode}_gc_vs_no_gc"] = compare(result, off)
    return ratios
