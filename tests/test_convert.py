"""Real-weight paths: build from pretrained parts, convert the original LLaVA-layout checkpoints, publish."""

import argparse
import json
import logging
import re

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file
from tiny import IMAGE_TOKEN_ID, SPECIAL_TOKENS, TEXT_CONFIGS, tiny_config, tiny_florence2_config, tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Florence2ForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from florence_vl import FlorenceVLForConditionalGeneration, FlorenceVLProcessor
from florence_vl.configuration_florence_vl import DEFAULT_VISION_PROMPT_IDS, DEFAULT_VISION_PROMPTS
from florence_vl.convert import (
    convert_original,
    files_to_upload,
    from_pretrained_parts,
    main,
    model_card,
    save_for_hub,
)

PROMPT_WORDS = sorted({word for prompt in DEFAULT_VISION_PROMPTS for word in re.findall(r"\w+|[^\w\s]", prompt)})
CODE_FILES = {"configuration_florence_vl.py", "modeling_florence_vl.py", "processing_florence_vl.py"}
V = "model.vision_tower.vision_tower."  # the Florence-2 remote-code model inside the original LLaVA vision tower


def florence2_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level stand-in for the Florence-2 BART tokenizer (<s>=0, <pad>=1, </s>=2), enough for the prompts."""
    vocab = {token: index for index, token in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + PROMPT_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def llm_tokenizer_without_image_token() -> PreTrainedTokenizerFast:
    """`tiny_tokenizer` without `<image>`: 8 special tokens + 256 bytes = 264 tokens."""
    specials = [token for token in SPECIAL_TOKENS if token != "<image>"]
    vocab = {token: index for index, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A native Florence-2 folder and a Llama folder whose tokenizer lacks `<image>` (264 tokens)."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    florence = Florence2ForConditionalGeneration(tiny_florence2_config())
    florence.save_pretrained(root / "florence2")
    florence2_tokenizer().save_pretrained(root / "florence2")
    tokenizer = llm_tokenizer_without_image_token()
    text_config = AutoConfig.for_model(**dict(TEXT_CONFIGS["llama"], vocab_size=len(tokenizer)))
    llm = AutoModelForCausalLM.from_config(text_config)
    llm.generation_config.do_sample, llm.generation_config.temperature = True, 0.6  # an instruct LLM's defaults
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return root, florence.eval(), llm.eval()


def test_from_pretrained_parts_copies_the_parts_and_adds_the_image_token(parts, tmp_path):
    root, florence, llm = parts
    model, processor = from_pretrained_parts(str(root / "florence2"), str(root / "llm"), image_size=64)

    rows = [florence2_tokenizer()(prompt)["input_ids"] for prompt in DEFAULT_VISION_PROMPTS]
    width = max(map(len, rows))
    assert model.config.vision_prompt_ids == tuple(tuple(row + [1] * (width - len(row))) for row in rows)
    assert len({len(row) for row in rows}) > 1  # the rows really needed padding with the pad id 1

    ours, theirs, lm = model.state_dict(), florence.state_dict(), llm.state_dict()
    for key, value in theirs.items():
        if key.startswith("model.vision_tower."):
            assert torch.equal(ours[key.replace("model.vision_tower.", "model.vision_tower.davit.", 1)], value), key
        elif key.startswith("model.multi_modal_projector."):
            assert torch.equal(ours[key.replace("model.multi_modal_projector.", "model.vision_tower.davit_projector.")],
                               value), key
        elif key.startswith("model.language_model.encoder.layers."):
            assert torch.equal(ours[key.replace("model.language_model.encoder.", "model.vision_tower.prompt_encoder.")],
                               value), key
    assert torch.equal(ours["model.vision_tower.prompt_encoder.embed_tokens.weight"],
                       theirs["model.language_model.shared.weight"])
    assert not any("decoder" in key for key in ours)
    assert any(key.startswith("model.language_model.decoder.") for key in model.conversion_report.dropped)

    generation = model.generation_config  # greedy, as the original evaluated: no inherited sampling defaults
    assert generation.do_sample is False and generation.temperature in (None, 1.0)
    assert processor.image_aspect_ratio == "pad"  # new models pad like the original

    image_id = processor.image_token_id
    assert image_id == model.config.image_token_id == 264 and model.conversion_report.vocab_resized == (264, 265)
    for key, value in lm.items():
        target = "lm_head.weight" if key == "lm_head.weight" else key.replace("model.", "model.language_model.", 1)
        assert torch.equal(ours[target][: value.shape[0]], value), key

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = torch.rand(3, 40, 50)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    with torch.no_grad():
        logits = model(**inputs).logits
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 4 and image_id not in output[0, -4:]

    save_for_hub(model, processor, tmp_path, base_models=["florence2", "llm"])
    reloaded = FlorenceVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    reprocessor = FlorenceVLProcessor.from_pretrained(tmp_path)
    assert reprocessor.num_image_tokens == model.config.num_image_tokens == 5
    reloaded_inputs = reprocessor(text=[prompt], images=[image], return_tensors="pt")
    assert torch.equal(reloaded_inputs["input_ids"], inputs["input_ids"])
    assert torch.equal(reloaded_inputs["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)
    assert {"processing_florence_vl.py", "README.md", "model.safetensors"} <= set(files_to_upload(tmp_path))


def test_from_pretrained_parts_with_a_longrope_phi3_saves_a_config_that_loads_without_a_rope_warning(parts, tmp_path):
    """Phi-3.5-mini's config (longrope, no `factor`) makes transformers >= 5.24 warn on every load: the built
    config states factor = max / original positions, the same attention scaling, and the saved model reloads
    (remote code) without a rope warning and with the same logits."""
    root, _, _ = parts
    tokenizer = llm_tokenizer_without_image_token()
    head_dim = TEXT_CONFIGS["phi3"]["hidden_size"] // TEXT_CONFIGS["phi3"]["num_attention_heads"]
    rope = {"rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(head_dim // 2)],
            "long_factor": [2.0 + i / 4 for i in range(head_dim // 2)]}
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**dict(
        TEXT_CONFIGS["phi3"], vocab_size=len(tokenizer), original_max_position_embeddings=64, rope_parameters=rope)))
    llm.save_pretrained(root / "phi3")
    tokenizer.save_pretrained(root / "phi3")
    assert "factor" not in json.loads((root / "phi3" / "config.json").read_text())["rope_parameters"]

    model, processor = from_pretrained_parts(str(root / "florence2"), str(root / "phi3"), image_size=64)
    assert model.config.text_config.rope_parameters["factor"] == 512 / 64
    scaling = model.model.language_model.rotary_emb.attention_scaling
    assert scaling == pytest.approx(llm.model.rotary_emb.attention_scaling, rel=1e-12) and scaling > 1
    save_for_hub(model, processor, tmp_path)
    logging.Logger.warning_once.cache_clear()  # transformers' once-only warnings may have been shown already
    with CaptureLogger(transformers_logging.get_logger("transformers")) as captured:
        reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    assert "rope" not in captured.out.lower(), captured.out
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------ original checkpoints


def original_florence2_config(florence2) -> dict:
    """The tiny Florence-2 in the original remote-code config format."""
    vision, text = florence2.vision_config, florence2.text_config
    return {
        "model_type": "florence2",
        "vision_config": {
            "model_type": "davit", "dim_embed": list(vision.embed_dim), "depths": list(vision.depths),
            "num_heads": list(vision.num_heads), "num_groups": list(vision.num_groups),
            "window_size": vision.window_size, "drop_path_rate": 0.0, "patch_size": list(vision.patch_size),
            "patch_stride": list(vision.patch_stride), "patch_padding": list(vision.patch_padding),
            "patch_prenorm": list(vision.patch_prenorm), "projection_dim": vision.projection_dim,
            "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": vision.max_temporal_embeddings},
            "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": vision.max_position_embeddings},
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        },
        "text_config": {**{key: getattr(text, key) for key in (
            "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
            "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings", "dropout",
            "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id")},
            "add_final_layer_norm": False, "normalize_before": False, "label2id": {"LABEL_0": 0}, "num_beams": 3},
    }


def original_name(key: str) -> str:
    """Our weight name -> the name the original LLaVA-layout Florence-VL checkpoint uses."""
    if key.startswith("model.vision_tower.davit."):
        name = key.removeprefix("model.vision_tower.davit.")
        for pattern, replacement in (
            (r"^convs\.(\d+)\.conv\.", r"convs.\1.proj."), (r"\.(conv1|conv2)\.", r".\1.fn.dw."),
            (r"spatial_block\.norm1\.", "spatial_block.window_attn.norm."),
            (r"channel_block\.norm1\.", "channel_block.channel_attn.norm."),
            (r"\.(window_attn|channel_attn)\.(qkv|proj)\.", r".\1.fn.\2."), (r"_block\.norm2\.", "_block.ffn.norm."),
            (r"\.ffn\.(fc1|fc2)\.", r".ffn.fn.net.\1."),
        ):
            name = re.sub(pattern, replacement, name)
        return V + "vision_tower." + name
    if key.startswith("model.vision_tower.davit_projector."):
        name = key.removeprefix("model.vision_tower.davit_projector.")
        name = "image_projection" if name == "image_projection.weight" else name
        return V + name.replace("image_position_embed.", "image_pos_embed.")
    if key == "model.vision_tower.prompt_encoder.embed_tokens.weight":
        return V + "language_model.model.shared.weight"
    if key.startswith("model.vision_tower.prompt_encoder."):
        return V + "language_model.model.encoder." + key.removeprefix("model.vision_tower.prompt_encoder.")
    if key.startswith("model.multi_modal_projector.mlp."):
        index, parameter = key.removeprefix("model.multi_modal_projector.mlp.").split(".")
        layer = "0" if index == "0" else f"{int(index) // 2}.1"
        return f"model.mm_projector.encoder_mlp.{layer}.{parameter}"
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    assert key == "lm_head.weight", key
    return key


def original_state_dict(reference: FlorenceVLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The reference weights under the original names, plus the unused Florence-2 decoder and heads."""
    weights = {}
    for key, value in reference.state_dict().items():
        value = value.t() if key.endswith("davit_projector.image_projection.weight") else value
        weights[original_name(key)] = value.clone().contiguous()
    shared = weights[V + "language_model.model.shared.weight"]
    weights[V + "language_model.model.encoder.embed_tokens.weight"] = shared.clone()  # a tied copy, as saved
    weights[V + "language_model.model.decoder.layers.0.fc1.weight"] = torch.randn(48, 24)
    weights[V + "language_model.lm_head.weight"] = shared.clone()
    weights[V + "language_model.final_logits_bias"] = torch.zeros(1, shared.shape[0])
    return weights


def reference_model(llm: str) -> FlorenceVLForConditionalGeneration:
    """Random Florence-VL with the real prompt id rows (so the tiny BART has Florence-2's 51289-token vocab)."""
    florence2 = tiny_florence2_config()
    florence2.text_config.vocab_size = 51289
    torch.manual_seed(1)
    config = tiny_config(llm, vision_config=florence2, vision_prompt_ids=DEFAULT_VISION_PROMPT_IDS)
    return FlorenceVLForConditionalGeneration(config).eval()


def write_original(folder, reference, llava_type: str, weights: dict, tokenizer, *, separate_tower: bool,
                   use_bin: bool):
    """An original Florence-VL folder: LLaVA config, (sharded) weights, vision_tower/ config (and weights)."""
    folder.mkdir()
    text = reference.config.text_config.to_dict()
    text = {key: text[key] for key in TEXT_CONFIGS["phi3" if llava_type == "llava_phi" else "llama"]}
    llava = dict(text, model_type=llava_type, architectures=["LlavaPhiForCausalLM"], mm_projector_type="mlp3x_gelu",
                 mm_hidden_size=24, mm_vision_tower="microsoft/Florence-2-large", tokenizer_padding_side="right",
                 tokenizer_model_max_length=2048, image_aspect_ratio="pad", tune_mm_mlp_adapter=False,
                 use_mm_proj=True, mm_vision_select_layer=-2)
    (folder / "config.json").write_text(json.dumps(llava))
    (folder / "vision_tower").mkdir()
    (folder / "vision_tower" / "config.json").write_text(json.dumps(original_florence2_config(
        reference.config.vision_config)))
    if separate_tower:
        tower = {key.removeprefix(V): weights.pop(key) for key in list(weights) if key.startswith(V)}
        save_file(tower, folder / "vision_tower" / "model.safetensors")
    if use_bin:
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        keys = sorted(weights)
        shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for name, shard_keys in shards.items():
            save_file({key: weights[key] for key in shard_keys}, folder / name)
        index = {"metadata": {}, "weight_map": {key: name for name, shard in shards.items() for key in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    tokenizer.save_pretrained(folder)


def test_convert_sharded_phi3_checkpoint_is_bit_exact(tmp_path):
    reference = reference_model("phi3")
    weights = original_state_dict(reference)
    assert V + "vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.weight" in weights
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= weights.keys()
    write_original(tmp_path / "src", reference, "llava_phi", weights, tiny_tokenizer(), separate_tower=False,
                   use_bin=False)

    report = convert_original(tmp_path / "src", tmp_path / "dst", image_size=64, max_shard_size="2MB")

    assert sorted(report.dropped) == sorted(V + key for key in (
        "language_model.model.decoder.layers.0.fc1.weight", "language_model.lm_head.weight",
        "language_model.final_logits_bias"))
    assert report.unrecognised == [] and report.vocab_resized is None
    files = set(files_to_upload(tmp_path / "dst"))
    assert CODE_FILES | {"config.json", "model.safetensors.index.json", "README.md", "processor_config.json",
                         "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= files
    assert sum(name.endswith(".safetensors") for name in files) > 1
    converted = FlorenceVLForConditionalGeneration.from_pretrained(tmp_path / "dst").eval()
    assert tuple(map(tuple, converted.config.vision_prompt_ids)) == DEFAULT_VISION_PROMPT_IDS
    assert converted.config.image_token_id == IMAGE_TOKEN_ID
    ours, theirs = converted.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key

    processor = FlorenceVLProcessor.from_pretrained(tmp_path / "dst")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
        add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[torch.rand(3, 64, 64)], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(converted(**inputs).logits, reference(**inputs).logits)
    assert converted.generation_config.suppress_tokens == [IMAGE_TOKEN_ID]


def test_convert_bin_with_separate_vision_tower_adds_image_token(tmp_path):
    reference = reference_model("llama")
    tokenizer = llm_tokenizer_without_image_token()  # 264 tokens, fewer than the 272 rows: `<image>` fits, no resize
    weights = original_state_dict(reference)
    write_original(tmp_path / "src", reference, "llava_llama", weights, tokenizer, separate_tower=True, use_bin=True)
    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "src" / "training_args.bin")  # a pickle, not weights

    report = convert_original(tmp_path / "src", tmp_path / "dst", image_size=64)

    assert report.added_tokens == ["<image>"] and "vision_tower/language_model.lm_head.weight" in report.dropped
    converted = FlorenceVLForConditionalGeneration.from_pretrained(tmp_path / "dst")
    assert converted.config.image_token_id == 264
    for key, value in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    assert "<|start_header_id|>" in (tmp_path / "dst" / "chat_template.jinja").read_text()  # the llama3 family


def test_convert_lists_missing_weights(tmp_path, capsys):
    reference = reference_model("phi3")
    weights = original_state_dict(reference)
    del weights["model.mm_projector.encoder_mlp.2.1.weight"], weights["model.layers.1.mlp.down_proj.weight"]
    write_original(tmp_path / "src", reference, "llava_phi", weights, tiny_tokenizer(), separate_tower=False,
                   use_bin=True)
    listed = (r"2 weights .*model\.language_model\.layers\.1\.mlp\.down_proj\.weight.*"
              r"model\.multi_modal_projector\.mlp\.4\.weight")
    with pytest.raises(ValueError, match=listed):
        convert_original(tmp_path / "src", tmp_path / "dst", image_size=64)
    assert main([str(tmp_path / "src"), str(tmp_path / "dst"), "--image-size", "64"]) == 2
    assert re.search(listed, capsys.readouterr().err)
    assert not (tmp_path / "dst").exists()


def test_convert_rejects_an_unknown_checkpoint_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_qwen"}))
    with pytest.raises(ValueError, match="model_type='llava_qwen'.*llava_llama.*llava_phi"):
        convert_original(tmp_path, tmp_path / "dst")


# ------------------------------------------------------------------------------------------ publishing


def test_model_card_metadata_and_usage():
    card = ModelCard(model_card(tiny_config(), base_models=["microsoft/Florence-2-large", "meta-llama/Llama-3.1-8B"],
                                license="mit", repo_id="me/florence-vl"))
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "transformers"
    assert card.data.base_model == ["microsoft/Florence-2-large", "meta-llama/Llama-3.1-8B"]
    assert card.data.license == "mit" and "florence-vl" in card.data.tags
    assert 'repo = "me/florence-vl"' in card.text
    assert "trust_remote_code=True" in card.text


def test_model_push_to_hub_alone_misses_the_processor_code(tmp_path):
    """`model.push_to_hub` commits what `save_pretrained` writes: no processing file although auto_map names it."""
    model = FlorenceVLForConditionalGeneration(tiny_config())
    model.save_pretrained(tmp_path / "model_only")
    files = set(files_to_upload(tmp_path / "model_only"))
    assert {"configuration_florence_vl.py", "modeling_florence_vl.py"} <= files
    assert "processing_florence_vl.py" not in files
    assert json.loads((tmp_path / "model_only" / "config.json").read_text())["auto_map"]["AutoProcessor"].startswith(
        "processing_florence_vl.")
    (tmp_path / "model_only" / ".git").mkdir()
    (tmp_path / "model_only" / ".git" / "HEAD").write_text("ref")
    assert not any(name.startswith(".git") for name in files_to_upload(tmp_path / "model_only"))
