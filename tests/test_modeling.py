"""FlorenceVLForConditionalGeneration: what users rely on (tiny random models, CPU, a few seconds in all)."""

import copy
import logging
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import IMAGE_TOKEN_ID, TEXT_CONFIGS, VOCAB_SIZE, tiny_config, tiny_processor

from florence_vl import FlorenceVLForConditionalGeneration, FlorenceVLProcessor

# Tiny models on a shared 2-core machine: extra intra-op threads only spin and wait (up to 40x slower).

PROMPTS = ["<image>What is this?", "<image>Describe the picture in a few words, please."]
PROMPT_SOURCES = ("caption", "ocr", "grounding")


def random_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def build_model(seed: int = 0, llm: str = "llama", **overrides) -> FlorenceVLForConditionalGeneration:
    torch.manual_seed(seed)
    return FlorenceVLForConditionalGeneration(tiny_config(llm, **overrides)).eval()


def batch_inputs(processor: FlorenceVLProcessor, **kwargs) -> dict[str, torch.Tensor]:
    """Two samples of different lengths and images, left-padded by the processor."""
    images = [random_image(1), random_image(2, (30, 70))]
    return processor(text=PROMPTS, images=images, padding=True, return_tensors="pt", **kwargs)


def labels_for(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)


@pytest.fixture(scope="module")
def model() -> FlorenceVLForConditionalGeneration:
    return build_model()


@pytest.fixture(scope="module")
def processor() -> FlorenceVLProcessor:
    return tiny_processor(tiny_config())


@pytest.fixture(scope="module")
def inputs(processor) -> dict[str, torch.Tensor]:
    inputs = batch_inputs(processor)
    assert inputs["attention_mask"][0, 0] == 0, "the test needs a left-padded first sample"
    return inputs


# ---------------------------------------------------------------------------------------------- forward and loss


@pytest.mark.parametrize("llm", ["llama", "phi3"])
def test_forward_shapes_and_loss_ignores_image_labels(llm, processor, inputs):
    model = build_model(llm=llm)
    labels = labels_for(inputs)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        image_labels_ignored = model(**inputs, labels=labels.masked_fill(labels == IMAGE_TOKEN_ID, -100)).loss
        image_labels_as_text = model(**inputs, labels=labels.masked_fill(labels == IMAGE_TOKEN_ID, 9)).loss

    batch, length = inputs["input_ids"].shape
    assert out.logits.shape == (batch, length, VOCAB_SIZE)
    assert out.image_hidden_states.shape == (2, model.config.num_image_tokens, 32)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.loss == image_labels_ignored  # TRL leaves image ids in the labels: they must not count
    assert out.loss != image_labels_as_text  # ... while other labels at those positions do count


# ------------------------------------------------------------------------------------------------ save and load


def test_save_load_in_process_is_bit_exact(model, processor, inputs, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = FlorenceVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    reference, restored = model.state_dict(), loaded.state_dict()
    assert reference.keys() == restored.keys()
    assert all(torch.equal(reference[name], restored[name]) for name in reference)  # buffers included
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert IMAGE_TOKEN_ID in loaded.generation_config.suppress_tokens


def module_bytes(module: torch.nn.Module) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in [*module.parameters(), *module.buffers()])


def devices_of(device_map: dict[str, str | int], prefix: str) -> set:
    """Devices holding any part of the module `prefix` (an entry for the module, a parent or a child)."""
    return {device for name, device in device_map.items()
            if name == "" or name == prefix or prefix.startswith(name + ".") or name.startswith(prefix + ".")}


def test_device_map_auto_loads_and_offloads_without_splitting_blocks(model, inputs, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        reference = model(**inputs).logits
    placed = FlorenceVLForConditionalGeneration.from_pretrained(tmp_path / "saved", device_map="auto").eval()
    # a CPU budget below the model's size (the vision tower is ~60 % of this tiny one) puts the rest of the LLM on
    # disk, split only between `_no_split_modules`
    offloaded = FlorenceVLForConditionalGeneration.from_pretrained(
        tmp_path / "saved", device_map="auto", max_memory={"cpu": int(module_bytes(model) * 0.9)},
        offload_folder=tmp_path / "off",
    ).eval()
    assert offloaded.hf_device_map["model.vision_tower"] == "cpu" and "disk" in offloaded.hf_device_map.values()
    assert not any(name.startswith("model.vision_tower.") for name in offloaded.hf_device_map), \
        "the vision tower must stay one piece"
    with torch.no_grad():
        assert torch.equal(placed(**inputs).logits, reference)
        torch.testing.assert_close(offloaded(**inputs).logits, reference)


def test_device_map_never_splits_the_vision_tower_even_when_it_does_not_fit(model, inputs, tmp_path):
    """A CPU budget of 90 % of the vision tower: split freely, DaViT's first blocks would land on the CPU and the
    rest of the tower on disk. `_no_split_modules` sends the whole tower to the next device instead."""
    model.save_pretrained(tmp_path / "saved")
    tower = model.model.vision_tower
    budget = int(module_bytes(tower) * 0.9)
    assert budget > module_bytes(tower.davit.convs) + module_bytes(tower.davit.blocks[0]), "a split must be possible"
    offloaded = FlorenceVLForConditionalGeneration.from_pretrained(
        tmp_path / "saved", device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "off").eval()
    device_map = offloaded.hf_device_map
    assert len(devices_of(device_map, "model.vision_tower")) == 1, f"the vision tower was split: {device_map}"
    assert devices_of(device_map, "model.vision_tower") == {"disk"}
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**inputs).logits, model(**inputs).logits)


FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel

    folder, reference_file, report_file = sys.argv[1], sys.argv[2], sys.argv[3]
    reference = torch.load(reference_file, weights_only=True)
    try:
        AutoModelForImageTextToText.from_pretrained(folder)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    report = {"refusal": refusal, "loaded": {}}
    for auto_class in (AutoModelForImageTextToText, AutoModel, AutoModelForCausalLM):
        model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(**reference["inputs"]).logits
        diff = (logits - reference["logits"]).abs().max().item()
        print(auto_class.__name__, "max abs diff", diff, file=sys.stderr)
        report["loaded"][auto_class.__name__] = {
            "class": type(model).__name__, "module": type(model).__module__, "max_abs_diff": diff}
    with torch.no_grad():
        out = model(**reference["inputs"])
    report["image_outputs_pooler_shape"] = list(out.image_outputs.pooler_output.shape)
    report["vision_tower_is_pretrained_model"] = isinstance(model.model.vision_tower, PreTrainedModel)
    mixed = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, attn_implementation={
        "text_config": "eager", "vision_config": {"vision_config": "flash_attention_2", "text_config": "eager"}})
    tower = mixed.model.vision_tower
    report["attention"] = {"davit": tower.davit.config._attn_implementation,
                           "bart": tower.prompt_encoder.config._attn_implementation,
                           "llm": mixed.model.language_model.config._attn_implementation}
    report["florence_vl_imported"] = any(name.split(".")[0] == "florence_vl" for name in sys.modules)
    with open(report_file, "w") as handle:
        json.dump(report, handle)
""")


def test_fresh_process_loads_with_trust_remote_code_bit_exact(model, processor, inputs, tmp_path):
    """A process that never imports this package loads the saved folder from its copied code."""
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"inputs": dict(inputs), "logits": logits}, tmp_path / "reference.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(folder), str(tmp_path / "reference.pt"),
         str(tmp_path / "report.json")],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())

    assert report["refusal"] is not None and "trust_remote_code=True" in report["refusal"]
    assert not report["florence_vl_imported"]
    assert set(report["loaded"]) == {"AutoModelForImageTextToText", "AutoModel", "AutoModelForCausalLM"}
    for loaded in report["loaded"].values():
        assert loaded["class"] == "FlorenceVLForConditionalGeneration"  # AutoModel too (lmms-eval)
        assert loaded["module"].startswith("transformers_modules")
        assert loaded["max_abs_diff"] == 0.0
    assert report["vision_tower_is_pretrained_model"]
    assert report["image_outputs_pooler_shape"] == [2, model.config.num_image_tokens, 32]
    assert report["attention"] == {"davit": "sdpa", "bart": "eager", "llm": "eager"}  # DaViT never on flash


# --------------------------------------------------------------------------------------------------- generation


def count_vision_calls(model: FlorenceVLForConditionalGeneration) -> tuple[dict[str, int], list]:
    calls = {"davit": 0, "prompt_encoder": 0}
    tower = model.model.vision_tower

    def counter(name):
        return lambda *args: calls.__setitem__(name, calls[name] + 1)

    handles = [tower.davit.register_forward_hook(counter("davit")),
               tower.prompt_encoder.register_forward_hook(counter("prompt_encoder"))]
    return calls, handles


@pytest.mark.parametrize("batch_vision_prompts", [True, False])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_vision_runs_once_per_generate_and_output_starts_with_prompt(batch_vision_prompts, num_beams, inputs):
    model = build_model(batch_vision_prompts=batch_vision_prompts)
    calls, handles = count_vision_calls(model)
    try:
        output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                num_beams=num_beams, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    assert calls["davit"] == 1
    assert calls["prompt_encoder"] == (1 if batch_vision_prompts else len(PROMPT_SOURCES))
    prompt_length = inputs["input_ids"].shape[1]
    assert output.shape == (2, prompt_length + 4)
    assert torch.equal(output[:, :prompt_length], inputs["input_ids"])


@pytest.mark.parametrize("llm", ["llama", "phi3"])
def test_batched_generation_equals_one_by_one(llm, processor):
    model = build_model(llm=llm)
    images = [random_image(1), random_image(2, (30, 70))]
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    batch = processor(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0, "prompts of different lengths must be padded"
    batched = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1]:]
    for index, (prompt, image) in enumerate(zip(PROMPTS, images)):
        single = processor(text=prompt, images=image, return_tensors="pt")
        alone = model.generate(**single, **settings)[0, single["input_ids"].shape[1]:]
        assert batched[index].tolist() == alone.tolist(), f"sample {index}"


def image_token_favouring_model(inputs) -> FlorenceVLForConditionalGeneration:
    """A random model whose `<image>` logit is the largest at the end of both prompts (the first seed that gives it)."""
    for seed in range(20):
        model = build_model(seed)
        with torch.no_grad():
            model.lm_head.weight[IMAGE_TOKEN_ID] = 10.0 * model.lm_head.weight.abs().max()
            if (model(**inputs).logits[:, -1].argmax(-1) == IMAGE_TOKEN_ID).all():
                return model
    raise AssertionError("no seed in 0..19 makes <image> the favourite")


def assert_never_generates_image_token(model: FlorenceVLForConditionalGeneration, inputs, **settings) -> None:
    with torch.no_grad():
        last_logits = model(**inputs).logits[:, -1]
    assert (last_logits.argmax(-1) == IMAGE_TOKEN_ID).all(), "the bias must make <image> the favourite"
    prompt_length = inputs["input_ids"].shape[1]
    new_tokens = model.generate(**inputs, max_new_tokens=5, **settings)[:, prompt_length:]
    assert IMAGE_TOKEN_ID not in new_tokens.flatten().tolist(), settings


@pytest.mark.parametrize("settings", [dict(do_sample=False), dict(do_sample=True, top_k=0),
                                      dict(do_sample=False, num_beams=2)], ids=["greedy", "sample", "beam"])
def test_image_token_is_never_generated(settings, inputs):
    assert_never_generates_image_token(image_token_favouring_model(inputs), inputs, **settings)


def test_image_token_is_never_generated_whatever_the_generation_config(inputs, tmp_path):
    """Also for a checkpoint saved without generation_config.json, and when the caller suppresses other tokens."""
    image_token_favouring_model(inputs).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    model = FlorenceVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_never_generates_image_token(model, inputs, do_sample=False)
    assert_never_generates_image_token(model, inputs, do_sample=False, suppress_tokens=[9])


# ------------------------------------------------------------------------------------------------------- fusion

SUBSETS = [("image",) + PROMPT_SOURCES, ("image",), PROMPT_SOURCES, ("image", "ocr"),
           ("caption",), ("ocr",), ("grounding",)]


@pytest.mark.parametrize("sources", SUBSETS, ids="+".join)
@pytest.mark.parametrize("fusion_mode", ["channel_concat", "token_concat", "average"])
def test_every_fusion_mode_and_feature_subset(fusion_mode, sources):
    model = build_model(fusion_mode=fusion_mode, vision_feature_sources=sources)
    config = model.config
    dim = config.vision_config.vision_config.projection_dim
    expected_width = dim * len(sources) if fusion_mode == "channel_concat" else dim
    expected_tokens = 5 * len(sources) if fusion_mode == "token_concat" else 5
    assert config.num_image_tokens == expected_tokens

    widths = []
    first_layer = model.model.multi_modal_projector.mlp[0]
    handle = first_layer.register_forward_hook(lambda module, args, output: widths.append(args[0].shape))
    inputs = tiny_processor(config)(text="<image>Hi", images=random_image(3), return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    handle.remove()
    assert first_layer.in_features == expected_width
    assert widths == [torch.Size([1, expected_tokens, expected_width])]
    assert out.image_hidden_states.shape == (1, expected_tokens, 32)
    assert torch.isfinite(out.logits).all()


def test_channel_order_is_image_then_prompts_in_config_order():
    """[V, V_caption, V_ocr, V_grounding], whatever order the sources are listed in."""
    model = build_model(vision_feature_sources=("grounding", "image", "ocr", "caption"))
    tower = model.model.vision_tower
    pixel_values = tiny_processor(model.config)(text="<image>", images=random_image(4), return_tensors="pt")[
        "pixel_values"]
    fused = []
    handle = model.model.multi_modal_projector.mlp[0].register_forward_hook(
        lambda module, args, output: fused.append(args[0]))
    with torch.no_grad():
        model.model.get_image_features(pixel_values)
        image_embeds = tower.davit_projector(tower.davit(pixel_values).last_hidden_state)
        ids = torch.tensor(model.config.vision_prompt_ids)
        expected = [image_embeds]
        for row in range(3):
            prompt = tower.prompt_encoder.embed_tokens(ids[row : row + 1])
            encoded = tower.prompt_encoder(inputs_embeds=torch.cat([image_embeds, prompt], dim=1)).last_hidden_state
            expected.append(encoded[:, : image_embeds.shape[1]])
    handle.remove()
    torch.testing.assert_close(fused[0], torch.cat(expected, dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sources", [("image",) + PROMPT_SOURCES, ("ocr", "grounding")], ids="+".join)
def test_per_prompt_encoding_equals_batched(sources, inputs):
    batched = build_model(vision_feature_sources=sources, batch_vision_prompts=True)
    per_prompt = build_model(seed=1, vision_feature_sources=sources, batch_vision_prompts=False)
    per_prompt.load_state_dict(batched.state_dict())
    with torch.no_grad():
        expected = batched.get_image_features(inputs["pixel_values"]).pooler_output
        actual = per_prompt.get_image_features(inputs["pixel_values"]).pooler_output
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ training

PARAMETER_GROUPS = {
    "DaViT": "model.vision_tower.davit.",
    "Florence-2 projection": "model.vision_tower.davit_projector.",
    "BART prompt encoder": "model.vision_tower.prompt_encoder.",
    "DBFusion projector": "model.multi_modal_projector.",
    "LLM": "model.language_model.",
    "LM head": "lm_head.",
}


def test_gradient_reaches_every_parameter(inputs):
    model = build_model().train()
    model(**inputs, labels=labels_for(inputs)).loss.backward()
    parameters = dict(model.named_parameters())
    for group, prefix in PARAMETER_GROUPS.items():
        names = [name for name in parameters if name.startswith(prefix)]
        assert names, f"no parameters under {prefix}"
        no_grad = [name for name in names if parameters[name].grad is None or not parameters[name].grad.any()]
        assert not no_grad, f"{group}: no gradient for {no_grad}"
    assert set(parameters) == {name for name in parameters if name.startswith(tuple(PARAMETER_GROUPS.values()))}


@pytest.mark.parametrize("llm", ["llama", "phi3"])
def test_bf16_weights_beside_float32_buffers_train_like_the_all_bf16_model(llm, inputs):
    """DeepSpeed's bf16 casts the parameters and leaves the buffers (Florence-2's position table, the LLM's rotary
    frequencies) in float32: forward and backward must run so and give the all-bf16 model's loss."""
    all_bf16 = build_model(llm=llm).to(torch.bfloat16).train()
    model = build_model(llm=llm).train()
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    assert {buffer.dtype for buffer in model.buffers()} == {torch.float32}
    loss = model(**inputs, labels=labels_for(inputs)).loss
    loss.backward()
    assert all(parameter.grad is not None and parameter.grad.dtype == torch.bfloat16
               for parameter in model.parameters())
    expected = all_bf16(**inputs, labels=labels_for(inputs)).loss
    assert torch.isfinite(loss) and abs(loss.item() - expected.item()) <= 0.02 * expected.item()


@pytest.mark.parametrize("hidden_size", [32, 128, 1024])
def test_fresh_projector_keeps_the_scale_of_the_vision_features(hidden_size):
    """A new projector (random init, or `from_pretrained_parts`) passes image features on at about their scale.

    With transformers' default N(0, 0.02) for every Linear, each of its three layers at width 128 scaled features
    by ~0.2 (output std 0.003 for unit inputs): the LLM then ignored the image for hundreds of steps and the tiny
    recipe stayed on the text-prior plateau for some seeds (README, "What made it learn").
    """
    torch.manual_seed(0)
    text_config = dict(TEXT_CONFIGS["llama"], hidden_size=hidden_size, intermediate_size=2 * hidden_size)
    model = FlorenceVLForConditionalGeneration(tiny_config(text_config=text_config))
    projector = model.model.multi_modal_projector
    features = [torch.randn(64, 5, model.config.vision_config.vision_config.projection_dim) for _ in range(4)]
    with torch.no_grad():
        ratio = (projector(features).std() / torch.cat(features, -1).std()).item()
    assert 0.1 < ratio < 3.0, f"projector output/input std = {ratio:.4f} at hidden size {hidden_size}"
    assert model.model.language_model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.1)  # LLM untouched


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(inputs):
    model = build_model().train()
    labels = labels_for(inputs)
    layer_calls = []  # checkpointed layers run again in backward (pre-hooks: the recompute may stop early)
    model.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *args: layer_calls.append("llm"))
    model.model.vision_tower.prompt_encoder.layers[0].fc1.register_forward_pre_hook(
        lambda *args: layer_calls.append("bart"))

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        layer_calls.clear()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss, grads = step()
    assert sorted(layer_calls) == ["bart", "llm"]
    model.activation_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = step()
    assert sorted(layer_calls) == ["bart", "bart", "llm", "llm"], "backward must recompute the checkpointed layers"
    torch.testing.assert_close(checkpointed_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------- bad inputs


def test_placeholder_count_mismatch_names_both_numbers(model, inputs):
    input_ids = inputs["input_ids"].clone()
    first_placeholder = (input_ids[1] == IMAGE_TOKEN_ID).nonzero()[0, 0]
    input_ids[1, first_placeholder] = 9  # 9 placeholders left for 2 images x 5 features
    with pytest.raises(ValueError, match=r"9 `<image>` placeholder tokens .* 10 image features"):
        model(input_ids=input_ids, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match=r"10 `<image>` placeholder tokens .* 5 image features"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:1]})


@pytest.mark.parametrize("overrides, message", [
    (dict(fusion_mode="bad"), r"fusion_mode='bad'"),
    (dict(vision_feature_sources=()), r"vision_feature_sources=\(\)"),
    (dict(vision_feature_sources=("image", "depth")), r"vision_feature_sources=\('image', 'depth'\)"),
    (dict(vision_prompt_ids=((0, 5, 2), (0, 2), (0, 7, 2))), r"vision_prompt_ids rows have lengths \[3, 2, 3\]"),
    (dict(projector_depth=0), r"projector_depth=0"),
], ids=["fusion_mode", "no_sources", "unknown_source", "ragged_prompt_ids", "projector_depth"])
def test_invalid_config_raises_naming_field_and_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


# ------------------------------------------------------------------------------------- transformers conventions


def test_inputs_embeds_gives_the_same_logits_as_input_ids(model, inputs):
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_ids = model(**inputs).logits
        from_embeds = model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"],
                            attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(from_embeds, from_ids, rtol=0, atol=1e-6)


def test_return_dict_false_gives_tuples(model, inputs):
    labels = labels_for(inputs)
    with torch.no_grad():
        as_dict = model(**inputs, labels=labels)
        as_tuple = model(**inputs, labels=labels, return_dict=False)
        features = model.get_image_features(inputs["pixel_values"], return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(features, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert torch.equal(features[1], as_dict.image_hidden_states)  # (last_hidden_state, pooler_output)


def test_get_image_features_returns_hidden_states_on_request(model, inputs):
    with torch.no_grad():
        plain = model.get_image_features(inputs["pixel_values"])
        detailed = model.get_image_features(inputs["pixel_values"], output_hidden_states=True)
    assert plain.hidden_states is None
    assert len(detailed.hidden_states) > 1
    assert all(isinstance(state, torch.Tensor) and state.shape[0] == 2 for state in detailed.hidden_states)
    assert detailed.pooler_output.shape == (2, 5, 32)
    assert torch.equal(detailed.pooler_output, plain.pooler_output)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_eager_and_sdpa_agree(padding_side, model, processor):
    inputs = batch_inputs(processor, padding_side=padding_side)
    # a copy: `_from_config` writes the implementation into the shared sub-configs (LLaVA does the same)
    config = copy.deepcopy(model.config)
    eager = FlorenceVLForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    assert eager.model.language_model.config._attn_implementation == "eager"
    assert eager.model.vision_tower.prompt_encoder.config._attn_implementation == "eager"
    assert model.model.language_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa_logits, eager_logits = model(**inputs).logits, eager(**inputs).logits
    attended = inputs["attention_mask"].bool()
    torch.testing.assert_close(eager_logits[attended], sdpa_logits[attended], rtol=1e-4, atol=1e-5)


def test_resize_token_embeddings_keeps_old_logits_and_trains_new_tokens(inputs):
    model = build_model()
    with torch.no_grad():
        before = model(**inputs).logits
    model.resize_token_embeddings(VOCAB_SIZE + 8)
    assert model.get_input_embeddings().num_embeddings == VOCAB_SIZE + 8
    assert model.lm_head.out_features == VOCAB_SIZE + 8
    assert model.config.text_config.vocab_size == VOCAB_SIZE + 8
    labels = labels_for(inputs)
    labels[:, -1] = VOCAB_SIZE + 3  # a new token as a target
    out = model(**inputs, labels=labels)
    assert out.logits.shape[-1] == VOCAB_SIZE + 8 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits[..., :VOCAB_SIZE].detach(), before, rtol=0, atol=1e-6)


def test_multimodal_outputs_are_returned(model, inputs):
    """`image_outputs` as in transformers' native VLMs; `image_hidden_states` still answers (deprecated, as LLaVA)."""
    with torch.no_grad():
        out = model(**inputs)
        detailed = model(**inputs, output_hidden_states=True)
        text_only = model(input_ids=torch.tensor([[1, 20, 21]]))
        features = model.get_image_features(inputs["pixel_values"])
    image_outputs = out.image_outputs
    assert image_outputs.last_hidden_state.shape == (2, 32, 2, 2)  # DaViT: last stage width 32, 2x2 grid
    assert torch.equal(image_outputs.pooler_output, features.pooler_output)
    assert image_outputs.pooler_output.shape == (2, model.config.num_image_tokens, 32)
    assert len(image_outputs.source_features) == len(model.config.feature_sources)
    assert image_outputs.hidden_states is None and len(detailed.image_outputs.hidden_states) > 1
    assert text_only.image_outputs is None
    assert "image_hidden_states" not in out.keys()
    assert torch.equal(out.image_hidden_states, image_outputs.pooler_output)


def attention_by_part(model: FlorenceVLForConditionalGeneration) -> dict[str, str]:
    """The implementation each attention layer will run, read from the config it reads at forward time."""
    parts = {"davit": "model.vision_tower.davit.", "bart": "model.vision_tower.prompt_encoder.",
             "llm": "model.language_model."}
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "config"):
            part = next(part for part, prefix in parts.items() if name.startswith(prefix))
            found.setdefault(part, set()).add(module.config._attn_implementation)
    assert set(found) == set(parts), found
    assert all(len(choices) == 1 for choices in found.values()), found
    return {part: choices.pop() for part, choices in found.items()}


def test_sdpa_can_dispatch_composite_models(model, tmp_path):
    """transformers' common test: each sub-model is a PreTrainedModel that takes the requested implementation."""
    from transformers import PreTrainedModel

    model.save_pretrained(tmp_path)
    sdpa = FlorenceVLForConditionalGeneration.from_pretrained(tmp_path).model
    eager = FlorenceVLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").model
    for submodel in (sdpa.vision_tower, sdpa.language_model):
        assert isinstance(submodel, PreTrainedModel) and submodel._supports_sdpa
        assert submodel.config._attn_implementation == "sdpa"
    assert sdpa.vision_tower.config is sdpa.config.vision_config
    assert eager.vision_tower.config._attn_implementation == eager.language_model.config._attn_implementation == "eager"
    sdpa_layers = [name for name, module in eager.named_modules() if type(module).__name__.endswith("Attention")
                   and getattr(module, "config", None) and module.config._attn_implementation == "sdpa"]
    assert not sdpa_layers, "the eager model must have no SDPA attention layers"


FLASH = "flash_attention_2"
ATTENTION_REQUESTS = {
    "eager": ("eager", dict.fromkeys(("davit", "bart", "llm"), "eager")),
    "sdpa": ("sdpa", dict.fromkeys(("davit", "bart", "llm"), "sdpa")),
    "per_sub_config": ({"text_config": "eager", "vision_config": "sdpa"},
                       {"davit": "sdpa", "bart": "sdpa", "llm": "eager"}),
    "flash_for_davit_only": ({"text_config": "sdpa", "vision_config": {"vision_config": FLASH, "text_config": "eager"}},
                             {"davit": "sdpa", "bart": "eager", "llm": "sdpa"}),
    "flex": ("flex_attention", {"davit": "sdpa", "bart": "flex_attention", "llm": "flex_attention"}),
    "flash": (FLASH, {"davit": "sdpa", "bart": FLASH, "llm": FLASH}),
}


@pytest.mark.parametrize("request_name", list(ATTENTION_REQUESTS))
def test_attention_implementation_per_sub_model(request_name, model, tmp_path, caplog):
    """What every attention layer runs; DaViT never gets FlashAttention or flex attention (head dim = tokens)."""
    from transformers.utils import is_flash_attn_2_available

    requested, expected = ATTENTION_REQUESTS[request_name]
    if request_name == "flash" and not (is_flash_attn_2_available() and torch.cuda.is_available()):
        pytest.skip("flash-attn is not installed (or no CUDA): transformers refuses flash_attention_2 for the LLM "
                    "before any module is built; the DaViT fallback is covered by 'flash_for_davit_only'.")
    model.save_pretrained(tmp_path)
    logging.Logger.info_once.cache_clear()
    with caplog.at_level(logging.INFO):
        loaded = FlorenceVLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=requested)
    assert attention_by_part(loaded) == expected
    davit_fell_back = "DaViT runs on sdpa" in caplog.text
    assert davit_fell_back == (request_name in ("flash_for_davit_only", "flex", "flash")), caplog.text
    assert not loaded.model.vision_tower.davit._supports_flash_attn
    assert loaded.model.vision_tower._supports_flash_attn and loaded._supports_flash_attn  # BART and the LLM do


def test_set_attn_implementation_keeps_davit_off_flash(model, inputs):
    changed = copy.deepcopy(model)
    changed.set_attn_implementation({"vision_config": {"vision_config": FLASH, "text_config": "eager"},
                                     "text_config": "eager"})
    assert attention_by_part(changed) == {"davit": "sdpa", "bart": "eager", "llm": "eager"}
    assert attention_by_part(model) == dict.fromkeys(("davit", "bart", "llm"), "sdpa")  # the copy only
    attended = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(changed(**inputs).logits[attended], model(**inputs).logits[attended],
                                   rtol=1e-4, atol=1e-5)


def test_davit_channel_attention_in_place_equals_transformers(model):
    """Our channel attention (FlorenceVLChannelAttention) gives transformers' DaViT output from the same weights,
    through every stage, and keeps its state-dict keys (checkpoints load either way)."""
    from transformers.models.florence2.modeling_florence2 import Florence2VisionBackbone

    ours = model.model.vision_tower.davit
    stock = Florence2VisionBackbone(ours.config).eval()
    assert stock.load_state_dict(ours.state_dict()).missing_keys == []
    assert {type(m).__name__ for m in ours.modules()} >= {"FlorenceVLChannelAttention"}
    side = model.config.image_size
    pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels).last_hidden_state, stock(pixels).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_compiled_forward_with_static_cache_generates_like_eager(processor):
    """`torch.compile(fullgraph=True)` traces prefill (with the placeholder check) and decode without graph breaks."""
    model = build_model()
    single = processor(text=PROMPTS[0], images=random_image(1), return_tensors="pt")
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static")
    eager = model.generate(**single, **settings)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    compiled = model.generate(**single, **settings)
    assert compiled.tolist() == eager.tolist()
