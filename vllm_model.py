"""Florence-VL as a vLLM model, built the way vLLM builds its own VLMs (see `vllm/model_executor/models/llava.py`).

- vision part: transformers' Florence-2 modules (DaViT `Florence2VisionBackbone`, `Florence2MultiModalProjector`,
  the BART encoder), run once per image; the BART encoder runs once per task prompt (the "breadth" features);
- DBFusion + the MLP projector, same layout as `modeling_florence_vl`, so checkpoints load unchanged;
- the LLM: whatever vLLM's own registry builds for `text_config` (paged attention, tensor parallelism);
- a multimodal processor that uses `FlorenceVLProcessor` (it expands each `<image>` into `num_image_tokens`
  placeholders; vLLM does the same expansion for prompts given as token ids).

Only the config and processor of this package are imported: they run on transformers >= 5.16.1.
"""

from collections.abc import Iterable, Mapping, Sequence

import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature
from transformers.activations import ACT2FN
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.models.bart.modeling_bart import BartEncoder
from transformers.models.florence2.modeling_florence2 import Florence2MultiModalProjector, Florence2VisionBackbone
from vllm.config import VllmConfig
from vllm.config.multimodal import BaseDummyOptions
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.media import MediaWithBytes
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

from .processing_florence_vl import FlorenceVLProcessor

IMAGE_PLACEHOLDER = "<image>"


class FlorenceVLDataParser(MultiModalDataParser):
    """vLLM's parser, plus the processor's `max_image_pixels` check before vLLM converts, hashes or preprocesses an
    image: a too-large image is a ValueError, which the server answers with 400 (vLLM has decoded it by then; its
    own `VLLM_MAX_IMAGE_PIXELS` is checked before decoding)."""

    def __init__(self, processor: FlorenceVLProcessor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.processor = processor

    def _parse_image_data(self, data):
        items = data if isinstance(data, (list, tuple)) else [data]
        for index, item in enumerate(items):
            image = item.media if isinstance(item, MediaWithBytes) else item
            if isinstance(image, Image.Image):
                self.processor.check_image_size(*image.size, where=f"image {index}")
        return super()._parse_image_data(data)


class FlorenceVLProcessingInfo(BaseProcessingInfo):
    def get_hf_processor(self, **kwargs: object) -> FlorenceVLProcessor:
        return self.ctx.get_hf_processor(FlorenceVLProcessor, **kwargs)

    def get_data_parser(self) -> MultiModalDataParser:
        return FlorenceVLDataParser(self.get_hf_processor(), expected_hidden_size=self._get_expected_hidden_size(),
                                    allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self) -> int:
        """Every image becomes `image_size`² pixels, so one count for all (`FlorenceVLConfig.num_image_tokens`)."""
        return self.get_hf_config().num_image_tokens

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}


class FlorenceVLDummyInputsBuilder(BaseDummyInputsBuilder[FlorenceVLProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: Mapping[str, BaseDummyOptions]) -> dict:
        side = self.info.get_hf_config().image_size
        overrides = mm_options.get("image") if mm_options else None
        return {"image": self._get_dummy_images(width=side, height=side, num_images=mm_counts.get("image", 0),
                                                overrides=overrides)}


class FlorenceVLMultiModalProcessor(BaseMultiModalProcessor[FlorenceVLProcessingInfo]):
    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        replacement = [config.image_token_id] * config.num_image_tokens
        return [PromptReplacement(modality="image", target=[config.image_token_id], replacement=replacement)]

    def _maybe_apply_prompt_updates(self, mm_items, mm_res):
        """vLLM's expansion, plus a clear ValueError (a 400 from the server) when `<image>` markers and images
        differ in number: vLLM itself fails an assertion for too few markers and ignores extra ones."""
        config = self.info.get_hf_config()
        num_images = mm_items.get_all_counts().get("image", 0)
        message = (f"{num_images} image(s) were given but the prompt's {IMAGE_PLACEHOLDER} markers do not match: put "
                   f"exactly one {IMAGE_PLACEHOLDER} in the prompt per image (chat messages do this for you).")
        try:
            prompt_ids, placeholders = super()._maybe_apply_prompt_updates(mm_items, mm_res)
        except (AssertionError, RuntimeError) as error:
            raise ValueError(message) from error
        if list(prompt_ids).count(config.image_token_id) != num_images * config.num_image_tokens:
            raise ValueError(message)
        return prompt_ids, placeholders


class FlorenceVLVisionTower(nn.Module):
    """DaViT + Florence-2 image projection (V), and the BART encoder over [V ; prompt_p] (V_p), per image.

    Parameter names match `modeling_florence_vl.FlorenceVLVisionTower` (`davit`, `davit_projector`,
    `prompt_encoder`), and so does the computation (the prompt ids are attended without a mask, pads included).
    """

    def __init__(self, config):
        super().__init__()
        florence2 = config.vision_config
        for sub in (florence2, florence2.vision_config, florence2.text_config):
            if getattr(sub, "_attn_implementation", None) is None:
                sub._attn_implementation = "sdpa"  # what `from_pretrained` picks in the transformers pipeline
        self.davit = Florence2VisionBackbone(florence2.vision_config)
        self.davit_projector = Florence2MultiModalProjector(florence2)
        self.prompt_encoder = BartEncoder(florence2.text_config)
        sources = config.feature_sources
        self.use_image = "image" in sources
        rows = [config.vision_prompt_names.index(name) for name in sources if name != "image"]
        prompt_ids = torch.tensor([list(config.vision_prompt_ids[row]) for row in rows], dtype=torch.long)
        self.register_buffer("prompt_ids", prompt_ids.view(len(rows), -1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        image_embeds = self.davit_projector(self.davit(pixel_values).last_hidden_state)
        features = [image_embeds] if self.use_image else []
        if self.prompt_ids.shape[0]:
            batch, num_tokens, dim = image_embeds.shape
            num_prompts = self.prompt_ids.shape[0]
            prompts = self.prompt_encoder.embed_tokens(self.prompt_ids).to(image_embeds.dtype)
            inputs = torch.cat([image_embeds.unsqueeze(0).expand(num_prompts, -1, -1, -1),
                                prompts.unsqueeze(1).expand(-1, batch, -1, -1)], dim=2).flatten(0, 1)
            encoded = self.prompt_encoder(inputs_embeds=inputs).last_hidden_state[:, :num_tokens]
            features += list(encoded.reshape(num_prompts, batch, num_tokens, dim).unbind(0))
        return features


class FlorenceVLMultiModalProjector(nn.Module):
    """DBFusion (channel concat, token concat or average) and the MLP (`mlp3x_gelu` by default)."""

    def __init__(self, config):
        super().__init__()
        self.fusion_mode = config.fusion_mode
        dim = config.vision_config.vision_config.projection_dim
        in_features = dim * len(config.feature_sources) if config.fusion_mode == "channel_concat" else dim
        hidden = config.text_config.hidden_size
        layers = [nn.Linear(in_features, hidden)]
        for _ in range(config.projector_depth - 1):
            layers += [ACT2FN[config.projector_hidden_act], nn.Linear(hidden, hidden)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.fusion_mode == "channel_concat":
            fused = torch.cat(features, dim=-1)
        elif self.fusion_mode == "token_concat":
            fused = torch.cat(features, dim=1)
        else:
            fused = torch.stack(features).mean(0)
        return self.mlp(fused)


@MULTIMODAL_REGISTRY.register_processor(
    FlorenceVLMultiModalProcessor, info=FlorenceVLProcessingInfo, dummy_inputs=FlorenceVLDummyInputsBuilder
)
class FlorenceVLForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError(f"Florence-VL takes images only, got modality {modality!r}.")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        text_config = config.text_config
        if not getattr(text_config, "architectures", None):  # saved text configs carry no architecture
            text_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text_config.model_type]]
        self.configure_mm_token_handling(vocab_size=text_config.vocab_size, mm_token_ids=[config.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = FlorenceVLVisionTower(config)
            self.multi_modal_projector = FlorenceVLMultiModalProjector(config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=text_config, prefix=maybe_prefix(prefix, "language_model")
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        side = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, side, side):
            raise ValueError(f"pixel_values must have shape (num_images, 3, {side}, {side}), got "
                             f"{tuple(pixel_values.shape)}.")
        dtype = next(self.multi_modal_projector.parameters()).dtype
        features = self.vision_tower(pixel_values.to(dtype))
        return self.multi_modal_projector(features)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.language_model.compute_logits(hidden_states)
        if logits is not None:  # never generate `<image>` (the transformers model suppresses it too)
            logits[..., self.config.image_token_id] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
