"""Golden test: the package against the ORIGINAL Florence-VL code, not against its own idea of it.

tests/fixtures/original/ was written by `make_fixture.py` running the original code (llava/, transformers 4.43.1;
see its docstring for what it patches): a tiny checkpoint in the original training code's own layout, and what the
original computed from it. Here the checkpoint is converted with `florence-vl convert` in a fresh process and the
result must reproduce the original: pixel values 1e-5, projected image features and logits 1e-4 (also for a prompt
past Phi-3's original_max_position_embeddings, on the long rope factors), token ids equal.
"""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerFast
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from florence_vl import CHAT_TEMPLATES, FlorenceVLProcessor
from florence_vl.processing_florence_vl import florence2_image_processor

FIXTURE = Path(__file__).parent / "fixtures" / "original"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text())
IMAGE_INDEX = REFERENCE["image_token_index"]  # the original's -200


def convert(src: Path, dst: Path) -> subprocess.CompletedProcess:
    """`florence-vl convert SRC DST` in a fresh process, offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "florence_vl.cli", "convert", str(src), str(dst)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def conversion(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    dst = tmp_path_factory.mktemp("converted")
    result = convert(FIXTURE / "checkpoint", dst)
    assert result.returncode == 0, result.stderr[-3000:]
    return dst, result


@pytest.fixture(scope="module")
def converted(conversion) -> Path:
    return conversion[0]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "reference.safetensors")


@pytest.fixture(scope="module")
def loaded(converted):
    model = AutoModelForImageTextToText.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(converted, trust_remote_code=True)


def images() -> list[Image.Image]:
    return [Image.open(FIXTURE / "images" / f"{name}.png") for name in REFERENCE["images"]]


def expected_ids(original: list[int], processor) -> list[int]:
    """The original ids with its one image index replaced by the placeholders."""
    assert original.count(IMAGE_INDEX) == 1
    index = original.index(IMAGE_INDEX)
    return original[:index] + [processor.image_token_id] * processor.num_image_tokens + original[index + 1:]


def test_fixture_layout_is_the_original_one():
    """What the converter has to cope with is really there (guards against regenerating a friendlier fixture)."""
    config = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
    vision = json.loads((FIXTURE / "checkpoint" / "vision_tower" / "config.json").read_text())
    assert config["model_type"] == "llava_phi" and config["rope_scaling"]["type"] == "longrope"
    llama = json.loads((FIXTURE / "checkpoint-llama" / "config.json").read_text())
    assert llama["model_type"] == "llava_llama" and llama["rope_scaling"]["rope_type"] == "llama3"
    assert config["image_aspect_ratio"] == "pad" and Path(config["mm_vision_tower"]).is_absolute()
    assert vision["vision_config"]["model_type"] == ""
    assert "visual_temporal_embed.pos_idx_to_embed" not in torch.load(
        FIXTURE / "checkpoint" / "vision_tower" / "pytorch_model.bin", weights_only=True)
    sizes = {name: Image.open(FIXTURE / "images" / f"{name}.png").size for name in REFERENCE["images"]}
    assert sizes["landscape"][0] > sizes["landscape"][1] and sizes["portrait"][0] < sizes["portrait"][1]


def test_pixel_values_match_the_original_on_non_square_images(loaded, reference):
    _, processor = loaded
    assert processor.image_aspect_ratio == "pad"  # from the original config's image_aspect_ratio
    pixel_values = processor(text=["<image>"] * 3, images=[[image] for image in images()],
                             return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == reference["pixel_values"].shape
    torch.testing.assert_close(pixel_values, reference["pixel_values"], atol=1e-5, rtol=0)


def test_image_features_and_logits_match_the_original(loaded, reference):
    model, processor = loaded
    with torch.no_grad():
        features = model.get_image_features(pixel_values=reference["pixel_values"]).pooler_output
    torch.testing.assert_close(features, reference["image_features"], atol=1e-4, rtol=0)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": REFERENCE["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=images()[0], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == expected_ids(REFERENCE["input_ids"]["phi3"], processor)
    with torch.no_grad():
        logits = model(**inputs).logits
    vocabulary = reference["logits"].shape[-1]  # the converter appended `<image>` to the vocabulary
    torch.testing.assert_close(logits[..., :vocabulary], reference["logits"], atol=1e-4, rtol=0)


def test_prompt_past_original_max_positions_matches_the_original_long_rope(loaded, reference):
    """A prompt longer than Phi-3's `original_max_position_embeddings` switches every position to the long rope
    factors (the original, with its 2048-token cut turned off, computed these logits)."""
    model, processor = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": REFERENCE["long_question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == REFERENCE["prompts"]["phi3_long"]
    image = images()[REFERENCE["images"].index(REFERENCE["long_logits_image"])]
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == expected_ids(reference["input_ids.phi3_long"][0].tolist(), processor)
    original_max = model.config.text_config.rope_parameters["original_max_position_embeddings"]
    assert inputs["input_ids"].shape[1] > original_max
    with torch.no_grad():
        logits = model(**inputs).logits
    vocabulary = reference["long.logits"].shape[-1]
    torch.testing.assert_close(logits[:, reference["long.positions"], :vocabulary], reference["long.logits"],
                               atol=1e-4, rtol=0)


def test_longrope_checkpoint_converts_and_loads_without_a_rope_warning(conversion):
    """transformers >= 5.25 warns on every load of a Phi-3 longrope config without `factor`: the converted config
    states it (max / original positions, the ratio transformers 4.43 scaled attention by) and loads silently."""
    dst, result = conversion
    assert "rope" not in result.stderr.lower(), result.stderr[-3000:]
    original = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
    rope = json.loads((dst / "config.json").read_text())["text_config"]["rope_parameters"]
    assert rope["factor"] == original["max_position_embeddings"] / original["original_max_position_embeddings"]

    logging.Logger.warning_once.cache_clear()  # transformers' once-only warnings may have been shown already
    with CaptureLogger(transformers_logging.get_logger("transformers")) as captured:
        model = AutoModelForImageTextToText.from_pretrained(dst, trust_remote_code=True, dtype=torch.float32)
    assert "rope" not in captured.out.lower(), captured.out
    scale = original["max_position_embeddings"] / original["original_max_position_embeddings"]
    expected = math.sqrt(1 + math.log(scale) / math.log(original["original_max_position_embeddings"]))  # 4.43.1's
    assert model.model.language_model.rotary_emb.attention_scaling == pytest.approx(expected, rel=1e-12)


def test_llava_llama_checkpoint_matches_the_original(tmp_path, reference):
    """`llava_llama` with Llama-3.1's legacy rope_scaling, a BOS-adding tokenizer (two BOS, as the original fed) and
    no vision_tower/pytorch_model.bin: converted with no flags, features and logits match the original's."""
    result = convert(FIXTURE / "checkpoint-llama", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=reference["pixel_values"]).pooler_output
    torch.testing.assert_close(features, reference["llama.image_features"], atol=1e-4, rtol=0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": REFERENCE["question"]}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", images=[images()[1]])
    assert inputs["input_ids"][0].tolist() == expected_ids(REFERENCE["input_ids"]["llama3"], processor)
    with torch.no_grad():
        logits = model(**inputs).logits
    vocabulary = reference["llama.logits"].shape[-1]
    torch.testing.assert_close(logits[..., :vocabulary], reference["llama.logits"], atol=1e-4, rtol=0)


def test_generation_is_greedy_and_cli_pipeline_and_card_agree(converted, loaded):
    """The original evaluated greedily; the CLI, `pipeline` and the model card's snippet give one answer."""
    model, processor = loaded
    generation = model.generation_config
    assert generation.do_sample is False and generation.temperature in (None, 1.0) and generation.top_p in (None, 1.0)
    image, question = FIXTURE / "images" / "landscape.png", REFERENCE["question"]

    # the model card snippet, as written
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=Image.open(image), return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8)
    card = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    from transformers import pipeline

    chat = [{"role": "user", "content": [{"type": "image", "url": str(image)}, {"type": "text", "text": question}]}]
    piped = pipeline("image-text-to-text", model=model, processor=processor)(
        text=chat, max_new_tokens=8, return_full_text=False)[0]["generated_text"]

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cli = subprocess.run([sys.executable, "-m", "florence_vl.cli", "chat", "--model", str(converted), str(image),
                          question, "--max-new-tokens", "8"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert card.strip() == piped.strip() == cli.stdout.strip()


@pytest.mark.parametrize("family", ["phi3", "llama3", "plain"])
def test_chat_templates_give_the_original_ids(family):
    """Our templates + processor give the original `tokenizer_image_token` ids, on both the string path and the
    `tokenize=True` path (pipeline), for a tokenizer that adds BOS (llama3) and one that does not (phi3)."""
    folder = FIXTURE / ("checkpoint-llama" if family == "llama3" else "checkpoint")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = FlorenceVLProcessor(image_processor=florence2_image_processor(64), tokenizer=tokenizer,
                                    chat_template=CHAT_TEMPLATES[family], num_image_tokens=5)
    if family == "plain":
        messages = [{"role": "user", "content": [{"type": "image"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": REFERENCE["caption"]}]}]
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": REFERENCE["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=family != "plain")
    # The original's llama3 system string starts with a literal <|begin_of_text|> and the tokenizer adds its BOS
    # too: the model saw two. Our template writes both, and the processor adds no third.
    assert prompt == (tokenizer.bos_token if family == "llama3" else "") + REFERENCE["prompts"][family]
    expected = expected_ids(REFERENCE["input_ids"][family], processor)
    image = Image.new("RGB", (64, 48))
    assert processor(text=prompt, images=image)["input_ids"][0] == expected
    tokenized = processor.apply_chat_template(messages, add_generation_prompt=family != "plain", tokenize=True,
                                              return_dict=True, images=[image])
    assert tokenized["input_ids"][0] == expected


def test_phi3_template_renders_the_original_multi_turn_conversation_and_a_given_system_prompt():
    tokenizer = PreTrainedTokenizerFast.from_pretrained(FIXTURE / "checkpoint")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = FlorenceVLProcessor(image_processor=florence2_image_processor(64), tokenizer=tokenizer,
                                    chat_template=CHAT_TEMPLATES["phi3"], num_image_tokens=5)
    messages = [{"role": "user", "content": [{"type": "text", "text": REFERENCE["question"]}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": REFERENCE["caption"]}]},
                {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == REFERENCE["prompts"]["phi3_two_turns"]  # the image goes first, as in the original
    ids = processor(text=prompt, images=Image.new("RGB", (64, 48)))["input_ids"][0]
    assert ids == expected_ids(REFERENCE["input_ids"]["phi3_two_turns"], processor)
    system = [{"role": "system", "content": "Be brief."}] + messages[:1]
    prompt = processor.apply_chat_template(system, add_generation_prompt=True)
    assert prompt.startswith("<|system|>\nBe brief.<|end|>\n<|user|>\n") and "helpful AI" not in prompt


def test_vision_weights_from_the_bin_without_the_buffer(tmp_path, reference):
    """Only `vision_tower/pytorch_model.bin` (parameters, no `pos_idx_to_embed`) holds the vision weights: the
    buffer is recomputed and the features still match the original."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURE / "checkpoint", src)
    # an instruct LLM's sampling defaults must not be inherited: the original evaluated greedily
    (src / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "eos_token_id": [246], "bos_token_id": 1}))
    weights = load_file(src / "model.safetensors")
    save_file({key: value for key, value in weights.items() if not key.startswith("model.vision_tower.")},
              src / "model.safetensors", metadata={"format": "pt"})
    result = convert(src, tmp_path / "dst")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recomputed vision_tower/visual_temporal_embed.pos_idx_to_embed" in result.stdout
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "dst", trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        features = model.eval().get_image_features(pixel_values=reference["pixel_values"]).pooler_output
    torch.testing.assert_close(features, reference["image_features"], atol=1e-4, rtol=0)
    generation = model.generation_config
    assert generation.do_sample is False and generation.temperature in (None, 1.0) and generation.top_p in (None, 1.0)
    card = (tmp_path / "dst" / "README.md").read_text()
    assert "base_model" not in card and "/tmp" not in card  # mm_vision_tower is a machine-local path


@pytest.mark.parametrize("breakage, message", [
    (lambda src: (src / "vision_tower" / "config.json").unlink(), "mm_hidden_size=4"),
    (lambda src: (src / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 128, "width": 96}, "resample": 3})), "preprocessor_config.json: size="),
    (lambda src: (src / "tokenizer.json").write_text("{not json"), "cannot load the LLM tokenizer"),
])
def test_a_missing_or_broken_piece_gives_one_clear_error(tmp_path, breakage, message):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE / "checkpoint", src)
    breakage(src)
    result = convert(src, tmp_path / "dst")
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
