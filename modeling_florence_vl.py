"""Florence-VL (arXiv 2412.04424): Florence-2 depth and breadth features, fused and fed to a causal LLM.

image ─► DaViT ─► Florence-2 projection ─► V ─┬─────────────────────────────► V
                                              └► BART encoder [V ; prompt_p] ─► V_p  (one per prompt)
[V, V_p...] ─► DBFusion (channel concat) ─► MLP ─► replaces the `<image>` placeholders of the LLM input.
"""

import re
from dataclasses import dataclass, replace

import transformers

# The vLLM path (config, processor, `florence_vl.vllm_plugin`) also runs on older transformers; this file does not.
if tuple(map(int, re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())) < (5, 24):
    raise ImportError(
        f"modeling_florence_vl needs transformers>=5.24,<6, found {transformers.__version__}: "
        "`pip install -U 'transformers>=5.24,<6'`. (To serve with vLLM, which pins an older transformers, use the "
        "vLLM plugin instead: README, section Serving.)"
    )

import torch  # noqa: E402
from torch import nn
from transformers import AutoModel, Florence2Config, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.models.bart.modeling_bart import BartEncoder
from transformers.models.florence2.modeling_florence2 import (
    Florence2MultiModalProjector,
    Florence2VisionBackbone,
    Florence2VisionChannelAttention,
    Florence2VisionPositionalEmbeddingCosine1D,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging, torch_compilable_check
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import is_flash_attention_requested

from .configuration_florence_vl import FlorenceVLConfig


logger = logging.get_logger(__name__)


def _image_hidden_states(output) -> torch.FloatTensor | None:
    """Deprecated, as in transformers' native VLMs: `out.image_outputs.pooler_output` (the projected features)."""
    logger.warning_once("`image_hidden_states` is deprecated, as in transformers' native VLMs; use "
                        "`out.image_outputs.pooler_output` (the projected image features).")
    return None if output.image_outputs is None else output.image_outputs.pooler_output


@dataclass
class FlorenceVLModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    r"""
    The LLM's outputs plus `image_outputs`: the vision encoder's output (`FlorenceVLVisionModelOutput`: DaViT's
    `last_hidden_state`, `hidden_states` and `attentions` when requested, the fused `source_features`, and
    `pooler_output` = the projected features that replaced the `<image>` placeholders), `None` without images.
    """

    image_hidden_states = property(_image_hidden_states)


@dataclass
class FlorenceVLCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*): next-token loss, image and padding labels ignored.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): LM head scores.
    cache (`Cache`, *optional*): the LLM's key/value cache.
    hidden_states, attentions (`tuple[torch.FloatTensor]`, *optional*): the LLM's, when requested.
    image_outputs (`FlorenceVLVisionModelOutput`, *optional*): the vision encoder's output; its `pooler_output`
        (`(num_images, num_image_tokens, hidden_size)`) holds the features that replaced the `<image>` placeholders.
    """

    image_hidden_states = property(_image_hidden_states)


@dataclass
class FlorenceVLVisionModelOutput(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(num_images, num_grid_tokens, davit_dim)`): DaViT's output.
    pooler_output (`torch.FloatTensor`, *optional*): set by `get_image_features` to the projected features of
        shape `(num_images, num_image_tokens, text_hidden_size)`; `None` from the vision model alone.
    hidden_states, attentions (`tuple[torch.FloatTensor]`, *optional*): DaViT's, when requested.
    source_features (`tuple[torch.FloatTensor]`): the fused features, each `(num_images, num_tokens,
        projection_dim)`: V (the Florence-2 projection of DaViT, "depth") and/or V_p (the BART encoder over
        [V ; prompt p], "breadth"), in `FlorenceVLConfig.feature_sources` order.
    """

    source_features: tuple[torch.FloatTensor, ...] | None = None


def _davit_attention(requested: str | None) -> str | None:
    """DaViT's channel attention attends over channels with a "head dim" equal to the number of spatial tokens
    (36,864 in the first stage at 768 px): beyond FlashAttention's and flex attention's limits. Keep it on SDPA."""
    if requested is not None and (is_flash_attention_requested(requested_attention_implementation=requested)
                                  or "flex_attention" in requested):
        logger.info_once(f"Florence-VL: DaViT runs on sdpa, not {requested} (its channel attention has a head dim "
                         "of one per spatial token); the BART prompt encoder and the LLM use what was asked.")
        return "sdpa"
    return requested


class FlorenceVLChannelAttention(Florence2VisionChannelAttention):
    """DaViT's channel attention (same weights, same result) computed on the layout the qkv projection writes.

    transformers permutes q, k, v to (batch, groups, channels, tokens) and hands them to SDPA with the tokens as the
    "head dim", which copies each of them (36,864 tokens x 256 channels per image in the first stage at 768 px) and
    copies the output back. The product contracts over the tokens, so two batched matmuls on strided views of
    (batch, tokens, groups, channels) give it with one copy of the output: 1.1-2.3x faster per stage in bf16 on CPU
    (benchmarks/cpu_kernels.py). Softmax in float32, as SDPA's CPU kernel does for bf16.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, tokens, 3, self.groups, width // self.groups)
        return self.proj(channel_attention_on_layout(qkv))


def channel_attention_on_layout(qkv: torch.Tensor) -> torch.Tensor:
    """DaViT's grouped channel attention from qkv of shape (batch, tokens, 3, groups, width / groups), contracted
    over the tokens on strided views; returns (batch, tokens, width)."""
    batch, tokens, _, groups, group_width = qkv.shape
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, groups, tokens, width / groups)
    scores = (query.transpose(-1, -2) @ key) * tokens**-0.5  # (batch, groups, width / groups, width / groups)
    weights = scores.softmax(-1, dtype=torch.float32).to(value.dtype)
    output = value @ weights.transpose(-1, -2)  # (batch, groups, tokens, width / groups)
    return output.transpose(1, 2).reshape(batch, tokens, groups * group_width)


class FlorenceVLDaViT(Florence2VisionBackbone):
    """Florence-2's DaViT backbone with the channel attention computed in place (`FlorenceVLChannelAttention`);
    resolves any FlashAttention or flex attention request to SDPA."""

    _supports_flash_attn = False
    _supports_flex_attn = False

    def __init__(self, config):
        super().__init__(config)
        for module in self.modules():
            if type(module) is Florence2VisionChannelAttention:
                module.__class__ = FlorenceVLChannelAttention  # same parameters and state-dict keys

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, allow_all_kernels=False):
        return super()._check_and_adjust_attn_implementation(_davit_attention(attn_implementation), is_init_check,
                                                             allow_all_kernels)

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        return super().get_correct_attn_implementation(_davit_attention(requested_attention), is_init_check)


class FlorenceVLPositionalEmbeddingCosine1D(Florence2VisionPositionalEmbeddingCosine1D):
    """Florence-2's fixed temporal position table, cast to the features' dtype where it is used.

    The table is a buffer, and engines that cast only parameters (DeepSpeed's bf16/fp16) leave it in float32 beside
    bf16 weights; added to bf16 features it would promote them to float32 ahead of the bf16 image projection.
    """

    def forward(self, seq_embeds: torch.Tensor) -> torch.Tensor:
        return super().forward(seq_embeds).to(seq_embeds.dtype)


class FlorenceVLImageProjection(Florence2MultiModalProjector):
    """Florence-2's image projection (positions, pooling, linear, norm) with the dtype-following temporal table."""

    def __init__(self, config: Florence2Config):
        super().__init__(config)
        self.visual_temporal_embed = FlorenceVLPositionalEmbeddingCosine1D(config)


class FlorenceVLVisionModel(PreTrainedModel):
    """Florence-2 without its decoder: DaViT, the image projection, and the BART encoder run once per prompt.

    Its config is the Florence-2 config (`FlorenceVLConfig.vision_config`), so `attn_implementation` dispatch
    reaches it as `vision_config` (DaViT as `vision_config.vision_config`, BART as `vision_config.text_config`).
    The Florence-VL settings it needs come in the constructor: `prompt_ids` (one row per prompt to encode, in
    fusion order), `include_image` (V is a fused source) and `batch_prompts` (one BART call for all prompts).
    """

    config: Florence2Config
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlorenceVLVisionModel"]  # device_map="auto" keeps it on one device (parents collect this)
    _supports_sdpa = True
    _supports_flash_attn = True  # the BART prompt encoder; DaViT stays on SDPA (FlorenceVLDaViT)
    _supports_flex_attn = True
    _can_compile_fullgraph = True

    def __init__(self, config: Florence2Config, prompt_ids=(), include_image: bool = True,
                 batch_prompts: bool = True):
        super().__init__(config)
        self.davit = FlorenceVLDaViT(config.vision_config)
        self.davit_projector = FlorenceVLImageProjection(config)
        self.prompt_encoder = BartEncoder(config.text_config)
        self.prompt_ids = tuple(tuple(int(token) for token in row) for row in prompt_ids)
        self.include_image = include_image
        self.batch_prompts = batch_prompts
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Florence2VisionPositionalEmbeddingCosine1D):
            sine, cosine = module.get_sinusoid_embeddings(max_positions=module.max_seq_len, embed_dim=module.embed_dim)
            table = torch.empty(module.max_seq_len, module.embed_dim)
            table[:, 0::2], table[:, 1::2] = sine, cosine
            init.copy_(module.pos_idx_to_embed, table)

    def encode_prompts(self, image_embeds: torch.Tensor) -> list[torch.Tensor]:
        """Breadth features V_p: BART encoder over [V ; prompt_p tokens], image positions kept."""
        if not self.prompt_ids:
            return []
        prompt_ids = torch.tensor(self.prompt_ids, dtype=torch.long, device=image_embeds.device)
        prompt_embeds = self.prompt_encoder.embed_tokens(prompt_ids).to(image_embeds.dtype)
        batch, num_tokens, dim = image_embeds.shape
        num_prompts = len(self.prompt_ids)
        if self.batch_prompts:
            images = image_embeds.unsqueeze(0).expand(num_prompts, -1, -1, -1)
            prompts = prompt_embeds.unsqueeze(1).expand(-1, batch, -1, -1)
            inputs = torch.cat([images, prompts], dim=2).flatten(0, 1)
            encoded = self.prompt_encoder(inputs_embeds=inputs).last_hidden_state[:, :num_tokens]
            return list(encoded.view(num_prompts, batch, num_tokens, dim).unbind(0))
        features = []
        for prompt in prompt_embeds:
            inputs = torch.cat([image_embeds, prompt.expand(batch, -1, -1)], dim=1)
            features.append(self.prompt_encoder(inputs_embeds=inputs).last_hidden_state[:, :num_tokens])
        return features

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> FlorenceVLVisionModelOutput:
        """DaViT once (its `hidden_states`/`attentions` on request), the projection, then BART once per prompt."""
        davit_outputs = self.davit(pixel_values, **kwargs)
        image_embeds = self.davit_projector(davit_outputs.last_hidden_state)
        features = ([image_embeds] if self.include_image else []) + self.encode_prompts(image_embeds)
        return FlorenceVLVisionModelOutput(
            last_hidden_state=davit_outputs.last_hidden_state,
            hidden_states=davit_outputs.hidden_states,
            attentions=davit_outputs.attentions,
            source_features=tuple(features),
        )


class FlorenceVLMultiModalProjector(nn.Module):
    """Depth-Breadth Fusion followed by the MLP projector (`mlp3x_gelu` with the default depth)."""

    def __init__(self, config: FlorenceVLConfig):
        super().__init__()
        self.fusion_mode = config.fusion_mode
        dim = config.vision_config.vision_config.projection_dim
        in_features = dim * len(config.feature_sources) if config.fusion_mode == "channel_concat" else dim
        hidden = config.text_config.hidden_size
        layers = [nn.Linear(in_features, hidden)]
        for _ in range(config.projector_depth - 1):
            layers += [ACT2FN[config.projector_hidden_act], nn.Linear(hidden, hidden)]
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp[::2]:  # N(0, 1/fan_in), not N(0, 0.02): see `_init_weights`
            layer.fan_in_init = True

    def fuse(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.fusion_mode == "channel_concat":
            return torch.cat(features, dim=-1)
        if self.fusion_mode == "token_concat":
            return torch.cat(features, dim=1)
        return torch.stack(features).mean(0)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # Own dtype: QLoRA (TRL) trains a bf16 copy of the projector on full-precision vision features.
        return self.mlp(self.fuse(features).to(self.mlp[0].weight.dtype))


class FlorenceVLPreTrainedModel(PreTrainedModel):
    config: FlorenceVLConfig
    config_class = FlorenceVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True  # the LLM and the BART prompt encoder; DaViT stays on SDPA (FlorenceVLDaViT)
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        # A new projector keeps the features' scale at any width; N(0, 0.02) shrank them ~0.2x per layer at width
        # 128, and a model trained from scratch then ignored the image (README: "What made it learn").
        if isinstance(module, nn.Linear) and getattr(module, "fan_in_init", False):
            init.normal_(module.weight, std=module.in_features**-0.5)
            init.zeros_(module.bias)


class FlorenceVLModel(FlorenceVLPreTrainedModel):
    # Quantization (bitsandbytes and the other transformers quantizers read this list, whatever the user's
    # `llm_int8_skip_modules` says): only the LLM is quantized; the vision tower and the DBFusion projector keep
    # full precision. Side effect: `dtype=torch.float16` keeps them in float32 (DaViT casts its input itself).
    _keep_in_fp32_modules = ["vision_tower", "multi_modal_projector"]

    def __init__(self, config: FlorenceVLConfig):
        super().__init__(config)
        names = config.vision_prompt_names
        self.vision_tower = FlorenceVLVisionModel(
            config.vision_config,
            prompt_ids=[config.vision_prompt_ids[names.index(name)] for name in config.feature_sources
                        if name != "image"],
            include_image="image" in config.feature_sources,
            batch_prompts=config.batch_vision_prompts,
        )
        self.multi_modal_projector = FlorenceVLMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple | FlorenceVLVisionModelOutput:
        """DaViT once, the BART encoder over each prompt, DBFusion and the projector.

        Returns the vision model's output (DaViT's `hidden_states`/`attentions` when requested, `source_features`)
        with `pooler_output` set to the projected features of shape `(num_images, num_image_tokens,
        text_hidden_size)`.
        """
        side = self.config.image_size
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or \
                tuple(pixel_values.shape[1:]) != (3, side, side):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(
                f"pixel_values must be a 4-D tensor (num_images, 3, {side}, {side}) (config.image_size={side}), got "
                f"{shape}. Preprocess images with FlorenceVLProcessor."
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be floating point (normalized by FlorenceVLProcessor), got {pixel_values.dtype}."
            )
        outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
        # a new output rather than setting the field, so that tuples keep the field order (pooler_output second)
        return replace(outputs, pooler_output=self.multi_modal_projector(list(outputs.source_features)))

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the `<image>` placeholders; raises if their count differs from the feature count."""
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embed).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        n_tokens, n_features = mask.sum(), image_features.shape[0] * image_features.shape[1]
        torch_compilable_check(  # no data-dependent Python branch: torch.compile(fullgraph=True) traces through it
            n_tokens == n_features,
            lambda: f"Image features and image tokens do not match: {int(n_tokens)} `<image>` placeholder tokens in "
            f"the input but {n_features} image features ({image_features.shape[0]} images x "
            f"{image_features.shape[1]} tokens). Build inputs with FlorenceVLProcessor, which expands each "
            "`<image>` into the right number of placeholders, and do not truncate inside them.",
        )
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | FlorenceVLModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        if pixel_values is not None and mm_encoder_outputs and mm_encoder_outputs.get("image") is not None:
            raise ValueError("Pass either pixel_values or mm_encoder_outputs, not both.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            # DaViT's hidden states / attentions on request, as native VLMs return their vision tower's
            vision_kwargs = {key: kwargs[key] for key in ("output_hidden_states", "output_attentions") if key in kwargs}
            image_outputs = self.get_image_features(pixel_values, return_dict=True, **vision_kwargs)
        if image_outputs is not None:
            image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return FlorenceVLModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
        )


class FlorenceVLForConditionalGeneration(FlorenceVLPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _keep_in_fp32_modules = ["model.vision_tower", "model.multi_modal_projector"]  # not quantized: see FlorenceVLModel

    def __init__(self, config: FlorenceVLConfig):
        super().__init__(config)
        self.model = FlorenceVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        if self.generation_config is not None and not self.generation_config.suppress_tokens:
            self.generation_config.suppress_tokens = [config.image_token_id]  # never generate `<image>`

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]):
        return self.model.get_image_features(pixel_values, **kwargs)

    def _prepare_generation_config(self, generation_config, **kwargs):
        """Never generate `<image>`: add it to `suppress_tokens`, whatever the saved or passed config says."""
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        suppressed = list(generation_config.suppress_tokens or [])
        if self.config.image_token_id not in suppressed:
            generation_config.suppress_tokens = suppressed + [self.config.image_token_id]
        return generation_config, model_kwargs

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | FlorenceVLCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets; -100, padding is ignored and so are `<image>` placeholder labels.

        Example:

        ```python
        >>> from PIL import Image
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor
        >>> repo = "checkpoints/florence-vl-tiny-shapes"
        >>> model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
        >>> processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        >>> inputs = processor(text="<image>What word is written in the image?",
        ...                    images=Image.open("examples/shapes_0.png"), return_tensors="pt")
        >>> out = model.generate(**inputs, max_new_tokens=8)
        ```"""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            labels = labels.masked_fill(labels == self.config.image_token_id, -100)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return FlorenceVLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )


FlorenceVLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "FlorenceVLPreTrainedModel",
    "FlorenceVLVisionModel",
    "FlorenceVLModel",
    "FlorenceVLForConditionalGeneration",
]
