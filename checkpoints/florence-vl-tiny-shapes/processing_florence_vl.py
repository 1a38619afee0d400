"""Processor of Florence-VL: Florence-2 image preprocessing + the LLM tokenizer with `<image>` placeholders."""

import os

import numpy as np  # a hard dependency of transformers
import torch
from transformers import CLIPImageProcessorPil
from transformers.image_utils import load_image
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import is_vision_available

if is_vision_available():
    from PIL import Image, ImageOps

# Florence-2's normalisation (ImageNet statistics), as in its preprocessor_config.json.
FLORENCE2_IMAGE_MEAN = (0.485, 0.456, 0.406)
FLORENCE2_IMAGE_STD = (0.229, 0.224, 0.225)

# Chat templates of the LLM families the paper uses. `{% generation %}` marks what the assistant says
# (content and end-of-turn token) so that TRL's `assistant_only_loss` can build its mask.
_RENDER_CONTENT = (
    "{%- macro render(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for item in content -%}{%- if item['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)
CHAT_TEMPLATES = {
    "phi3": _RENDER_CONTENT
    + "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '<|assistant|>\n' }}"
    "{% generation %}{{ render(message['content']) }}{{ '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}{{ '<|' + message['role'] + '|>\n' }}{{ render(message['content']) }}{{ '<|end|>\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}",
    "llama3": _RENDER_CONTENT
    + "{{ bos_token }}{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ render(message['content']) }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{%- else -%}{{ render(message['content']) }}{{ '<|eot_id|>' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif -%}",
}


def florence2_image_processor(image_size: int = 768) -> CLIPImageProcessorPil:
    """Florence-2 preprocessing: bicubic resize to a square `image_size`, rescale, ImageNet mean/std."""
    return CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_center_crop=False,
        image_mean=list(FLORENCE2_IMAGE_MEAN), image_std=list(FLORENCE2_IMAGE_STD),
    )


def _array_to_pil(array: np.ndarray, where: str) -> Image.Image:
    """HW, HWC or CHW arrays (1, 3 or 4 channels) of uint8, bool, int or float in [0, 1] -> PIL."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise ValueError(
            f"{where}: cannot read an image from an array of shape {array.shape}; expected (H, W), (H, W, C) or "
            "(C, H, W) with C in 1, 3, 4."
        )
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
    """A local path (opened as is, alpha and bit depth kept), URL or base64 string, decoded now."""
    try:
        image = Image.open(source) if os.path.isfile(source) else load_image(str(source))
        image.load()
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: cannot read an image from {str(source)!r} ({error}).") from error
    return image


def to_rgb(image, where: str = "image") -> Image.Image:
    """Any PIL mode, path, URL, numpy array or torch tensor -> an upright RGB PIL image (alpha on white)."""
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(image, where)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()  # numpy has no bfloat16
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image, where)
    if not isinstance(image, Image.Image):
        raise TypeError(f"{where}: expected a PIL image, numpy array, torch tensor, path or URL, got {type(image)}.")
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):  # high bit depth: scale to 8 bits
            array = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
            image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8))
        if image.mode == "La":  # premultiplied alpha: Pillow converts it to LA only
            image = image.convert("LA")
        if image.mode in ("RGBA", "RGBa", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except OSError as error:  # truncated or corrupt file data is only decoded here
        raise ValueError(f"{where}: the image cannot be decoded ({error}).") from error
    except ValueError as error:  # a mode Pillow cannot convert to RGB
        raise ValueError(f"{where}: cannot convert a PIL image of mode {image.mode!r} to RGB ({error}).") from error


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
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens: int = 577,
                 image_token: str = "<image>", **kwargs):
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

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if videos is not None and len(videos) == 0:  # lmms-eval passes empty lists
            videos = None
        if audio is not None and len(audio) == 0:
            audio = None
        if videos is not None or audio is not None:
            raise ValueError("Florence-VL takes images and text only; got videos or audio.")
        if images is not None:  # before the base class, whose loader turns paths into RGB (alpha lost)
            images = self._convert_images(images)
            if _holds_no_image(images):  # [] or one empty list per text: a text-only batch
                images = None
        return super().prepare_inputs_layout(images=images, text=text, **kwargs)

    def _convert_images(self, images, where: str = "images"):
        if isinstance(images, (list, tuple)):
            return [self._convert_images(item, f"{where}[{index}]") for index, item in enumerate(images)]
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return [to_rgb(image, f"{where}[{index}]") for index, image in enumerate(images)]
        return to_rgb(images, where)

    def __call__(self, images=None, text=None, videos=None, audio=None, audios=None, **kwargs):
        """`audios` is the old name of `audio` that lmms-eval still passes (empty); anything else is refused."""
        if audios is not None and len(audios) > 0:
            raise ValueError("Florence-VL takes images and text only; got audios.")
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

__all__ = ["FlorenceVLProcessor", "CHAT_TEMPLATES", "florence2_image_processor", "to_rgb"]
