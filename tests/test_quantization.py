"""Quantized loading (bitsandbytes 4-bit/8-bit, LLM only) and QLoRA through train/sft.py, on CPU.

bitsandbytes' CPU kernels need layer sizes that are multiples of 32: the tiny LLM here is 64 wide with 32-wide heads.
The vision part (16-wide DaViT layers) only works because it is never quantized.
"""

import pytest
import torch
from PIL import Image
from tiny import TEXT_CONFIGS, tiny_config, tiny_processor
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'florence-vl[quant]')")

from transformers import BitsAndBytesConfig  # noqa: E402

from florence_vl import FlorenceVLForConditionalGeneration  # noqa: E402
from florence_vl.train import sft  # noqa: E402


def bitsandbytes_cpu_error() -> str | None:
    """None if a 4-bit and an 8-bit layer run on this CPU, else why not."""
    try:
        with torch.no_grad():
            x = torch.randn(2, 64)
            for layer in (bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32), bnb.nn.Linear8bitLt(64, 64)):
                layer.load_state_dict(nn.Linear(64, 64).state_dict())
                layer.to("cpu")(x)
    except Exception as error:  # noqa: BLE001 - any failure means: no usable CPU backend here
        return f"{type(error).__name__}: {error}"
    return None


_cpu_error = bitsandbytes_cpu_error()
pytestmark = pytest.mark.skipif(_cpu_error is not None, reason=f"bitsandbytes cannot run on this CPU: {_cpu_error}")

QUANTIZED_TYPES = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}
CONFIGS = {
    "4bit": lambda **kw: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", **kw),
    "8bit": lambda **kw: BitsAndBytesConfig(load_in_8bit=True, **kw),
}


def quant_config():
    """Tiny Florence-VL whose LLM linears are all multiples of 32 (hidden 64, 2 heads of 32, MLP 128)."""
    text = dict(TEXT_CONFIGS["llama"], hidden_size=64, intermediate_size=128, num_attention_heads=2,
                num_key_value_heads=2)
    return tiny_config(text_config=text)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny model + processor saved to a folder, as users load them."""
    folder = tmp_path_factory.mktemp("quant") / "tiny"
    config = quant_config()
    torch.manual_seed(0)
    model = FlorenceVLForConditionalGeneration(config)
    processor = tiny_processor(config)
    model.generation_config.eos_token_id = [processor.tokenizer.eos_token_id]
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(saved):
    processor = tiny_processor(quant_config())
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (20, 60, 220))]
    return processor(text=["<image>What colour?", "<image>Which shape?"], images=images, padding=True,
                     return_tensors="pt")


def linears(model) -> dict[str, nn.Module]:
    """Every Linear of the model; with PEFT, the LoRA A/B layers (full precision by design) are left out."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".lora_" not in name}


def greedy(model, inputs, steps=6):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)[:, -steps:]


def assert_only_llm_quantized(model, kind):
    quantized_type = QUANTIZED_TYPES[kind]
    layers = linears(model)
    llm = {name: layer for name, layer in layers.items() if ".language_model." in name}
    rest = {name: layer for name, layer in layers.items() if name not in llm}
    assert llm and all(isinstance(layer, quantized_type) for layer in llm.values()), \
        [name for name, layer in llm.items() if not isinstance(layer, quantized_type)]
    assert any("vision_tower.davit." in name for name in rest) and any("prompt_encoder" in name for name in rest)
    assert any("multi_modal_projector" in name for name in rest) and "lm_head" in rest
    wrong = [name for name, layer in rest.items() if type(layer) is not nn.Linear]
    assert not wrong, f"vision tower / projector / lm_head must not be quantized: {wrong}"
    return rest


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
@pytest.mark.parametrize("skip", [None, ["lm_head"], ["vision_tower", "multi_modal_projector", "lm_head"]],
                         ids=["default", "user-skips-lm-head", "user-skips-by-short-names"])
def test_only_the_llm_linears_are_quantized_and_generate_runs(saved, inputs, kind, skip):
    """The model's `_keep_in_fp32_modules` keeps vision and projector out of any skip list the user gives."""
    extra = {} if skip is None else {"llm_int8_skip_modules": skip}
    model = FlorenceVLForConditionalGeneration.from_pretrained(saved, quantization_config=CONFIGS[kind](**extra))
    rest = assert_only_llm_quantized(model, kind)
    assert all(layer.weight.dtype == torch.float32 for layer in rest.values())
    tokens = greedy(model, inputs)
    assert tokens.shape == (2, 6)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_logits_stay_close_to_full_precision(saved, inputs, kind):
    full = FlorenceVLForConditionalGeneration.from_pretrained(saved)
    quantized = FlorenceVLForConditionalGeneration.from_pretrained(saved, quantization_config=CONFIGS[kind]())
    with torch.no_grad():
        reference, logits = full(**inputs).logits[:, -1], quantized(**inputs).logits[:, -1]
    cosine = nn.functional.cosine_similarity(reference, logits, dim=-1)
    assert (cosine > 0.9).all(), cosine


def test_float16_quantized_load_keeps_vision_in_float32(saved, inputs):
    model = FlorenceVLForConditionalGeneration.from_pretrained(
        saved, dtype=torch.float16, quantization_config=CONFIGS["4bit"](bnb_4bit_compute_dtype=torch.float16))
    assert model.model.vision_tower.davit.convs[0].conv.weight.dtype == torch.float32
    assert model.model.multi_modal_projector.mlp[0].weight.dtype == torch.float32
    assert model.model.language_model.norm.weight.dtype == torch.float16
    assert greedy(model, dict(inputs, pixel_values=inputs["pixel_values"].half())).shape == (2, 6)


def sft_args(saved, out, *extra):
    return [
        "--model_name_or_path", str(saved), "--shapes_train_size", "8", "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--assistant_only_loss", "true",
        "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--use_cpu", "true",
        "--bf16", "false", "--seed", "0", "--max_steps", "2", *extra,
    ]


def build_trainer(argv):
    return sft.build_trainer(*sft.make_parser().parse_args_and_config(args=argv))


@pytest.fixture(scope="module")
def qlora(saved, tmp_path_factory):
    """Two QLoRA steps through train/sft.py (bf16 load, 4-bit LLM, LoRA r=4, projector in modules_to_save), saved."""
    out = tmp_path_factory.mktemp("qlora") / "adapter"
    argv = sft_args(saved, out, "--load_in_4bit", "true", "--use_peft", "true", "--lora_r", "4", "--dtype", "bfloat16",
                    "--activation_checkpointing", "true")
    trainer = build_trainer(argv)
    before = {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()}
    trainer.train()
    trainer.save_model(str(out))
    return trainer, before, out


def test_qlora_step_changes_only_lora_and_projector(qlora):
    trainer, before, _ = qlora
    model = trainer.model
    assert_only_llm_quantized(model.get_base_model(), "4bit")
    lora = [name for name, _ in model.named_parameters() if "lora_" in name]
    assert lora and all(".language_model." in name for name in lora), "LoRA must land on the LLM only"
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(before[name], parameter)}
    allowed = {name for name in before if "lora_" in name or "multi_modal_projector.modules_to_save" in name}
    assert changed and changed <= allowed, sorted(changed - allowed)
    assert any("lora_B" in name for name in changed) and any("modules_to_save" in name for name in changed)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == allowed
    # prepare_model_for_kbit_training: the frozen full-precision parts (vision, norms, embeddings) run in float32
    frozen = {name: parameter.dtype for name, parameter in model.named_parameters()
              if not parameter.requires_grad and parameter.dtype != torch.uint8}
    assert any("vision_tower" in name for name in frozen) and any("norm" in name for name in frozen)
    assert set(frozen.values()) == {torch.float32}, {name for name, dtype in frozen.items() if dtype != torch.float32}


def test_adapter_loads_back_and_merges_for_full_precision_inference(qlora, saved, inputs):
    from peft import PeftModel

    trainer, _, out = qlora
    assert (out / "adapter_model.safetensors").is_file()
    base = FlorenceVLForConditionalGeneration.from_pretrained(saved).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = PeftModel.from_pretrained(base, out).eval()
    trained = dict(trainer.model.named_parameters())
    for name, parameter in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            assert torch.equal(parameter, trained[name].to(parameter.dtype)), name
    with torch.no_grad():
        adapter_logits = model(**inputs).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4), "the adapter must change the model"
    adapter_tokens = greedy(model, inputs)
    merged = model.merge_and_unload()
    assert type(merged) is FlorenceVLForConditionalGeneration
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(greedy(merged, inputs), adapter_tokens)


def test_quantized_training_needs_peft_and_a_saved_model(saved, tmp_path):
    with pytest.raises(ValueError, match="--use_peft"):
        build_trainer(sft_args(saved, tmp_path / "a", "--load_in_4bit", "true"))
    argv = sft_args(saved, tmp_path / "b", "--load_in_8bit", "true", "--use_peft", "true")
    argv[:2] = ["--model_config", str(tmp_path / "model.json"), "--tokenizer", "shapes"]
    with pytest.raises(ValueError, match="--model_name_or_path"):
        build_trainer(argv)


def test_quant_eval_benchmark_smoke(tmp_path):
    """benchmarks/quant_eval.py at toy size: both sections, the JSON the README table is read from."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "quant_eval.py"
    out = tmp_path / "quant.json"
    subprocess.run([sys.executable, str(script), "--n", "4", "--batch-size", "4", "--variants", "float32,4bit-nf4",
                    "--memory-florence2", "toy", "--memory-llm", "toy", "--out", str(out)], check=True,
                   capture_output=True)
    report = json.loads(out.read_text())
    assert set(report["accuracy"]) == set(report["memory"]) - {"params"} == {"float32", "4bit-nf4"}
    for variant in ("float32", "4bit-nf4"):
        assert report["accuracy"][variant]["n"] == 4 and 0 <= report["accuracy"][variant]["overall"] <= 1
        assert report["memory"][variant]["anon_after_load_mb"] > 0
    assert report["memory"]["4bit-nf4"]["llm_linear_mb"] * 8 == report["memory"]["float32"]["llm_linear_mb"]
    wrong = subprocess.run([sys.executable, str(script), "--variants", "float32,int3"], capture_output=True, text=True)
    assert wrong.returncode != 0 and "int3" in wrong.stderr
