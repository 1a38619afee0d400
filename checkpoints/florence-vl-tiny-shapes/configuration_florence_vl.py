"""Configuration of Florence-VL (arXiv 2412.04424): Florence-2 vision + Depth-Breadth Fusion + a causal LLM."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

try:  # newer transformers (5.24 has it)
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers 5.16-5.19 (what vLLM pins): sub-configs are built in `__post_init__` below
    SubConfigSpec = None

# Default model type of each sub-config when its dict (or None) names none.
SUB_CONFIG_DEFAULT_TYPES = {"vision_config": "florence2", "text_config": "llama"}

# The Florence-2 task prompts the released checkpoints use, tokenized with the Florence-2 BART
# tokenizer and padded with its pad id (1) into one block. The original code feeds this block
# without an attention mask, so the pads are attended; converted checkpoints must do the same.
DEFAULT_VISION_PROMPT_NAMES = ("caption", "ocr", "grounding")
DEFAULT_VISION_PROMPTS = (
    "Describe in detail what is shown in the image.",
    "What is the text in the image?",
    "Locate the objects in the image, with their descriptions.",
)
DEFAULT_VISION_PROMPT_IDS = (
    (0, 47066, 21700, 11, 4617, 99, 16, 2343, 11, 5, 2274, 4, 2, 1),
    (0, 2264, 16, 5, 2788, 11, 5, 2274, 116, 2, 1, 1, 1, 1),
    (0, 574, 22486, 5, 8720, 11, 5, 2274, 6, 19, 49, 24173, 4, 2),
)
FUSION_MODES = ("channel_concat", "token_concat", "average")
# Every auto class a saved folder answers to (lmms-eval loads `AutoModel` and expects the generating class).
AUTO_MAP = {
    "AutoConfig": "configuration_florence_vl.FlorenceVLConfig",
    "AutoModel": "modeling_florence_vl.FlorenceVLForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_florence_vl.FlorenceVLForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_florence_vl.FlorenceVLForConditionalGeneration",
    "AutoProcessor": "processing_florence_vl.FlorenceVLProcessor",
}


LONGROPE_TYPES = ("longrope", "su")  # "su" is Phi-3's earlier name for longrope


def with_longrope_factor(text_config: dict | PreTrainedConfig | None) -> dict | PreTrainedConfig | None:
    """`text_config` with an explicit `factor` in its longrope parameters, if it has none.

    Phi-3 longrope configs (the released Florence-VL LLMs, Phi-3.5-mini) give only `max_position_embeddings` and
    `original_max_position_embeddings`; transformers 4.43 (which trained Florence-VL) and 5.x without `factor` both
    scale attention by sqrt(1 + log(max / original) / log(original)), but 5.24 and later warn on every load of
    such a config. Writing `factor = max / original` keeps that scaling and silences the warning. A dict is
    copied, a config's `rope_parameters` is replaced in place; anything else is returned unchanged."""
    if isinstance(text_config, PreTrainedConfig):
        key, fields = "rope_parameters", vars(text_config)
    elif isinstance(text_config, dict):  # a saved config says rope_parameters, the original's legacy rope_scaling
        key, fields = ("rope_parameters" if text_config.get("rope_parameters") else "rope_scaling"), text_config
    else:
        return text_config
    rope = fields.get(key)
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) not in LONGROPE_TYPES or "factor" in rope:
        return text_config
    # transformers prefers the top-level original_max_position_embeddings (Phi-3 keeps it there)
    original = fields.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    longest = fields.get("max_position_embeddings")
    if not original or not longest:
        return text_config
    rope = {**rope, "factor": longest / original}
    if isinstance(text_config, dict):
        return {**text_config, key: rope}
    text_config.rope_parameters = rope
    return text_config


@strict
class FlorenceVLConfig(PreTrainedConfig):
    r"""
    Configuration of [`FlorenceVLForConditionalGeneration`].

    Args:
        vision_config (`Florence2Config` or `dict`): Florence-2 (DaViT + BART); only its encoder is used.
        text_config (`PreTrainedConfig` or `dict`): any causal-LM config (Llama, Phi-3, Qwen2, ...).
        image_token_id (`int`): id of the `<image>` placeholder token in the LLM vocabulary.
        image_size (`int`): side of the square input image in pixels (768 for the released models).
        vision_prompt_names (`tuple[str]`): one name per Florence-2 task prompt, used in `vision_feature_sources`.
        vision_prompts (`tuple[str]`): the prompts as text (documentation; the ids below are what runs).
        vision_prompt_ids (`tuple[tuple[int]]`): the prompts tokenized with the Florence-2 tokenizer, one row
            per prompt, all rows the same length. Pad ids in a row are attended, as in the original code.
        vision_feature_sources (`tuple[str]`): which features are fused: `"image"` (V, the DaViT "depth"
            feature) and/or prompt names (the prompt-conditioned "breadth" features). Any non-empty subset.
        fusion_mode (`str`): `"channel_concat"` (the paper's DBFusion), `"token_concat"` or `"average"`.
        projector_depth (`int`): number of Linear layers of the projector MLP (3 = `mlp3x_gelu`).
        projector_hidden_act (`str`): activation between projector layers.
        batch_vision_prompts (`bool`): run all prompts through the Florence-2 encoder in one batched call
            (True) or one call per prompt (False). Same result; pick the faster one for your hardware.

    Example:

    ```python
    >>> from florence_vl import FlorenceVLConfig, FlorenceVLForConditionalGeneration
    >>> config = FlorenceVLConfig(text_config={"model_type": "phi3"})  # Florence-2-base vision + Phi-3
    >>> config.num_image_tokens
    577
    ```"""

    model_type = "florence_vl"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            key: SubConfigSpec(config_class=AutoConfig, model_type=model_type)
            for key, model_type in SUB_CONFIG_DEFAULT_TYPES.items()
        }
    else:
        sub_configs = dict.fromkeys(SUB_CONFIG_DEFAULT_TYPES, AutoConfig)

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    image_size: int = 768
    vision_prompt_names: list[str] | tuple[str, ...] = DEFAULT_VISION_PROMPT_NAMES
    vision_prompts: list[str] | tuple[str, ...] = DEFAULT_VISION_PROMPTS
    vision_prompt_ids: list | tuple = DEFAULT_VISION_PROMPT_IDS
    vision_feature_sources: list[str] | tuple[str, ...] = ("image",) + DEFAULT_VISION_PROMPT_NAMES
    fusion_mode: str = "channel_concat"
    projector_depth: int = 3
    projector_hidden_act: str = "gelu"
    batch_vision_prompts: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.text_config = with_longrope_factor(self.text_config)
        if SubConfigSpec is None:  # what `sub_configs_defaults` does on newer transformers
            for key, model_type in SUB_CONFIG_DEFAULT_TYPES.items():
                value = getattr(self, key)
                if not isinstance(value, PreTrainedConfig):
                    value = dict(value or {})
                    setattr(self, key, CONFIG_MAPPING[value.pop("model_type", model_type)](**value))
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self._validate()

    def _validate(self):
        if self.fusion_mode not in FUSION_MODES:
            raise ValueError(f"fusion_mode={self.fusion_mode!r} is not supported; use one of {FUSION_MODES}.")
        if self.projector_depth < 1:
            raise ValueError(f"projector_depth={self.projector_depth} must be >= 1 (3 = the released mlp3x_gelu).")
        if self.image_size < 32:
            raise ValueError(f"image_size={self.image_size} is too small; DaViT downsamples by 32, use >= 32.")
        names, rows = tuple(self.vision_prompt_names), tuple(tuple(row) for row in self.vision_prompt_ids)
        if len(set(names)) != len(names) or "image" in names:
            raise ValueError(f"vision_prompt_names={names} must be unique and must not contain 'image'.")
        if len(rows) != len(names) or len(self.vision_prompts) != len(names):
            raise ValueError(
                f"vision_prompt_names ({len(names)}), vision_prompts ({len(self.vision_prompts)}) and "
                f"vision_prompt_ids ({len(rows)} rows) must have the same length: one entry per prompt."
            )
        if len({len(row) for row in rows}) > 1 or any(len(row) == 0 for row in rows):
            raise ValueError(
                f"vision_prompt_ids rows have lengths {[len(row) for row in rows]}; pad every row with the "
                "Florence-2 pad id to one common, non-zero length."
            )
        allowed = ("image",) + names
        sources = tuple(self.vision_feature_sources)
        unknown = [source for source in sources if source not in allowed]
        if not sources or unknown or len(set(sources)) != len(sources):
            raise ValueError(
                f"vision_feature_sources={sources} must be a non-empty list of distinct names from {allowed}."
            )

    @property
    def feature_sources(self) -> tuple[str, ...]:
        """The fused sources in canonical order: V first, then prompts in `vision_prompt_names` order."""
        return tuple(name for name in ("image", *self.vision_prompt_names) if name in self.vision_feature_sources)

    @property
    def vision_grid_size(self) -> int:
        """Side of the DaViT output grid for `image_size` (conv arithmetic of each stage)."""
        size = self.image_size
        vision = self.vision_config
        for kernel, stride, padding in zip(vision.vision_config.patch_size, vision.vision_config.patch_stride,
                                           vision.vision_config.patch_padding):
            size = (size + 2 * padding - kernel) // stride + 1
        return size

    @property
    def num_image_tokens(self) -> int:
        """Placeholders per image: grid tokens + 1 pooled token, times the sources under token concat."""
        per_source = self.vision_grid_size**2 + 1
        return per_source * len(self.feature_sources) if self.fusion_mode == "token_concat" else per_source


FlorenceVLConfig.register_for_auto_class()

__all__ = ["FlorenceVLConfig"]
