"""FlorenceVLProcessor: images of every kind, `<image>` expansion, errors, chat templates, save/load."""

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import IMAGE_TOKEN_ID, tiny_config, tiny_processor, tiny_tokenizer
from tokenizers.processors import TemplateProcessing

from florence_vl import CHAT_TEMPLATES, FlorenceVLProcessor
from florence_vl.processing_florence_vl import florence2_image_processor


NUM_IMAGE_TOKENS = 5  # tiny_config(): 64-px images, a 2x2 grid + 1 pooled token
IMAGE_SHAPE = (3, 64, 64)
BOS_ID = 1


@pytest.fixture(scope="module")
def processor() -> FlorenceVLProcessor:
    return tiny_processor(tiny_config())


def pixel_values(processor: FlorenceVLProcessor, image) -> torch.Tensor:
    return processor(text="<image>", images=image, return_tensors="pt")["pixel_values"]


def gradient_image(size: tuple[int, int] = (40, 30)) -> Image.Image:
    """An RGB image whose halves, rows and channels all differ (so flips and transposes show)."""
    width, height = size
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([x * 255 // width, y * 255 // height, (x < width // 3) * 200], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


# --------------------------------------------------------------------------------------------- `<image>` expansion


@pytest.mark.parametrize("size", [(1, 1), (30, 70), (10000, 4000)], ids=lambda size: f"{size[0]}x{size[1]}")
def test_one_image_token_becomes_num_image_tokens_placeholders(processor, size):
    inputs = processor(text="<image>What is it?", images=Image.new("RGB", size, (10, 200, 30)), return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert (ids == IMAGE_TOKEN_ID).sum() == NUM_IMAGE_TOKENS
    assert torch.equal(ids[:NUM_IMAGE_TOKENS], torch.full((NUM_IMAGE_TOKENS,), IMAGE_TOKEN_ID))
    assert processor.tokenizer.decode(ids[NUM_IMAGE_TOKENS:]) == "What is it?"
    assert inputs["pixel_values"].shape == (1, *IMAGE_SHAPE) and torch.isfinite(inputs["pixel_values"]).all()


def test_every_image_token_of_every_sample_is_expanded(processor):
    images = [[gradient_image(), Image.new("RGB", (9, 9))], [Image.new("L", (70, 30), 40)]]
    inputs = processor(text=["<image>A<image>B", "<image>C"], images=images, padding=True, return_tensors="pt")
    assert ((inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1) == torch.tensor([2, 1]) * NUM_IMAGE_TOKENS).all()
    assert inputs["pixel_values"].shape == (3, *IMAGE_SHAPE)


def test_token_concat_config_gives_more_placeholders():
    config = tiny_config(fusion_mode="token_concat")
    processor = tiny_processor(config)
    inputs = processor(text="<image>Hi", images=gradient_image(), return_tensors="pt")
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum() == config.num_image_tokens == 4 * NUM_IMAGE_TOKENS


@pytest.mark.parametrize("fusion_mode", ["channel_concat", "token_concat"])
def test_serving_frameworks_get_the_token_count_the_processor_inserts(fusion_mode):
    """`_get_num_multimodal_tokens` (read by vLLM and TGI) equals the placeholders of each image, whatever its size."""
    processor = tiny_processor(tiny_config(fusion_mode=fusion_mode))
    sizes = [(64, 64), (30, 70), (4000, 10)]  # (height, width)
    counted = processor._get_num_multimodal_tokens(image_sizes=sizes)
    inserted = [int((processor(text="<image>", images=Image.new("RGB", (w, h)), return_tensors="pt")["input_ids"]
                     == IMAGE_TOKEN_ID).sum()) for h, w in sizes]
    assert counted.num_image_tokens == inserted and counted.num_image_patches == [1, 1, 1]
    assert "num_image_tokens" not in processor._get_num_multimodal_tokens()


def test_pads_on_the_left_by_default(processor):
    inputs = processor(text=["<image>Hi", "<image>A longer prompt"], images=[gradient_image()] * 2, padding=True,
                       return_tensors="pt")
    mask = inputs["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()


# ------------------------------------------------------------------------------------------------------- images


def palette_image(size: tuple[int, int], transparent: bool = False) -> Image.Image:
    image = Image.new("P", size, 0)
    image.putpalette([200, 50, 100] + [0] * 765)
    if transparent:
        image.info["transparency"] = 0
    return image


SIZE = (48, 20)
PIL_MODES = {  # mode: (image, the RGB colour it must become; None = only finite and shaped)
    "L": (Image.new("L", SIZE, 100), (100, 100, 100)),
    "LA": (Image.new("LA", SIZE, (100, 255)), (100, 100, 100)),
    "P": (palette_image(SIZE), (200, 50, 100)),
    "P-transparent": (palette_image(SIZE, transparent=True), (255, 255, 255)),
    "RGBA": (Image.new("RGBA", SIZE, (200, 50, 100, 255)), (200, 50, 100)),
    "CMYK": (Image.new("CMYK", SIZE, (0, 0, 0, 155)), (100, 100, 100)),
    "I;16": (Image.new("I;16", SIZE, 100 * 257), (100, 100, 100)),
    "1": (Image.new("1", SIZE, 1), (255, 255, 255)),
    "F": (Image.new("F", SIZE, 0.5), None),
    "RGB": (Image.new("RGB", SIZE, (200, 50, 100)), (200, 50, 100)),
}


@pytest.mark.parametrize("mode", PIL_MODES)
def test_every_pil_mode_becomes_the_right_rgb_image(processor, mode):
    image, colour = PIL_MODES[mode]
    values = pixel_values(processor, image)
    assert values.shape == (1, *IMAGE_SHAPE) and torch.isfinite(values).all()
    if colour is not None:
        torch.testing.assert_close(values, pixel_values(processor, Image.new("RGB", SIZE, colour)))


def test_transparent_rgba_becomes_white(processor):
    white = pixel_values(processor, Image.new("RGB", SIZE, "white"))
    torch.testing.assert_close(pixel_values(processor, Image.new("RGBA", SIZE, (0, 0, 0, 0))), white)
    assert not torch.allclose(pixel_values(processor, Image.new("RGB", SIZE, "black")), white)


def test_sixteen_bit_full_scale_becomes_white(processor):
    white = pixel_values(processor, Image.new("RGB", SIZE, "white"))
    torch.testing.assert_close(pixel_values(processor, Image.new("I;16", SIZE, 65535)), white)


def test_exif_orientation_is_honoured(processor):
    image = gradient_image()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    tagged = Image.open(io.BytesIO(buffer.getvalue()))
    upright = image.transpose(Image.Transpose.ROTATE_270)
    assert upright.size == (30, 40)
    torch.testing.assert_close(pixel_values(processor, tagged), pixel_values(processor, upright))
    assert not torch.allclose(pixel_values(processor, image), pixel_values(processor, upright))


def test_paths_keep_alpha_and_bit_depth(processor, tmp_path):
    """A file path gets the same conversion as the opened image (no early RGB conversion by a loader)."""
    white = pixel_values(processor, Image.new("RGB", SIZE, "white"))
    for name, image in {"transparent.png": Image.new("RGBA", SIZE, (0, 0, 0, 0)),
                        "sixteen_bit.png": Image.new("I;16", SIZE, 65535)}.items():
        image.save(tmp_path / name)
        torch.testing.assert_close(pixel_values(processor, str(tmp_path / name)), white, msg=name)


def test_arrays_and_tensors_match_the_equivalent_pil_image(processor):
    image = gradient_image()
    hwc = np.asarray(image)
    reference = pixel_values(processor, image)
    for name, array in {
        "numpy HWC uint8": hwc,
        "numpy CHW float": hwc.transpose(2, 0, 1).astype(np.float32) / 255,
        "torch CHW float": torch.from_numpy(hwc).permute(2, 0, 1).float() / 255,
        "torch CHW uint8": torch.from_numpy(hwc).permute(2, 0, 1).contiguous(),
    }.items():
        torch.testing.assert_close(pixel_values(processor, array), reference, msg=name)
    gray = np.asarray(image.convert("L"))
    torch.testing.assert_close(pixel_values(processor, gray), pixel_values(processor, Image.fromarray(gray)))


@pytest.fixture
def unreadable(tmp_path) -> dict[str, object]:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    buffer = io.BytesIO()
    gradient_image().save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return {
        "non-image path": str(text_file),
        "truncated PNG path": str(truncated),
        "truncated PNG opened": Image.open(truncated),
        "5-D array": np.zeros((2, 2, 2, 2, 2), dtype=np.uint8),
    }


@pytest.mark.parametrize("kind", ["non-image path", "truncated PNG path", "truncated PNG opened", "5-D array"])
def test_unreadable_image_raises_naming_the_item(processor, unreadable, kind):
    item = unreadable[kind]
    with pytest.raises((ValueError, TypeError)) as error:
        processor(text=["<image>a", "<image>b"], images=[gradient_image(), item], return_tensors="pt")
    message = str(error.value)
    assert "images[1]" in message or (isinstance(item, str) and item in message), message


# --------------------------------------------------------------------------------------------------------- errors


def test_image_count_mismatch_names_both_counts(processor):
    with pytest.raises(ValueError, match=r"2 <image> tokens and 1 images"):
        processor(text="<image>A<image>B", images=[gradient_image()])
    with pytest.raises(ValueError, match=r"1 <image> tokens and 2 images"):
        processor(text="<image>A", images=[gradient_image(), gradient_image()])


def test_per_sample_image_count_mismatch_names_the_sample(processor):
    image = gradient_image()
    with pytest.raises(ValueError, match=r"Sample 0 has 1 <image> tokens in its text but 2 images"):
        processor(text=["<image>A", "<image><image>B"], images=[[image, image], [image]], padding=True)


def test_truncation_inside_placeholders_raises(processor):
    with pytest.raises(ValueError, match=r"Mismatch in `image` token count .* Got ids=\[3\] and text=\[5\]"):
        processor(text="<image>Hello", images=gradient_image(), truncation=True, max_length=3)
    kept = processor(text="<image>Hello", images=gradient_image(), truncation=True, max_length=7)
    assert kept["input_ids"][0] == [IMAGE_TOKEN_ID] * NUM_IMAGE_TOKENS + processor.tokenizer.encode("He")


# ------------------------------------------------------------------------------------------------- lmms-eval call


def test_empty_videos_and_audio_are_ignored(processor):
    images = [gradient_image(), Image.new("RGB", (5, 5))]
    plain = processor(text=["<image>a", "<image>bb"], images=images, padding=True, return_tensors="pt")
    with_empty = processor(text=["<image>a", "<image>bb"], images=images, videos=[], audio=[], padding=True,
                           return_tensors="pt")
    assert all(torch.equal(plain[key], with_empty[key]) for key in plain)


def test_lmms_eval_call_with_audios_keyword(processor):
    """lmms-eval's generic wrapper passes `audios=[]` (the old keyword name) along with `videos=[]`."""
    images = [gradient_image(), Image.new("RGB", (5, 5))]
    plain = processor(text=["<image>a", "<image>bb"], images=images, padding=True, return_tensors="pt")
    lmms_eval = processor(text=["<image>a", "<image>bb"], images=images, videos=[], audios=[], padding=True,
                          return_tensors="pt")
    assert all(torch.equal(plain[key], lmms_eval[key]) for key in plain)


def test_batch_decode_and_post_process(processor):
    ids = processor(text=["<image>Hi there"], images=[gradient_image()], return_tensors="pt")["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["Hi there"]
    assert processor.post_process_image_text_to_text(ids) == ["Hi there"]


# ------------------------------------------------------------------------------------------------ chat templates

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
    {"role": "assistant", "content": "Yes."},
]
PHI3_SYSTEM = "<|system|>\nYou are a helpful AI assistant.<|end|>"
LLAMA3_SYSTEM = ("<s><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and "
                 "an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to "
                 "the user's questions.<|eot_id|>")
RENDERED = {  # the original's conversation templates (llava/conversation.py); tests/test_fidelity.py checks ids
    "phi3": PHI3_SYSTEM + "\n<|user|>\n<image>\nWhat is it?<|end|>\n<|assistant|>\nA cat.<|end|>"
            "\n<|user|>\nSure?<|end|>\n<|assistant|>\nYes.<|end|>",
    "llama3": LLAMA3_SYSTEM + "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nSure?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nYes.<|eot_id|>",
    "plain": "<image>A cat.\nYes.\n",  # stage 1: the image, then what the assistant says; user text is dropped
}
GENERATION_PROMPT = {"phi3": PHI3_SYSTEM + "\n<|user|>\n<image>\nWhat is it?<|end|>\n<|assistant|>\n",
                     "llama3": LLAMA3_SYSTEM + "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?"
                               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                     "plain": "<image>"}
END_OF_TURN = {"phi3": "<|end|>", "llama3": "<|eot_id|>", "plain": "\n"}


def with_image(conversation: list[dict], image: Image.Image) -> list[dict]:
    first, *rest = conversation
    content = [{"type": "image", "image": image}] + [item for item in first["content"] if item["type"] != "image"]
    return [{**first, "content": content}, *rest]


@pytest.mark.parametrize("family", ["phi3", "llama3", "plain"])
def test_chat_template_renders_with_generation_markers(family):
    processor = tiny_processor(family=family)
    assert "{% generation %}" in processor.chat_template and "{% endgeneration %}" in processor.chat_template
    assert processor.apply_chat_template(CONVERSATION, tokenize=False) == RENDERED[family]
    prompt = processor.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == GENERATION_PROMPT[family]


@pytest.mark.parametrize("family", ["phi3", "llama3", "plain"])
def test_assistant_mask_covers_exactly_the_answers_after_expansion(family):
    """As TRL's SFTTrainer calls it (right padding, no added special tokens, assistant_only_loss)."""
    processor = tiny_processor(family=family)
    short = with_image(CONVERSATION[:2], gradient_image())
    long = with_image(CONVERSATION, Image.new("RGB", (9, 9)))
    output = processor.apply_chat_template(
        [short, long], tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True,
        processor_kwargs={"padding": True, "padding_side": "right", "truncation": False, "add_special_tokens": False},
    )
    end = END_OF_TURN[family]
    expected = [f"A cat.{end}", f"A cat.{end}Yes.{end}"]
    for index, answers in enumerate(expected):
        ids, mask = output["input_ids"][index], output["assistant_masks"][index].bool()
        assert (ids == IMAGE_TOKEN_ID).sum() == NUM_IMAGE_TOKENS
        assert processor.tokenizer.decode(ids[mask]) == answers
        assert not (ids[mask] == IMAGE_TOKEN_ID).any()
    assert output["pixel_values"].shape == (2, *IMAGE_SHAPE)


def test_llama3_template_bos_is_not_doubled_by_the_processor():
    """The template writes the BOS token; neither the string path nor the tokenize=True path adds another."""
    tokenizer = tiny_tokenizer()
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    assert tokenizer("hi")["input_ids"][0] == BOS_ID
    processor = FlorenceVLProcessor(image_processor=florence2_image_processor(64), tokenizer=tokenizer,
                                    chat_template=CHAT_TEMPLATES["llama3"], num_image_tokens=NUM_IMAGE_TOKENS)
    conversation = with_image(CONVERSATION[:2], gradient_image())
    for processor_kwargs in ({"add_special_tokens": False, "padding": True, "padding_side": "right"}, None):
        kwargs = {"processor_kwargs": processor_kwargs} if processor_kwargs else {}
        ids = processor.apply_chat_template([conversation], tokenize=True, return_dict=True, return_tensors="pt",
                                            **kwargs)["input_ids"][0]
        assert ids[0] == BOS_ID and (ids == BOS_ID).sum() == 1, processor_kwargs
    prompt = processor.apply_chat_template([conversation], add_generation_prompt=False)[0]
    assert processor(text=prompt, images=gradient_image())["input_ids"][0] == ids.tolist()


# ------------------------------------------------------------------------------------------------- save and load

FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer

    folder, output_file, report_file = sys.argv[1:4]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    images = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20 + seed, 30, 3), dtype=np.uint8))
              for seed in range(2)]
    inputs = processor(text=json.loads(sys.argv[4]), images=images, padding=True, return_tensors="pt")
    torch.save(dict(inputs), output_file)
    report = {
        "processor": type(processor).__name__, "module": type(processor).__module__,
        "image_token_id": processor.image_token_id, "num_image_tokens": processor.num_image_tokens,
        "chat_template": processor.chat_template, "tokenizer_ids": tokenizer("<image>hi")["input_ids"],
        "padding_side": tokenizer.padding_side,
        "florence_vl_imported": any(name.split(".")[0] == "florence_vl" for name in sys.modules),
    }
    with open(report_file, "w") as handle:
        json.dump(report, handle)
""")


def test_processor_round_trip_in_a_fresh_process(processor, tmp_path):
    folder = tmp_path / "processor"
    processor.save_pretrained(folder)
    texts = ["<image>Short", "<image>A longer question?"]
    images = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20 + seed, 30, 3), dtype=np.uint8))
              for seed in range(2)]
    expected = processor(text=texts, images=images, padding=True, return_tensors="pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(folder), str(tmp_path / "inputs.pt"),
         str(tmp_path / "report.json"), json.dumps(texts)],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    loaded = torch.load(tmp_path / "inputs.pt", weights_only=True)

    assert report["processor"] == "FlorenceVLProcessor" and report["module"].startswith("transformers_modules")
    assert not report["florence_vl_imported"]
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    assert report["image_token_id"] == IMAGE_TOKEN_ID and report["num_image_tokens"] == NUM_IMAGE_TOKENS
    assert report["chat_template"] == processor.chat_template
    assert report["tokenizer_ids"] == [IMAGE_TOKEN_ID] + processor.tokenizer.encode("hi")
    assert report["padding_side"] == "left"


# ------------------------------------------------------------------------------------- preprocessing constants


def reference_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Florence-2's preprocessing written out with its constants (microsoft/Florence-2-large
    preprocessor_config.json): pad to a square of ImageNet mean x 255 rounded down, bicubic resize, /255, ImageNet
    mean/std, no centre crop."""
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), (123, 116, 103))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    array = np.asarray(square.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    array = (array - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(array.transpose(2, 0, 1)).float()


def test_florence2_preprocessing_constants_are_pinned():
    """Size, bicubic resampling, rescaling, ImageNet mean/std, no centre crop and the pad colour: a change to any of
    them (e.g. CLIP's mean/std or nearest resampling) changes these pixels."""
    image_processor = florence2_image_processor()
    assert image_processor.size == {"height": 768, "width": 768}
    processor = FlorenceVLProcessor(image_processor=florence2_image_processor(64), tokenizer=tiny_tokenizer(),
                                    num_image_tokens=NUM_IMAGE_TOKENS)
    assert processor.background_colour() == (123, 116, 103)
    for size in [(40, 30), (30, 40), (64, 64), (200, 50)]:
        image = gradient_image(size)
        torch.testing.assert_close(pixel_values(processor, image)[0], reference_pixels(image, 64),
                                   atol=1e-5, rtol=0)


def test_pad_is_the_default_and_resize_stretches():
    tokenizer = tiny_tokenizer()
    padded = FlorenceVLProcessor(image_processor=florence2_image_processor(64), tokenizer=tokenizer,
                                 num_image_tokens=NUM_IMAGE_TOKENS)
    stretched = FlorenceVLProcessor(image_processor=florence2_image_processor(64), tokenizer=tokenizer,
                                    num_image_tokens=NUM_IMAGE_TOKENS, image_aspect_ratio="resize")
    assert padded.image_aspect_ratio == "pad"
    image = gradient_image((60, 20))
    expected = florence2_image_processor(64)(images=image, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values(stretched, image), expected)
    assert (pixel_values(padded, image) - expected).abs().max() > 0.5
    square = gradient_image((50, 50))
    assert torch.equal(pixel_values(padded, square), pixel_values(stretched, square))
    with pytest.raises(ValueError, match="image_aspect_ratio='crop'"):
        FlorenceVLProcessor(image_processor=florence2_image_processor(64), tokenizer=tokenizer,
                            image_aspect_ratio="crop")


def test_saved_aspect_ratio_round_trips_and_old_processors_keep_resizing(tmp_path):
    from transformers import AutoProcessor

    for ratio in ("pad", "resize"):
        processor = FlorenceVLProcessor(image_processor=florence2_image_processor(64), tokenizer=tiny_tokenizer(),
                                        num_image_tokens=NUM_IMAGE_TOKENS, image_aspect_ratio=ratio)
        processor.save_pretrained(tmp_path / ratio)
        assert json.loads((tmp_path / ratio / "processor_config.json").read_text())["image_aspect_ratio"] == ratio
        assert AutoProcessor.from_pretrained(tmp_path / ratio, trust_remote_code=True).image_aspect_ratio == ratio
    config_file = tmp_path / "pad" / "processor_config.json"
    saved = json.loads(config_file.read_text())
    del saved["image_aspect_ratio"]  # saved before the option existed, e.g. the shipped tiny checkpoint
    config_file.write_text(json.dumps(saved))
    assert AutoProcessor.from_pretrained(tmp_path / "pad", trust_remote_code=True).image_aspect_ratio == "resize"
    # the same under every supported transformers version (5.25 builds processors through `from_dict`, 5.24 did not)
    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "florence-vl-tiny-shapes"
    assert "image_aspect_ratio" not in json.loads((shipped / "processor_config.json").read_text())
    assert AutoProcessor.from_pretrained(shipped, trust_remote_code=True).image_aspect_ratio == "resize"
    override = AutoProcessor.from_pretrained(shipped, trust_remote_code=True, image_aspect_ratio="pad")
    assert override.image_aspect_ratio == "pad"


def test_llava_json_turns_render_as_the_original_trained_on():
    """LLaVA data: the original (preprocess_multimodal) removes the marker, strips the text and puts
    `<image>\\n` first; training data here goes through the same template and processor."""
    from florence_vl.train.data import llava_to_messages

    turns = [{"from": "human", "value": "What is this? <image>\n"}, {"from": "gpt", "value": "A cat."},
             {"from": "human", "value": " And its colour?"}]
    messages = llava_to_messages(turns, 1)
    rendered = tiny_processor(family="phi3").apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == (PHI3_SYSTEM + "\n<|user|>\n<image>\nWhat is this?<|end|>\n<|assistant|>\nA cat.<|end|>"
                        "\n<|user|>\n And its colour?<|end|>\n<|assistant|>\n")
