"""The dtype policy (bfloat16 only where the hardware has it, float32 otherwise, a flag overrides) and that the
shipped checkpoint answers alike in bfloat16 and float32."""

import platform
import re
from pathlib import Path

import pytest
import torch

from florence_vl import cli
from florence_vl.convert import model_card
from florence_vl.dtypes import choose_dtype, cpu_capabilities, cpu_has_native_bf16
from florence_vl.train.shapes import make_examples

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = str(REPO / "checkpoints" / "florence-vl-tiny-shapes")

# Flag sets as torch.cpu.get_capabilities() reports them for kinds of CPUs.
SAPPHIRE_RAPIDS = {"architecture": "x86_64", "avx2": True, "avx512_bw": True, "avx512_bf16": True, "amx_bf16": True}
ZEN4 = {"architecture": "x86_64", "avx2": True, "avx512_bw": True, "avx512_vnni": True, "avx512_bf16": True}
AMX_ONLY = {"architecture": "x86_64", "amx_bf16": True}
CASCADE_LAKE = {"architecture": "x86_64", "avx2": True, "avx512_bw": True, "avx512_vnni": True, "avx512_bf16": False}
ZEN3 = {"architecture": "x86_64", "avx2": True, "fma3": True}
GRAVITON3 = {"architecture": "aarch64", "neon": True, "sve": True, "bf16": True}
GRAVITON2 = {"architecture": "aarch64", "neon": True, "dot": True}


@pytest.mark.parametrize("flags, expected", [
    (SAPPHIRE_RAPIDS, "bfloat16"), (ZEN4, "bfloat16"), (AMX_ONLY, "bfloat16"), (GRAVITON3, "bfloat16"),
    (CASCADE_LAKE, "float32"), (ZEN3, "float32"), (GRAVITON2, "float32"), ({}, "float32"),
])
def test_auto_on_cpu_is_bfloat16_only_with_native_bf16(flags, expected):
    assert choose_dtype("cpu", "auto", cpu_flags=flags) == expected
    assert choose_dtype(torch.device("cpu"), cpu_flags=flags) == expected


def test_auto_on_gpus_and_other_devices():
    assert choose_dtype("cuda", cuda_bf16=True) == "bfloat16"
    assert choose_dtype("cuda:1", cuda_bf16=False) == "float16"
    assert choose_dtype("mps", cpu_flags=ZEN4) == "float32"


@pytest.mark.parametrize("requested", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_always_wins(requested):
    for flags in (ZEN4, ZEN3):
        assert choose_dtype("cpu", requested, cpu_flags=flags) == requested
    assert choose_dtype("cuda", requested, cuda_bf16=False) == requested


def test_bad_dtype_or_device_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*auto, float32, bfloat16, float16"):
        choose_dtype("cpu", "fp8")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        choose_dtype("gpu")


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="reads x86 /proc/cpuinfo")
def test_detection_agrees_with_the_kernels_cpu_flags():
    """torch's cpuinfo flags say bf16 exactly when the kernel lists avx512_bf16 or amx_bf16 for this CPU."""
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    assert cpu_has_native_bf16(cpu_capabilities()) == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert choose_dtype("cpu") == ("bfloat16" if {"avx512_bf16", "amx_bf16"} & flags else "float32")


def test_model_card_snippet_picks_what_the_policy_picks():
    """The card's standalone dtype lines (no florence_vl import) choose what `choose_dtype` chooses here."""
    card = model_card(cli_config())
    code = re.search(r"```python\n(.*?)model = ", card, re.S).group(1)
    code = "\n".join(line for line in code.splitlines() if "PIL" not in line and "transformers" not in line)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - our own snippet
    assert scope["dtype"] == getattr(torch, choose_dtype(scope["device"]))


def cli_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(CHECKPOINT, trust_remote_code=True)


def test_cli_loads_in_the_policy_dtype_unless_told():
    model, _ = cli.load(CHECKPOINT)
    assert model.dtype == getattr(torch, choose_dtype("cpu"))
    model, _ = cli.load(CHECKPOINT, dtype="float32")
    assert model.dtype == torch.float32
    assert cli.build_parser().parse_args(["chat", "x.png", "q"]).dtype == "auto"
    assert cli.build_parser().parse_args(["eval-shapes"]).dtype == "float32"  # recorded scores: one dtype


def test_demo_header_shows_the_chosen_dtype():
    pytest.importorskip("gradio", reason="needs the demo extra")
    from florence_vl.demo import Chat, build_app

    chat = Chat(CHECKPOINT)
    assert chat.dtype == choose_dtype("cpu") and chat.model.dtype == getattr(torch, chat.dtype)
    app = build_app(chat)
    header = next(block.value for block in app.blocks.values() if getattr(block, "elem_id", None) == "model-info")
    assert f"cpu · {chat.dtype}" in header, header
    assert Chat(CHECKPOINT, dtype="float32").model.dtype == torch.float32


def held_out_answers(dtype: torch.dtype, n: int, seed: int) -> list[str]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT, trust_remote_code=True, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
    examples, answers = make_examples(n, seed, "heldout"), []
    for start in range(0, n, 50):
        batch = examples[start:start + 50]
        prompts = [processor.apply_chat_template(example["messages"][:1], add_generation_prompt=True)
                   for example in batch]
        inputs = processor(text=prompts, images=[example["images"][0] for example in batch], padding=True,
                           return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        answers += processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def test_shipped_checkpoint_answers_the_same_in_bfloat16_and_float32():
    """100 held-out questions (seed 4242, not the card's 12345): bf16 and fp32 give the same answers.

    The full 500 of seed 12345 are compared by `benchmarks/dtype_eval.py` (benchmarks/results.dtype.cpu.json)."""
    float32, bfloat16 = held_out_answers(torch.float32, 100, 4242), held_out_answers(torch.bfloat16, 100, 4242)
    assert bfloat16 == float32
