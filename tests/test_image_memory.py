"""Bounded image memory: 8-bit strip-by-strip preprocessing gives the full-size pixels bit for bit; `max_image_pixels`.

`old_pixel_values` is the processor's image path before the change, frozen here (to_rgb at full size, then
expand_to_square, then the image processor at full size): the new path must give exactly its pixel values.
"""

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from tiny import tiny_config, tiny_processor

import florence_vl.processing_florence_vl as processing
from florence_vl import FlorenceVLProcessor
from florence_vl.processing_florence_vl import DEFAULT_MAX_IMAGE_PIXELS, florence2_image_processor

FIXTURE_IMAGES = os.path.join(os.path.dirname(__file__), "fixtures", "original", "images")


# ------------------------------------------------------------------------ the path before the change, frozen


def old_to_rgb(image: Image.Image) -> Image.Image:
    """`to_rgb` of the previous release (PIL input)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8))
    if image.mode == "La":
        image = image.convert("LA")
    if image.mode in ("RGBA", "RGBa", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def old_expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def old_pixel_values(processor: FlorenceVLProcessor, image: Image.Image) -> torch.Tensor:
    image = old_to_rgb(image)
    if processor.image_aspect_ratio == "pad":
        image = old_expand_to_square(image, processor.background_colour())
    return processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]


def new_pixel_values(processor: FlorenceVLProcessor, image) -> torch.Tensor:
    return processor(text="<image>", images=image, return_tensors="pt")["pixel_values"]


# --------------------------------------------------------------------------------------- bit-exact pixel values


BANDS = {"L": 1, "LA": 2, "La": 2, "RGB": 3, "RGBA": 4, "RGBa": 4, "CMYK": 4}


def noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Random pixels in every channel (every value the kernels can meet), in `mode`."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode in BANDS:
        return Image.frombytes(mode, size, rng.integers(0, 256, width * height * BANDS[mode], dtype=np.uint8).tobytes())
    if mode == "1":
        return noise("L", size, seed).convert("1")
    if mode in ("P", "P-transparent"):
        image = noise("L", size, seed).convert("P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if mode == "P-transparent":
            image.info["transparency"] = bytes(rng.integers(0, 256, 256, dtype=np.uint8))
        return image
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":  # 32-bit: values above 255 (scaled by 65535) or only small ones (scaled by 255), by seed
        return Image.fromarray(rng.integers(0, 70000 if seed % 2 == 0 else 200, (height, width), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.uniform(0, 300, (height, width)).astype(np.float32))
    raise AssertionError(mode)


MODES = ["RGB", "L", "RGBA", "LA", "La", "RGBa", "P", "P-transparent", "1", "CMYK", "I;16", "I", "F"]
SIZES = [(1, 1), (2, 3), (64, 64), (40, 30), (30, 40), (65, 63), (300, 97), (97, 300), (500, 7), (3, 200)]


def make_processors() -> dict[str, FlorenceVLProcessor]:
    """"pad" and "resize" processors with 64-px output, both on the strip path."""
    assert processing._pass_order_is_known()  # else the processor falls back to the full-size path
    pad = tiny_processor(tiny_config())
    resize = FlorenceVLProcessor(image_processor=pad.image_processor, tokenizer=pad.tokenizer,
                                 num_image_tokens=pad.num_image_tokens, image_aspect_ratio="resize")
    assert pad.image_aspect_ratio == "pad"
    return {"pad": pad, "resize": resize}


@pytest.fixture(scope="module")
def processors() -> dict[str, FlorenceVLProcessor]:
    return make_processors()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strip_pixels", [processing.STRIP_PIXELS, 211], ids=["one-strip", "many-strips"])
def test_pixel_values_equal_the_full_size_path_bit_for_bit(processors, mode, strip_pixels, monkeypatch):
    """Every mode, tiny to elongated sizes, pad and resize, one strip or many (strips of 1-7 rows at these widths)."""
    monkeypatch.setattr(processing, "STRIP_PIXELS", strip_pixels)
    for seed, size in enumerate(SIZES):
        image = noise(mode, size, seed)
        for ratio, processor in processors.items():
            expected = old_pixel_values(processor, image)
            assert torch.equal(new_pixel_values(processor, image), expected), (mode, size, ratio)


def test_fixture_images_exif_paths_and_real_size_are_bit_exact(tmp_path, monkeypatch):
    """The golden fixture images at 768 px (Florence-2's size), an EXIF-rotated image and a 16-bit file by path."""
    processor = FlorenceVLProcessor(image_processor=florence2_image_processor(768),
                                    tokenizer=tiny_processor(tiny_config()).tokenizer, num_image_tokens=5)
    for name in ("landscape", "portrait", "square"):
        image = Image.open(os.path.join(FIXTURE_IMAGES, f"{name}.png"))
        assert torch.equal(new_pixel_values(processor, image), old_pixel_values(processor, Image.open(image.filename)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    noise("RGB", (90, 40)).save(tmp_path / "rotated.png", exif=exif)
    noise("I;16", (33, 70)).save(tmp_path / "sixteen.png")
    monkeypatch.setattr(processing, "STRIP_PIXELS", 1000)
    for name in ("rotated.png", "sixteen.png"):
        expected = old_pixel_values(processor, Image.open(tmp_path / name))
        assert torch.equal(new_pixel_values(processor, str(tmp_path / name)), expected), name


def test_resize_arguments_at_call_time_still_apply(processors):
    """A call-time `size` changes the resize: the full-size image goes to the image processor, as before."""
    processor, image = processors["pad"], noise("RGB", (50, 20))
    values = processor(text="<image>", images=image, size={"height": 32, "width": 32}, return_tensors="pt")
    padded = old_expand_to_square(old_to_rgb(image), processor.background_colour())
    expected = processor.image_processor(images=[padded], size={"height": 32, "width": 32}, return_tensors="pt")
    assert torch.equal(values["pixel_values"], expected["pixel_values"])


# --------------------------------------------------------------------------------------------- max_image_pixels


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says `width` x `height` (grayscale) with no pixel data: decoding it fails, so a size error
    instead of a decoding error proves the size was checked before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\0" * 10))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + data + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, on opening
def test_default_limit_refuses_the_13000_square_png_before_decoding(processors, tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(13000, 13000))
    for image in (str(path), Image.open(path)):
        with pytest.raises(ValueError) as error:
            processors["pad"](text="<image>", images=[image], return_tensors="pt")
        message = str(error.value)
        assert "images[0]" in message and "13000x13000 = 169,000,000 pixels" in message, message
        assert f"max_image_pixels={DEFAULT_MAX_IMAGE_PIXELS:,}" in message and "cannot be decoded" not in message


def test_limit_is_inclusive_and_none_accepts_any_size(processors):
    processor = tiny_processor(tiny_config())
    processor.max_image_pixels = 64 * 64
    assert new_pixel_values(processor, noise("L", (64, 64))).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"64x65 = 4,160 pixels.*max_image_pixels=4,096"):
        new_pixel_values(processor, np.zeros((65, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"longer side of at most max_image_pixels / 64 = 64"):
        new_pixel_values(processor, noise("RGB", (65, 2)))  # 130 pixels, but 65 > 4096 / 64
    processor.max_image_pixels = None
    assert new_pixel_values(processor, noise("L", (700, 3))).shape == (1, 3, 64, 64)
    for bad in (0, -5, 2.5, "100", True):
        with pytest.raises(ValueError, match="max_image_pixels=.* must be a positive integer, or None"):
            FlorenceVLProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                max_image_pixels=bad)


def test_pillow_decompression_bomb_is_a_value_error_naming_both_limits(processors, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20000, 20000))  # 400 MP: over twice PIL.Image.MAX_IMAGE_PIXELS
    processor = tiny_processor(tiny_config())
    processor.max_image_pixels = None
    message = r"images\[0\]: .*PIL.Image.MAX_IMAGE_PIXELS and the processor's max_image_pixels"
    with pytest.raises(ValueError, match=message):
        processor(text="<image>", images=[str(path)], return_tensors="pt")


def test_max_image_pixels_round_trips_through_save_and_auto_processor(tmp_path):
    from transformers import AutoProcessor

    processor = tiny_processor(tiny_config())
    for limit in (5000, None):
        processor.max_image_pixels = limit
        folder = tmp_path / f"limit-{limit}"
        processor.save_pretrained(folder)
        assert json.loads((folder / "processor_config.json").read_text())["max_image_pixels"] == limit
        loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(loaded).__module__.startswith("transformers_modules") and loaded.max_image_pixels == limit
    with pytest.raises(ValueError, match="max_image_pixels=5,000"):
        AutoProcessor.from_pretrained(tmp_path / "limit-5000", trust_remote_code=True)(
            text="<image>", images=noise("RGB", (100, 100)), return_tensors="pt")
    config_file = tmp_path / "limit-5000" / "processor_config.json"
    saved = json.loads(config_file.read_text())
    del saved["max_image_pixels"]  # saved before the option existed, e.g. the shipped tiny checkpoint
    config_file.write_text(json.dumps(saved))
    assert AutoProcessor.from_pretrained(tmp_path / "limit-5000", trust_remote_code=True).max_image_pixels == \
        DEFAULT_MAX_IMAGE_PIXELS


# ---------------------------------------------------------------------------------------------- memory bound

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from PIL import Image, ImageDraw
    from tiny import tiny_config, tiny_processor
    import florence_vl.processing_florence_vl as processing

    def status(key):
        return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024

    def reset_peak():  # Linux: "5" resets VmHWM to the current resident set
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    processing.STRIP_PIXELS = 1 << 19  # strips of 0.5 MP (the default, 4 MP, is the size of the whole image here)
    processor = tiny_processor(tiny_config())
    image = Image.new("L", (4000, 3000), 200)  # 12 MB decoded; not square, so "pad" pads it
    ImageDraw.Draw(image).ellipse((500, 500, 3500, 2500), fill=30)
    processor(text="<image>", images=Image.new("L", (90, 70)), return_tensors="pt")  # warm up
    reset_peak()
    before = status("VmRSS")
    processor(text="<image>", images=image, return_tensors="pt")
    print(json.dumps({"decoded": 4000 * 3000, "above": status("VmHWM") - before}))
""")


def test_peak_memory_above_the_decoded_image_is_bounded():
    """A 4000x3000 grayscale image through "pad": the full-size path took ~12 bytes per pixel above the decoded
    image (RGB copies, padding, arrays); the strip path needs one strip and the buffer (under 1 byte per pixel)."""
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, os.path.dirname(__file__)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert report["above"] < report["decoded"], report
