"""Processor of Florence-VL: Florence-2 image preprocessing + the LLM tokenizer with `<image>` placeholders."""

import functools
import os
from contextlib import contextmanager

import numpy as np  # a hard dependency of transformers
import torch
from transformers import CLIPImageProcessorPil
from transformers.image_utils import PILImageResampling, load_image
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import is_vision_available

if is_vision_available():
    import PIL
    from PIL import ExifTags, Image, ImageOps

# Florence-2's normalisation (ImageNet statistics), as in its preprocessor_config.json.
FLORENCE2_IMAGE_MEAN = (0.485, 0.456, 0.406)
FLORENCE2_IMAGE_STD = (0.229, 0.224, 0.225)

# What the original Florence-VL code fed its LLMs (llava/conversation.py and llava/mm_utils.py), one home for
# every part of the package that needs to know a chat family.
DEFAULT_SYSTEM_PROMPTS = {
    "phi3": "You are a helpful AI assistant.",
    "llama3": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.",
}
# The token that ends a turn, per family: generation stops there.
END_OF_TURN = {"phi3": "<|end|>", "llama3": "<|eot_id|>", "plain": None}
# LLM `model_type` -> chat family; LLaVA-layout `model_type` of the original checkpoints -> (LLM model_type, family).
CHAT_FAMILY_OF_MODEL_TYPE = {"phi3": "phi3", "llama": "llama3"}
ORIGINAL_MODEL_TYPES = {"llava_phi": ("phi3", "phi3"), "llava_llama": ("llama", "llama3")}

# Content: every image first (`<image>` and a newline each, as the original puts the image before the first user
# turn's text), then the text items. `{% generation %}` marks what the assistant says (content and end-of-turn
# token) so that TRL's `assistant_only_loss` can build its mask.
_RENDER_CONTENT = (
    "{%- macro render(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for item in content if item['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for item in content if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
)
# A user-given system message replaces the family's default system prompt.
_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = render(messages[0]['content']) -%}"
    "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = default_system -%}{%- endif -%}"
)
CHAT_TEMPLATES = {
    # conv_phi3_instruct: system + "<|end|>", then "\n<|role|>\n" + message + "<|end|>" per turn.
    "phi3": _RENDER_CONTENT + "{%- set default_system = " + repr(DEFAULT_SYSTEM_PROMPTS["phi3"]) + " -%}" + _SYSTEM
    + "{{ '<|system|>\n' + system + '<|end|>' }}"
    "{%- for message in messages -%}{{ '\n<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{ render(message['content']) + '<|end|>' }}"
    "{% endgeneration %}{%- else -%}{{ render(message['content']) + '<|end|>' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '\n<|assistant|>\n' }}{%- endif -%}",
    # conv_llama3: the tokenizer's BOS, then the system string, which starts with a literal <|begin_of_text|>
    # (the original fed two BOS tokens; the processor adds no third one to a text that starts with BOS).
    "llama3": _RENDER_CONTENT + "{%- set default_system = " + repr(DEFAULT_SYSTEM_PROMPTS["llama3"]) + " -%}"
    + _SYSTEM + "{{ bos_token + '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n' + system "
    "+ '<|eot_id|>' }}"
    "{%- for message in messages -%}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{ render(message['content']) + '<|eot_id|>' }}"
    "{% endgeneration %}{%- else -%}{{ render(message['content']) + '<|eot_id|>' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif -%}",
    # conv_llava_plain (stage 1): the image, then the caption and "\n"; the user turn holds only the image.
    "plain": "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{ (message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) + '\n' }}"
    "{% endgeneration %}{%- elif message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>' }}{%- endfor -%}"
    "{%- endif -%}{%- endfor -%}",
}
IMAGE_ASPECT_RATIOS = ("pad", "resize")
# The largest image (width x height) the processor accepts by default: Pillow's own decompression-bomb threshold
# (its default `Image.MAX_IMAGE_PIXELS`, ~0.25 GB as 24-bit RGB; Pillow warns above it and refuses above twice it,
# which is also vLLM's default limit). It passes 48-61 MP camera photos; the model sees 768 x 768 = 0.6 MP anyway.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Image processor arguments that change the resize: given at call time, they make the processor hand the full-size
# image to the image processor (see `FlorenceVLProcessor._resize_target`).
_RESIZE_KWARGS = ("do_resize", "size", "resample")


def chat_family(model_type: str) -> str:
    """The chat family (`CHAT_TEMPLATES` key) of an LLM `model_type`."""
    if model_type not in CHAT_FAMILY_OF_MODEL_TYPE:
        raise ValueError(f"No chat template is known for LLM model_type={model_type!r}; known: "
                         f"{sorted(CHAT_FAMILY_OF_MODEL_TYPE)}. Pass chat_template= one of {sorted(CHAT_TEMPLATES)} "
                         "or a Jinja template.")
    return CHAT_FAMILY_OF_MODEL_TYPE[model_type]


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids of every family's end-of-turn token that `tokenizer` knows."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in END_OF_TURN.values() if token is not None and token in vocab]


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """The original `expand2square`: paste `image` centred on a square of `background` (offsets rounded down)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def florence2_image_processor(image_size: int = 768) -> CLIPImageProcessorPil:
    """Florence-2 preprocessing (microsoft/Florence-2-large preprocessor_config.json): bicubic resize to a square
    `image_size`, rescale by 1/255, ImageNet mean/std, no centre crop."""
    return CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size}, resample=PILImageResampling.BICUBIC, do_resize=True,
        do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(FLORENCE2_IMAGE_MEAN), image_std=list(FLORENCE2_IMAGE_STD),
    )


def _array_layout(array: np.ndarray, where: str) -> np.ndarray:
    """HW, HWC or CHW arrays (1, 3 or 4 channels) -> HW or HWC (a view), or a ValueError naming the shape."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise ValueError(
            f"{where}: cannot read an image from an array of shape {array.shape}; expected (H, W), (H, W, C) or "
            "(C, H, W) with C in 1, 3, 4."
        )
    return array


def _array_to_pil(array: np.ndarray, where: str) -> Image.Image:
    """HW or HWC arrays (see `_array_layout`) of uint8, bool, int or float in [0, 1] -> PIL."""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{where}: float images must hold finite values in [0, 1], got [{array.min()}, {array.max()}].")
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255:
            raise ValueError(f"{where}: integer images must be uint8-valued (0..255), got dtype {array.dtype}.")
        array = array.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def _open_image(source: str | os.PathLike, where: str) -> Image.Image:
    """A local path, opened lazily (Pillow reads the header: the size is known, nothing is decoded yet; alpha and
    bit depth are kept), or a URL or base64 string (decoded by transformers' `load_image`, as RGB)."""
    try:
        return Image.open(source) if os.path.isfile(source) else load_image(str(source))
    except Image.DecompressionBombError as error:  # more than twice PIL.Image.MAX_IMAGE_PIXELS: refused unread
        raise ValueError(f"{where}: {error} Pillow refuses to read it; to accept it, raise PIL.Image.MAX_IMAGE_PIXELS "
                         "and the processor's max_image_pixels.") from error
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: cannot read an image from {str(source)!r} ({error}).") from error


def _as_image(image, where: str, check_size=None) -> Image.Image:
    """A PIL image from any accepted input. `check_size(width, height)` runs before a path is decoded or an array
    converted."""
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(image, where)
        if check_size is not None:
            try:
                check_size(*image.size)
            except ValueError:
                image.close()  # lazily opened: the file is still open
                raise
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()  # numpy has no bfloat16
    if isinstance(image, np.ndarray):
        array = _array_layout(image, where)
        if check_size is not None:
            check_size(array.shape[1], array.shape[0])
        return _array_to_pil(array, where)
    if not isinstance(image, Image.Image):
        raise TypeError(f"{where}: expected a PIL image, numpy array, torch tensor, path or URL, got {type(image)}.")
    if check_size is not None:
        check_size(*image.size)
    return image


_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _full_scale(image: Image.Image, rows_per_strip: int | None = None) -> float:
    """The value that maps to 255 in a high-bit-depth image: 65535 for 16-bit modes and for 32-bit ones holding
    values above 255, else 255. The maximum is taken strip by strip when `rows_per_strip` is given (same result)."""
    if image.mode.startswith("I;16"):
        return 65535.0
    width, height = image.size
    step = rows_per_strip or height
    maxima = [np.asarray(image.crop((0, top, width, min(top + step, height))), dtype=np.float64).max()
              for top in range(0, height, step)]
    return 65535.0 if np.max(maxima) > 255 else 255.0  # np.max keeps a NaN, as array.max() did


def _pointwise_rgb(image: Image.Image, full_scale: float = 255.0) -> Image.Image:
    """The colour conversion of `to_rgb` (high bit depth scaled to 8 bits, alpha on white): each output pixel depends
    on its own input pixel only, so converting strips of rows one at a time gives the same pixels."""
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / full_scale * 255.0, 0, 255).astype(np.uint8))
    if image.mode == "La":  # premultiplied alpha: Pillow converts it to LA only
        image = image.convert("LA")
    if image.mode in ("RGBA", "RGBa", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    """`ImageOps.exif_transpose`, without its full-size copy of an image that needs no turning."""
    image.load()
    if image.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
        return ImageOps.exif_transpose(image)
    return image


@contextmanager
def _decoding_errors(where: str, mode: str):
    """Pillow's errors while decoding or converting an image -> ValueErrors that name the image."""
    try:
        yield
    except OSError as error:  # truncated or corrupt file data is only decoded here
        raise ValueError(f"{where}: the image cannot be decoded ({error}).") from error
    except ValueError as error:  # a mode Pillow cannot convert to RGB
        raise ValueError(f"{where}: cannot convert a PIL image of mode {mode!r} to RGB ({error}).") from error


def to_rgb(image, where: str = "image") -> Image.Image:
    """Any PIL mode, path, URL, numpy array or torch tensor -> an upright RGB PIL image (alpha on white), full size.

    `FlorenceVLProcessor` gets the same pixels through `resize_to_rgb` without full-size copies."""
    image = _as_image(image, where)
    with _decoding_errors(where, image.mode):
        image = ImageOps.exif_transpose(image)
        full_scale = _full_scale(image) if image.mode in _HIGH_BIT_DEPTH_MODES else 255.0
        return _pointwise_rgb(image, full_scale)


# Pixels of the source converted at a time by `resize_to_rgb`: 4 M (16 MB as RGB, 32 MB as float64 for 16-bit
# images), so a strip is a small fraction of any image large enough for memory to matter.
STRIP_PIXELS = 1 << 22


def _vertical_pass_first(source_size: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether Pillow's `resize` runs its vertical pass first: since Pillow 13 when the height loses more than twice
    as many pixels as the width (python-pillow/Pillow#9549); always horizontal first before."""
    if int(PIL.__version__.split(".")[0]) < 13:
        return False
    (width, height), (out_width, out_height) = source_size, size
    return height - out_height > 0 and height - out_height > 2 * (width - out_width)


@functools.cache
def _pass_order_is_known() -> bool:
    """`_vertical_pass_first` checked against this Pillow's own `resize` on two small images, one of each order, so
    that a future Pillow with another rule falls back to the full-size path instead of changing pixel values."""
    rng = np.random.default_rng(0)
    for source_size in ((12, 80), (80, 12)):
        image = Image.fromarray(rng.integers(0, 256, (source_size[1], source_size[0], 3), dtype=np.uint8))
        size, bicubic = (5, 6), Image.Resampling.BICUBIC
        first = (source_size[0], size[1]) if _vertical_pass_first(source_size, size) else (size[0], source_size[1])
        if not np.array_equal(np.asarray(image.resize(size, bicubic)),
                              np.asarray(image.resize(first, bicubic).resize(size, bicubic))):
            return False
    return True


def resize_to_rgb(image: Image.Image, size: tuple[int, int], resample: int,
                  background: tuple[int, int, int] | None = None) -> Image.Image:
    """`to_rgb(image)`, then `expand_to_square(…, background)` if `background` is given, then Pillow's
    `resize(size, resample)`: the same pixels, bit for bit, without a full-size RGB or padded copy.

    Pillow resizes in two passes, rounding to 8 bits in between (`_vertical_pass_first` says which comes first),
    and each output row of a horizontal pass depends on one input row only (each column of a vertical pass on one
    column). So strips of the padded image, rows or columns, are converted, padded and put through the first pass
    one at a time into a buffer; a second `resize` runs the other pass on it. Memory above the decoded image: one
    strip (`STRIP_PIXELS`) and the buffer (output side x the padded image's side x 4 bytes: 40 MB for a 13000-pixel
    side at 768).
    """
    out_width, out_height = size
    image = _upright(image)
    width, height = image.size
    side_width, side_height = (max(width, height),) * 2 if background is not None else (width, height)
    left, upper = (side_width - width) // 2, (side_height - height) // 2
    full_scale = 255.0
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        full_scale = _full_scale(image, max(1, STRIP_PIXELS // width))

    def padded(x0: int, y0: int, x1: int, y1: int) -> Image.Image:
        """The box (x0, y0, x1, y1) of the converted, padded image."""
        strip = Image.new("RGB", (x1 - x0, y1 - y0), background or 0)
        first_x, last_x = max(x0, left), min(x1, left + width)
        first_y, last_y = max(y0, upper), min(y1, upper + height)
        if first_x < last_x and first_y < last_y:
            source = image.crop((first_x - left, first_y - upper, last_x - left, last_y - upper))
            strip.paste(_pointwise_rgb(source, full_scale), (first_x - x0, first_y - y0))
        return strip

    if _vertical_pass_first((side_width, side_height), size):
        step = max(1, STRIP_PIXELS // side_height)
        buffer = Image.new("RGB", (side_width, out_height))
        for x in range(0, side_width, step):
            columns = min(step, side_width - x)
            buffer.paste(padded(x, 0, x + columns, side_height).resize((columns, out_height), resample), (x, 0))
    else:
        step = max(1, STRIP_PIXELS // side_width)
        buffer = Image.new("RGB", (out_width, side_height))
        for y in range(0, side_height, step):
            rows = min(step, side_height - y)
            buffer.paste(padded(0, y, side_width, y + rows).resize((out_width, rows), resample), (0, y))
    return buffer.resize(size, resample)


def _holds_no_image(images) -> bool:
    """True for [] and nested empty lists such as [[], []]."""
    return isinstance(images, (list, tuple)) and all(_holds_no_image(item) for item in images)


class FlorenceVLProcessor(ProcessorMixin):
    r"""
    Florence-2 image preprocessing and an LLM tokenizer; each `<image>` in the text becomes `num_image_tokens`
    placeholder tokens that the model replaces with image features.

    Args:
        image_processor: Florence-2 image settings (see `florence2_image_processor`).
        tokenizer: the LLM tokenizer; it must know `image_token` as a special token.
        chat_template (`str`, *optional*): e.g. `CHAT_TEMPLATES["phi3"]`.
        num_image_tokens (`int`): placeholders per image, `FlorenceVLConfig.num_image_tokens`.
        image_token (`str`): the placeholder text.
        image_aspect_ratio (`str`): "pad" (the original Florence-VL, the default: a non-square image is centred on
            a square of the image mean colour, ImageNet mean x 255 = (123, 116, 103), before the resize) or "resize"
            (stretched to the square). A saved processor without this field predates it and was used with
            "resize", which it keeps.
        max_image_pixels (`int`, *optional*): the largest image accepted, in pixels (width x height; default
            `DEFAULT_MAX_IMAGE_PIXELS`, Pillow's decompression-bomb threshold); a larger one, or one whose longer side
            exceeds `max_image_pixels` / the image processor's output width, is a ValueError, raised before a path
            is decoded. `None` accepts any size. Saved in processor_config.json.

    Images are converted, padded and resized in 8 bits, strip by strip (`resize_to_rgb`): the pixel values equal
    those of `to_rgb` + `expand_to_square` + the image processor at full size, bit for bit, while memory above the
    decoded image stays a few tens of MB whatever its size.

    A text that already starts with the tokenizer's BOS token gets no second one (unless `add_special_tokens` is
    given), so `processor(text=apply_chat_template(...))` and `apply_chat_template(..., tokenize=True)` give the
    same ids.
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens: int = 577,
                 image_token: str = "<image>", image_aspect_ratio: str = "pad",
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, **kwargs):
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r} must be one of {IMAGE_ASPECT_RATIOS}.")
        self.image_aspect_ratio = image_aspect_ratio
        if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int)
                                             or max_image_pixels < 1):
            raise ValueError(f"max_image_pixels={max_image_pixels!r} must be a positive integer, or None for no limit.")
        self.max_image_pixels = max_image_pixels
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens} must be >= 1 (FlorenceVLConfig.num_image_tokens).")
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {image_token!r} token. Add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}}) and resize the "
                "model's embeddings (model.resize_token_embeddings(len(tokenizer)))."
            )
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path, **kwargs):
        """A saved processor without `image_aspect_ratio` was saved before the option existed: "resize".

        Filled in where the saved dict is read (`get_processor_dict`, the one step every transformers version from
        5.16 to 5.25 shares) rather than where it becomes a processor, which changed in 5.25 (`from_dict`).
        """
        processor_dict, kwargs = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        return {"image_aspect_ratio": "resize", **processor_dict}, kwargs

    def background_colour(self) -> tuple[int, ...]:
        """The padding colour of "pad": the image processor's mean x 255, rounded down as the original does."""
        return tuple(int(value * 255) for value in self.image_processor.image_mean)

    def check_image_size(self, width: int, height: int, where: str = "image") -> None:
        """ValueError if a `width` x `height` image is over `max_image_pixels` (see the class docstring)."""
        if self.max_image_pixels is None:
            return
        output_width = getattr(getattr(self.image_processor, "size", None), "width", None)
        longest = self.max_image_pixels // output_width if output_width else None
        if width * height > self.max_image_pixels or (longest is not None and max(width, height) > longest):
            side = f" and a longer side of at most max_image_pixels / {output_width} = {longest:,}" if longest else ""
            raise ValueError(
                f"{where}: the image is {width}x{height} = {width * height:,} pixels; this processor accepts at most "
                f"max_image_pixels={self.max_image_pixels:,} pixels{side}. Resize the image, or raise the limit: "
                "FlorenceVLProcessor.from_pretrained(..., max_image_pixels=N), or \"max_image_pixels\" in "
                "processor_config.json (null accepts any size)."
            )

    def _resize_target(self, call_kwargs: dict) -> tuple[tuple[int, int], int] | None:
        """`((width, height), resample)` when the image processor resizes every image to one size with Pillow (as
        Florence-2's does), which `resize_to_rgb` reproduces exactly; None otherwise (another backend, resize
        arguments given at call time, a Pillow whose pass order is not known): then the image processor gets the
        full-size image, as before."""
        image_processor = self.image_processor
        size = getattr(image_processor, "size", None)
        resample = getattr(image_processor, "resample", None)
        images_kwargs = call_kwargs.get("images_kwargs") or {}
        overridden = any(key in call_kwargs or key in images_kwargs for key in _RESIZE_KWARGS)
        if (overridden or getattr(image_processor, "backend", None) != "pil" or not image_processor.do_resize
                or not getattr(size, "height", None) or not getattr(size, "width", None)
                or not isinstance(resample, int) or not _pass_order_is_known()):
            return None
        return (size.width, size.height), resample

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if videos is not None and len(videos) == 0:  # lmms-eval passes empty lists
            videos = None
        if audio is not None and len(audio) == 0:
            audio = None
        if videos is not None or audio is not None:
            raise ValueError("Florence-VL takes images and text only; got videos or audio.")
        if images is not None:  # before the base class, whose loader turns paths into RGB (alpha lost)
            images = self._convert_images(images, self._resize_target(kwargs))
            if _holds_no_image(images):  # [] or one empty list per text: a text-only batch
                images = None
        return super().prepare_inputs_layout(images=images, text=text, **kwargs)

    def _convert_images(self, images, target: tuple[tuple[int, int], int] | None, where: str = "images"):
        if isinstance(images, (list, tuple)):
            return [self._convert_images(item, target, f"{where}[{index}]") for index, item in enumerate(images)]
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return [self._convert_images(image, target, f"{where}[{index}]") for index, image in enumerate(images)]
        image = _as_image(images, where, lambda width, height: self.check_image_size(width, height, where))
        background = self.background_colour() if self.image_aspect_ratio == "pad" else None
        if target is not None:
            with _decoding_errors(where, image.mode):
                return resize_to_rgb(image, *target, background=background)
        image = to_rgb(image, where)
        return image if background is None else expand_to_square(image, background)

    def __call__(self, images=None, text=None, videos=None, audio=None, audios=None, **kwargs):
        """`audios` is the old name of `audio` that lmms-eval still passes (empty); anything else is refused."""
        if audios is not None and len(audios) > 0:
            raise ValueError("Florence-VL takes images and text only; got audios.")
        bos = getattr(self.tokenizer, "bos_token", None)
        texts = [text] if isinstance(text, str) else text
        if ("add_special_tokens" not in kwargs and bos and isinstance(texts, (list, tuple)) and texts
                and all(isinstance(item, str) and item.startswith(bos) for item in texts)):
            kwargs["add_special_tokens"] = False  # the chat template already wrote the BOS token
        return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if text is not None and isinstance(images, list) and any(isinstance(item, list) for item in images):
            samples = [text] if isinstance(text, str) else text
            if len(images) != len(samples):
                raise ValueError(f"Got {len(samples)} texts but {len(images)} lists of images; give one list per text.")
            for index, (sample, sample_images) in enumerate(zip(samples, images)):
                sample_images = sample_images if isinstance(sample_images, list) else [sample_images]
                if sample.count(self.image_token) != len(sample_images):
                    raise ValueError(
                        f"Sample {index} has {sample.count(self.image_token)} {self.image_token} tokens in its text "
                        f"but {len(sample_images)} images; put one {self.image_token} in the text per image."
                    )
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per image for serving frameworks (vLLM, TGI), given `(height, width)` per image.

        Every image is resized to one square, so each costs `num_image_tokens` whatever its size.
        """
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(num_image_tokens=[self.num_image_tokens] * len(image_sizes),
                              num_image_patches=[1] * len(image_sizes))

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


FlorenceVLProcessor.register_for_auto_class()

__all__ = ["CHAT_TEMPLATES", "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_SYSTEM_PROMPTS", "END_OF_TURN", "FlorenceVLProcessor",
           "chat_family", "end_of_turn_ids", "expand_to_square", "florence2_image_processor", "resize_to_rgb", "to_rgb"]
