"""Processor of Florence-VL: Florence-2 image preprocessing + the LLM tokenizer with `<image>` placeholders."""

import os

import numpy as np  # a hard dependency of transformers
import torch
from transformers import CLIPImageProcessorPil
from transformers.image_utils import PILImageResampling, load_image
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import is_vision_available

if is_vision_available():
    from PIL import Image, ImageOps

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
        image_aspect_ratio (`str`): "pad" (the original Florence-VL, the default: a non-square image is centred on
            a square of the image mean colour, ImageNet mean x 255 = (123, 116, 103), before the resize) or "resize"
            (stretched to the square). A saved processor without this field predates it and was used with
            "resize", which it keeps.

    A text that already starts with the tokenizer's BOS token gets no second one (unless `add_special_tokens` is
    given), so `processor(text=apply_chat_template(...))` and `apply_chat_template(..., tokenize=True)` give the
    same ids.
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens: int = 577,
                 image_token: str = "<image>", image_aspect_ratio: str = "pad", **kwargs):
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r} must be one of {IMAGE_ASPECT_RATIOS}.")
        self.image_aspect_ratio = image_aspect_ratio
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
            return [self._convert_images(image, f"{where}[{index}]") for index, image in enumerate(images)]
        image = to_rgb(images, where)
        return expand_to_square(image, self.background_colour()) if self.image_aspect_ratio == "pad" else image

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

__all__ = ["CHAT_TEMPLATES", "DEFAULT_SYSTEM_PROMPTS", "END_OF_TURN", "FlorenceVLProcessor", "chat_family",
           "end_of_turn_ids", "expand_to_square", "florence2_image_processor", "to_rgb"]
