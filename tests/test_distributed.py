"""Distributed training through the real `accelerate launch` + train/sft.py on two CPU processes (gloo): DDP, FSDP2,
DeepSpeed ZeRO-2 and ZeRO-3 (`train/accelerate/*_cpu.yaml`).

Every fp32 launch runs the same 2 steps (AdamW with weight decay, the vision part frozen for step 1, a checkpoint
after each step), so one launch checks several things: frozen means unchanged (checkpoint-1's vision weights equal
the initial ones), every engine ends where DDP ends, the saved folder is complete and loads as remote code.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import REPO, SFT, args_for, build_trainer, workdir  # noqa: F401  (workdir is a fixture)

# What engines may differ by after 2 AdamW steps: summation order in the all-reduce, which AdamW's first steps
# amplify (measured: FSDP 0, ZeRO-2 2.4e-7, ZeRO-3 2.1e-7, on DaViT conv weights; before the fix, the warm-up alone
# moved ZeRO-2's weights by 7e-4).
ENGINE_TOLERANCE = 1e-6
VISION = "model.vision_tower."
# 2 steps: the vision part frozen in step 1 (the warm-up), trained in step 2; weight decay would move frozen weights
# if the optimizer stepped them; a checkpoint after each step.
WARMUP_RUN = ["--max_steps", "2", "--vision_freeze_steps", "1", "--optim", "adamw_torch", "--weight_decay", "0.1",
              "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "1"]


@pytest.fixture(scope="session")
def torch_extensions_dir(tmp_path_factory) -> str:
    """DeepSpeed compiles its CPU shared-memory op (g++ + ninja, ~90 s) on first use, into TORCH_EXTENSIONS_DIR:
    one folder for the whole test run, so the first DeepSpeed launch compiles it and the others load it."""
    pytest.importorskip("deepspeed", reason="the DeepSpeed tests need `pip install florence-vl[deepspeed]`")
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_extensions"))


def launch(config: str, argv: list[str], extensions: str | None = None, accelerate_args: tuple = (),
           first_epoch: str = "0.5") -> str:
    """`accelerate launch --config_file train/accelerate/<config> train/sft.py <argv>`; returns stdout + stderr.

    `extensions`: DeepSpeed's compiled-op folder (DeepSpeed launches only). `first_epoch`: the epoch of the first
    logged step, 0.5 with 16 samples, 4 per process, only if there really are 2 processes.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if extensions is not None:
        env.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=extensions)
    command = ["accelerate", "launch", "--config_file", str(REPO / "train/accelerate" / config), *accelerate_args,
               SFT, *argv]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Do you wish to run the custom code" not in log  # a non-interactive launch must never ask
    assert re.findall(r"'epoch': '([0-9.]+)'", result.stdout)[:1] == [first_epoch], result.stdout[-2000:]
    return log


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_complete_and_loads(folder: Path, reference: dict[str, torch.Tensor]) -> None:
    """Every tensor saved whole (ZeRO-3 keeps empty shards in the model), and the folder loads as remote code."""
    from transformers import AutoModelForImageTextToText

    saved = weights(folder)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}
    assert all(tensor.numel() > 0 for tensor in saved.values())
    model, info = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True,
                                                             output_loading_info=True)
    assert type(model).__module__.startswith("transformers_modules")
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    loaded = dict(model.state_dict())
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def assert_vision_frozen_in_warmup(run: Path, initial: dict[str, torch.Tensor]) -> None:
    """After step 1 (the warm-up) every vision weight is bit-equal to its initial value; the rest has trained; after
    step 2 the vision weights have trained too."""
    after_warmup, final = weights(run / "checkpoint-1"), weights(run)
    vision = [k for k in initial if k.startswith(VISION)]
    assert vision and all(torch.equal(initial[k], after_warmup[k].to(initial[k].dtype)) for k in vision), \
        [k for k in vision if not torch.equal(initial[k], after_warmup[k])][:5]
    assert any(not torch.equal(initial[k], after_warmup[k]) for k in initial if not k.startswith(VISION))
    assert any(not torch.equal(initial[k], final[k]) for k in vision), "the vision part did not train after warm-up"


@pytest.fixture(scope="module")
def initial(workdir, tmp_path_factory):  # noqa: F811
    """The model train/sft.py builds from `--model_config` (seed 0), saved as a folder the launches can start from."""
    folder = tmp_path_factory.mktemp("initial")
    trainer = build_trainer(args_for(workdir, folder / "unused", "pretrain"))
    trainer.model.save_pretrained(folder)
    trainer.processing_class.save_pretrained(folder)
    return folder, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def ddp_run(workdir, tmp_path_factory):  # noqa: F811
    """DDP from `--model_config`: the reference every engine is compared with."""
    out = tmp_path_factory.mktemp("ddp")
    launch("ddp_cpu.yaml", args_for(workdir, out, "pretrain", *WARMUP_RUN))
    return out


def test_ddp_and_fsdp_keep_the_warmup_frozen_and_save_the_same_complete_model(workdir, initial, ddp_run,  # noqa: F811
                                                                                tmp_path):
    fsdp_run = tmp_path / "fsdp"
    launch("fsdp_cpu.yaml", args_for(workdir, fsdp_run, "pretrain", *WARMUP_RUN))
    _, initial_weights_ = initial
    for run in (ddp_run, fsdp_run):
        assert_vision_frozen_in_warmup(run, initial_weights_)
    assert max_difference(weights(ddp_run), weights(fsdp_run)) <= ENGINE_TOLERANCE
    assert_complete_and_loads(fsdp_run, weights(ddp_run))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_like_ddp_keeps_the_warmup_frozen_saves_complete_and_resumes_exactly(
        stage, workdir, initial, ddp_run, torch_extensions_dir, tmp_path):  # noqa: F811
    """ZeRO-2 from `--model_config`; ZeRO-3 from a saved folder of the same initial weights (under ZeRO-3, a model
    built from a config is initialised after sharding, from a different random draw than the other engines)."""
    folder, initial_weights_ = initial
    source = (["--model_config", str(workdir / "model.json")] if stage == 2
              else ["--model_name_or_path", str(folder)])
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    config = f"zero{stage}_cpu.yaml"
    launch(config, [*args_for(workdir, run, "pretrain", *WARMUP_RUN), *source], torch_extensions_dir)
    assert_vision_frozen_in_warmup(run, initial_weights_)
    assert max_difference(weights(ddp_run), weights(run)) <= ENGINE_TOLERANCE
    assert_complete_and_loads(run, weights(ddp_run))
    # resume after the warm-up step, from DeepSpeed's own checkpoint (sharded optimizer state), into a new folder
    log = launch(config, [*args_for(workdir, resumed, "pretrain", *WARMUP_RUN), *source,
                          "--resume_from_checkpoint", str(run / "checkpoint-1")], torch_extensions_dir, first_epoch="1")
    assert "Resuming from" in log and len(re.findall(r"\{'loss'", log)) == 1  # step 2 only
    assert max_difference(weights(run), weights(resumed)) == 0.0


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_trains_a_step_and_saves_a_loadable_model(stage, workdir, initial,  # noqa: F811
                                                                 torch_extensions_dir, tmp_path):
    """DeepSpeed's bf16 casts the parameters and leaves the buffers (Florence-2's position table) in float32: the
    model must run so. ZeRO-2 from a folder, ZeRO-3 from `--model_config` (each stage's other source)."""
    folder, _ = initial
    source = (["--model_name_or_path", str(folder)] if stage == 2
              else ["--model_config", str(workdir / "model.json")])
    out = tmp_path / "bf16"
    log = launch(f"zero{stage}_cpu.yaml", [*args_for(workdir, out, "pretrain", "--max_steps", "2", "--bf16", "true"),
                                           *source], torch_extensions_dir, ("--mixed_precision", "bf16"))
    losses = [float(value) for value in re.findall(r"'loss': '([0-9.]+)'", log)]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses), log[-2000:]
    saved = weights(out)
    assert {tensor.dtype for name, tensor in saved.items() if "pos_idx_to_embed" not in name} == {torch.bfloat16}
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    reference = weights(folder)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}
    from PIL import Image

    inputs = processor(text="<image>What is the colour?", images=Image.new("RGB", (48, 40), "red"),
                       return_tensors="pt")
    assert torch.isfinite(model(**inputs).logits.float()).all()


@pytest.mark.parametrize("stage", [2, 3])
def test_gpu_deepspeed_configs_are_the_tested_cpu_ones_but_for_the_machine(stage):
    """What the tests launch on CPU is what README tells GPU users to launch."""
    machine = {"num_processes", "use_cpu", "mixed_precision"}
    gpu, cpu = (yaml.safe_load((REPO / "train/accelerate" / name).read_text())
                for name in (f"zero{stage}.yaml", f"zero{stage}_cpu.yaml"))
    assert {k: v for k, v in gpu.items() if k not in machine} == {k: v for k, v in cpu.items() if k not in machine}
    assert (gpu["use_cpu"], gpu["mixed_precision"], cpu["use_cpu"], cpu["num_processes"]) == (False, "bf16", True, 2)
