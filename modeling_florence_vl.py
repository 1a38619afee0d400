"""Florence-VL (arXiv 2412.04424): Florence-2 depth and breadth features, fused and fed to a causal LLM.

image ─► DaViT ─► Florence-2 projection ─► V ─┬─────────────────────────────► V
                                              └► BART encoder [V ; prompt_p] ─► V_p  (one per prompt)
[V, V_p...] ─► DBFusion (channel concat) ─► MLP ─► replaces the `<image>` placeholders of the LLM input.
"""

import re
from dataclasses import dataclass

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
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput
from transformers.models.bart.modeling_bart import BartEncoder
from transformers.models.florence2.modeling_florence2 import (
    Florence2MultiModalProjector,
    Florence2VisionBackbone,
    Florence2VisionPositionalEmbeddingCosine1D,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_florence_vl import FlorenceVLConfig


@dataclass
class FlorenceVLModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_hidden_states (`torch.FloatTensor` of shape `(num_images, num_image_tokens, hidden_size)`, *optional*):
        Projected image features that replaced the `<image>` placeholders.
    """

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class FlorenceVLCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*): next-token loss, image and padding labels ignored.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): LM head scores.
    cache (`Cache`, *optional*): the LLM's key/value cache.
    hidden_states, attentions (`tuple[torch.FloatTensor]`, *optional*): the LLM's, when requested.
    image_hidden_states (`torch.FloatTensor` of shape `(num_images, num_image_tokens, hidden_size)`, *optional*):
        Projected image features that replaced the `<image>` placeholders.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


class FlorenceVLVisionTower(nn.Module):
    """Florence-2 without its decoder: DaViT, the image projection, and the BART encoder run once per prompt.

    `forward` returns the feature sources in config order, each of shape `(batch, num_tokens, projection_dim)`.
    """

    def __init__(self, config: FlorenceVLConfig):
        super().__init__()
        self.config = config
        self.davit = Florence2VisionBackbone(config.vision_config.vision_config)
        self.davit_projector = Florence2MultiModalProjector(config.vision_config)
        self.prompt_encoder = BartEncoder(config.vision_config.text_config)
        names = config.vision_prompt_names
        self.prompt_rows = [names.index(name) for name in config.feature_sources if name != "image"]

    def encode_prompts(self, image_embeds: torch.Tensor) -> list[torch.Tensor]:
        """Breadth features V_p: BART encoder over [V ; prompt_p tokens], image positions kept."""
        if not self.prompt_rows:
            return []
        prompt_ids = torch.tensor(self.config.vision_prompt_ids, device=image_embeds.device)[self.prompt_rows]
        prompt_embeds = self.prompt_encoder.embed_tokens(prompt_ids).to(image_embeds.dtype)
        batch, num_tokens, dim = image_embeds.shape
        num_prompts = len(self.prompt_rows)
        if self.config.batch_vision_prompts:
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

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> tuple[list[torch.Tensor], BaseModelOutputWithPooling]:
        davit_outputs = self.davit(pixel_values, **kwargs)
        image_embeds = self.davit_projector(davit_outputs.last_hidden_state)
        features = ([image_embeds] if "image" in self.config.feature_sources else []) + self.encode_prompts(
            image_embeds
        )
        return features, davit_outputs


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
        return self.mlp(self.fuse(features))


class FlorenceVLPreTrainedModel(PreTrainedModel):
    config: FlorenceVLConfig
    config_class = FlorenceVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlorenceVLVisionTower"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Florence2VisionPositionalEmbeddingCosine1D):
            sine, cosine = module.get_sinusoid_embeddings(max_positions=module.max_seq_len, embed_dim=module.embed_dim)
            table = torch.empty(module.max_seq_len, module.embed_dim)
            table[:, 0::2], table[:, 1::2] = sine, cosine
            init.copy_(module.pos_idx_to_embed, table)
        # A new projector keeps the features' scale at any width; N(0, 0.02) shrank them ~0.2x per layer at width
        # 128, and a model trained from scratch then ignored the image (README: "What made it learn").
        if isinstance(module, nn.Linear) and getattr(module, "fan_in_init", False):
            init.normal_(module.weight, std=module.in_features**-0.5)
            init.zeros_(module.bias)


class FlorenceVLModel(FlorenceVLPreTrainedModel):
    def __init__(self, config: FlorenceVLConfig):
        super().__init__(config)
        self.vision_tower = FlorenceVLVisionTower(config)
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
    ) -> tuple | BaseModelOutputWithPooling:
        """DaViT once, the BART encoder over each prompt, DBFusion and the projector.

        Returns the DaViT output (its `hidden_states`/`attentions` when requested) with `pooler_output` set to
        the projected features of shape `(num_images, num_image_tokens, text_hidden_size)`.
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
        features, outputs = self.vision_tower(pixel_values, **kwargs)
        outputs.pooler_output = self.multi_modal_projector(features)
        return outputs

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
        n_tokens, n_features = int(mask.sum()), image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image tokens do not match: {n_tokens} `<image>` placeholder tokens in the "
                f"input but {n_features} image features ({image_features.shape[0]} images x "
                f"{image_features.shape[1]} tokens). Build inputs with FlorenceVLProcessor, which expands each "
                "`<image>` into the right number of placeholders, and do not truncate inside them."
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
            image_outputs = self.get_image_features(pixel_values, return_dict=True)
        image_features = None
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
            image_hidden_states=image_features,
        )


class FlorenceVLForConditionalGeneration(FlorenceVLPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

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
            image_hidden_states=outputs.image_hidden_states,
        )


FlorenceVLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["FlorenceVLPreTrainedModel", "FlorenceVLModel", "FlorenceVLForConditionalGeneration"]
