"""Florence-VL from real weights: build it from pretrained parts, convert the released checkpoints, publish.

- `from_pretrained_parts(florence2, llm)`: a native Florence-2 checkpoint (`florence-community/Florence-2-large`)
  + any causal LM -> `(model, processor)`, the starting point of stage 1. The Florence-2 decoder is dropped and
  the DBFusion projector is freshly initialised.
- `convert_original(src, dst)`: an original Florence-VL checkpoint folder (LLaVA layout, `llava_phi` /
  `llava_llama`, e.g. `jiuhai/florence-vl-8b-sft`) -> this package's format, loadable with `trust_remote_code=True`.
  Command line: `python -m florence_vl.convert SRC DST` (or `florence-vl convert SRC DST`).
- `model_card`, `save_for_hub`, `files_to_upload`, `push_folder_to_hub`: share a model on the Hub.

Key mapping of `convert_original`, original LLaVA-layout name -> ours. `V.` = `model.vision_tower.vision_tower.`
(the Florence-2 remote-code model inside the LLaVA vision tower; a separate `vision_tower/` folder has the same
names without it); `T.` = our `model.vision_tower.`; `{X}` = spatial or channel:

    V.vision_tower.convs.{i}.proj.* / .norm.*            -> T.davit.convs.{i}.conv.* / .norm.*
    V.vision_tower.blocks.{s}.{b}.{X}_block.conv{1,2}.fn.dw.* -> T.davit.blocks.{s}.{b}.{X}_block.conv{1,2}.*
    V.….spatial_block.window_attn.norm.* / .fn.{qkv,proj}.*   -> T.….spatial_block.norm1.* / .window_attn.{qkv,proj}.*
    V.….channel_block.channel_attn.norm.* / .fn.{qkv,proj}.*  -> T.….channel_block.norm1.* / .channel_attn.{qkv,proj}.*
    V.….{X}_block.ffn.norm.* / .ffn.fn.net.fc{1,2}.*          -> T.….{X}_block.norm2.* / .ffn.fc{1,2}.*
    V.image_projection, shape (dim_embed[-1], D)         -> T.davit_projector.image_projection.weight, transposed
    V.image_proj_norm.*                                  -> T.davit_projector.image_proj_norm.*
    V.image_pos_embed.{row,column}_embeddings.weight     -> T.davit_projector.image_position_embed.*
    V.visual_temporal_embed.pos_idx_to_embed             -> T.davit_projector.visual_temporal_embed.pos_idx_to_embed
    V.language_model.model.shared.weight                 -> T.prompt_encoder.embed_tokens.weight
    V.language_model.model.encoder.*                     -> T.prompt_encoder.* (its embed_tokens: a tied copy)
    model.mm_projector.encoder_mlp.0.*                   -> model.multi_modal_projector.mlp.0.*
    model.mm_projector.encoder_mlp.{k}.1.*               -> model.multi_modal_projector.mlp.{2k}.*
    model.{embed_tokens,layers,norm}.*                   -> model.language_model.{embed_tokens,layers,norm}.*
    lm_head.weight                                       -> lm_head.weight
    dropped: V.language_model.model.decoder.*, V.language_model.lm_head.weight, V.language_model.final_logits_bias
"""

import argparse
import copy
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from safetensors.torch import load_file
from transformers import (
    AddedToken,
    AutoModelForCausalLM,
    AutoTokenizer,
    BartConfig,
    Florence2Config,
    Florence2ForConditionalGeneration,
    GenerationConfig,
    PreTrainedConfig,
)

from .configuration_florence_vl import DEFAULT_VISION_PROMPT_IDS, DEFAULT_VISION_PROMPTS, FlorenceVLConfig
from .modeling_florence_vl import FlorenceVLForConditionalGeneration
from .processing_florence_vl import (
    CHAT_TEMPLATES,
    IMAGE_ASPECT_RATIOS,
    ORIGINAL_MODEL_TYPES,
    FlorenceVLProcessor,
    chat_family,
    end_of_turn_ids,
    florence2_image_processor,
)

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
DAVIT = "model.vision_tower.davit."
DAVIT_PROJECTOR = "model.vision_tower.davit_projector."
PROMPT_ENCODER = "model.vision_tower.prompt_encoder."
# A renaming rule: full-match regex -> target template, function of the match, or None (a known-unused weight).
Rule = tuple[str, str | Callable[[re.Match], str] | None]
_BLOCK = r"vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial|channel)_block\."
_OUT_BLOCK = DAVIT + r"blocks.\1.\2.\3_block."

# Original Florence-2 remote-code names -> ours. Rules are full-match regexes tried in order; a `None` target
# marks a weight Florence-VL never uses (the BART decoder and LM head).
FLORENCE2_ORIGINAL_RULES: tuple[Rule, ...] = (
    (r"vision_tower\.convs\.(\d+)\.proj\.(weight|bias)", DAVIT + r"convs.\1.conv.\2"),
    (r"vision_tower\.convs\.(\d+)\.norm\.(weight|bias)", DAVIT + r"convs.\1.norm.\2"),
    (_BLOCK + r"(conv1|conv2)\.fn\.dw\.(weight|bias)", _OUT_BLOCK + r"\4.\5"),
    (_BLOCK + r"(?:window_attn|channel_attn)\.norm\.(weight|bias)", _OUT_BLOCK + r"norm1.\4"),
    (_BLOCK + r"(window_attn|channel_attn)\.fn\.(qkv|proj)\.(weight|bias)", _OUT_BLOCK + r"\4.\5.\6"),
    (_BLOCK + r"ffn\.norm\.(weight|bias)", _OUT_BLOCK + r"norm2.\4"),
    (_BLOCK + r"ffn\.fn\.net\.(fc1|fc2)\.(weight|bias)", _OUT_BLOCK + r"ffn.\4.\5"),
    (r"image_projection", DAVIT_PROJECTOR + "image_projection.weight"),  # a raw (in, out) matrix: transposed
    (r"image_proj_norm\.(weight|bias)", DAVIT_PROJECTOR + r"image_proj_norm.\1"),
    (r"image_pos_embed\.(row|column)_embeddings\.weight",
     DAVIT_PROJECTOR + r"image_position_embed.\1_embeddings.weight"),
    (r"visual_temporal_embed\.pos_idx_to_embed", DAVIT_PROJECTOR + "visual_temporal_embed.pos_idx_to_embed"),
    (r"language_model\.model\.shared\.weight", PROMPT_ENCODER + "embed_tokens.weight"),
    (r"language_model\.model\.encoder\.(.+)", PROMPT_ENCODER + r"\1"),  # its embed_tokens is a tied copy of shared
    (r"language_model\.model\.decoder\..+", None),
    (r"language_model\.(lm_head\.weight|final_logits_bias)", None),
)
ORIGINAL_TRANSPOSED = frozenset({DAVIT_PROJECTOR + "image_projection.weight"})

# transformers' native Florence-2 (`Florence2ForConditionalGeneration`) names -> ours.
FLORENCE2_NATIVE_RULES: tuple[Rule, ...] = (
    (r"model\.vision_tower\.(.+)", DAVIT + r"\1"),
    (r"model\.multi_modal_projector\.(.+)", DAVIT_PROJECTOR + r"\1"),
    (r"model\.language_model\.shared\.weight", PROMPT_ENCODER + "embed_tokens.weight"),
    (r"model\.language_model\.encoder\.(.+)", PROMPT_ENCODER + r"\1"),
    (r"model\.language_model\.decoder\..+", None),
    (r"(lm_head\.weight|final_logits_bias)", None),
)

# LLaVA-layout names outside the vision tower -> ours. The projector is `encoder_mlp = Sequential(Linear,
# *[Sequential(GELU, Linear)])`, ours `mlp = Sequential(Linear, GELU, Linear, GELU, Linear)`.
LLAVA_RULES: tuple[Rule, ...] = (
    (r"model\.mm_projector\.encoder_mlp\.0\.(weight|bias)", r"model.multi_modal_projector.mlp.0.\1"),
    (r"model\.mm_projector\.encoder_mlp\.(\d+)\.1\.(weight|bias)",
     lambda match: f"model.multi_modal_projector.mlp.{2 * int(match[1])}.{match[2]}"),
    (r"model\.(.+)", r"model.language_model.\1"),
    (r"lm_head\.weight", "lm_head.weight"),
)
# Where the Florence-2 remote-code model sits inside an original LLaVA-layout state dict.
ORIGINAL_VISION_PREFIX = "model.vision_tower.vision_tower."
# The Florence-2 config the released checkpoints were trained on (microsoft/Florence-2-large, config.json).
FLORENCE2_LARGE_ORIGINAL = {
    "vision_config": {
        "model_type": "davit", "drop_path_rate": 0.1, "patch_size": [7, 3, 3, 3], "patch_stride": [4, 2, 2, 2],
        "patch_padding": [3, 1, 1, 1], "patch_prenorm": [False, True, True, True], "dim_embed": [256, 512, 1024, 2048],
        "num_heads": [8, 16, 32, 64], "num_groups": [8, 16, 32, 64], "depths": [1, 1, 9, 1], "window_size": 12,
        "projection_dim": 1024, "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": 100},
        "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": 50},
        "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
    },
    "text_config": {
        "vocab_size": 51289, "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12,
        "encoder_attention_heads": 16, "decoder_attention_heads": 16, "encoder_ffn_dim": 4096,
        "decoder_ffn_dim": 4096, "max_position_embeddings": 4096, "activation_function": "gelu", "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1,
        "scale_embedding": False, "init_std": 0.02, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "decoder_start_token_id": 2,
    },
}


@dataclass
class ConversionReport:
    """What a conversion did: `dropped` = known-unused source weights, `unrecognised` = source keys no rule knows."""

    loaded: int = 0
    dropped: list[str] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)
    added_tokens: list[str] = field(default_factory=list)
    vocab_resized: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {self.loaded} tensors", f"dropped {len(self.dropped)} unused tensors"
                 + (f" ({_prefixes(self.dropped)})" if self.dropped else "")]
        if self.unrecognised:
            lines.append(f"ignored {len(self.unrecognised)} unrecognised tensors: {self.unrecognised}")
        if self.added_tokens:
            lines.append(f"added tokens {self.added_tokens}")
        if self.vocab_resized:
            lines.append(f"resized the LLM vocabulary {self.vocab_resized[0]} -> {self.vocab_resized[1]}")
        return "; ".join(lines + self.notes)


def _prefixes(keys: list[str], depth: int = 4) -> str:
    """`a.b.c.d.*` groups of a long key list, for messages."""
    return ", ".join(sorted({key if key.count(".") < depth else ".".join(key.split(".")[:depth]) + ".*"
                             for key in keys}))


# ----------------------------------------------------------------------------------------------- key mapping


def rename_key(key: str, rules: tuple[Rule, ...]) -> tuple[bool, str | None]:
    """(matched, new name); new name None = a known-unused weight."""
    for pattern, target in rules:
        match = re.fullmatch(pattern, key)
        if match is None:
            continue
        if target is None or isinstance(target, str):
            return True, None if target is None else match.expand(target)
        return True, target(match)
    return False, None


def rename_state_dict(
    source: dict[str, torch.Tensor], rules: tuple[Rule, ...], report: ConversionReport,
    transposed: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Apply `rules` to every key (targets in `transposed` get transposed); tied copies must be equal."""
    renamed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in source.items():
        matched, target = rename_key(key, rules)
        if not matched:
            report.unrecognised.append(key)
            continue
        if target is None:
            report.dropped.append(key)
            continue
        tensor = tensor.t().contiguous() if target in transposed else tensor
        if target in renamed:
            if not torch.equal(renamed[target], tensor):
                raise ValueError(f"{origin[target]!r} and {key!r} both map to {target!r} but differ; they should be "
                                 "tied copies of one weight.")
            continue
        renamed[target], origin[target] = tensor, key
    return renamed


def check_complete(model_config: FlorenceVLConfig, state_dict: dict[str, torch.Tensor], where: str,
                   may_miss: str | None = None) -> None:
    """Raise a ValueError listing every weight of the model that `state_dict` leaves unfilled or gets wrong.

    `may_miss`: a prefix of weights that are initialised instead (the projector when building from parts)."""
    with torch.device("meta"):
        expected = FlorenceVLForConditionalGeneration(model_config).state_dict()
    if model_config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(key for key in set(expected) - set(state_dict) if not (may_miss and key.startswith(may_miss)))
    if missing:
        hint = ""
        if any(key.startswith("model.vision_tower.") for key in missing):
            hint = (" Vision weights are read from `model.vision_tower.vision_tower.*` of the checkpoint or from a "
                    "`vision_tower/` folder holding the original Florence-2 checkpoint.")
        raise ValueError(f"{len(missing)} weights of the converted model have no source in {where}: "
                         f"{missing}.{hint}")
    wrong = {key: (tuple(state_dict[key].shape), tuple(expected[key].shape)) for key in expected
             if key in state_dict and state_dict[key].shape != expected[key].shape}
    if wrong:
        raise ValueError(f"Weights of {where} have shapes that do not fit the config (got, expected): {wrong}. "
                         "If the Florence-2 or LLM config is not the one these weights were trained with, pass the "
                         "right one (e.g. --florence2-config).")


# ----------------------------------------------------------------------------------------------- configs


def florence2_config_from_original(original: dict, where: str = "the Florence-2 config") -> Florence2Config:
    """The Florence-2 remote-code config (a DaViT `vision_config` with `dim_embed`) as transformers' native config.

    The vision `model_type` is not checked: the original training code (transformers 4.43) saved it as `""`."""
    vision, text = original.get("vision_config"), original.get("text_config")
    if not isinstance(vision, dict) or not isinstance(text, dict) or "dim_embed" not in vision:
        raise ValueError(f"{where}: not an original Florence-2 config (needs `vision_config` with `dim_embed` and "
                         "`text_config`); pass --florence2-config with microsoft/Florence-2-large's config.json.")
    expected = {"visual_temporal_embedding.type": "COSINE", "image_pos_embed.type": "learned_abs_2d",
                "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"]}
    found = {"visual_temporal_embedding.type": vision.get("visual_temporal_embedding", {}).get("type"),
             "image_pos_embed.type": vision.get("image_pos_embed", {}).get("type"),
             "image_feature_source": list(vision.get("image_feature_source", []))}
    unsupported = {f"vision_config.{key}": value for key, value in found.items() if value != expected[key]}
    unsupported.update({f"text_config.{key}": True for key in ("add_final_layer_norm", "normalize_before")
                        if text.get(key)})
    if unsupported:
        raise ValueError(f"{where}: unsupported Florence-2 config values {unsupported}; transformers' native "
                         f"Florence-2 supports {expected} and a post-norm BART without final layer norm.")
    native_vision = {key: vision[key] for key in ("depths", "patch_size", "patch_stride", "patch_padding",
                                                  "patch_prenorm", "num_heads", "num_groups", "window_size",
                                                  "drop_path_rate", "projection_dim", "mlp_ratio", "qkv_bias")
                     if key in vision}
    native_vision.update(
        embed_dim=vision["dim_embed"],
        max_temporal_embeddings=vision["visual_temporal_embedding"]["max_temporal_embeddings"],
        max_position_embeddings=vision["image_pos_embed"]["max_pos_embeddings"],
    )
    native_text = {key: value for key, value in text.items() if key in BartConfig.__dataclass_fields__}
    return Florence2Config(vision_config=native_vision, text_config=dict(native_text, model_type="bart"))


def text_config_from_llava(llava: dict) -> tuple[dict, str]:
    """The LLM config inside a LLaVA-layout config (LLaVA keys removed) and its chat template family."""
    if llava.get("model_type") not in ORIGINAL_MODEL_TYPES:
        raise ValueError(f"config.json has model_type={llava.get('model_type')!r}; expected one of "
                         f"{sorted(ORIGINAL_MODEL_TYPES)} (an original Florence-VL checkpoint).")
    model_type, family = ORIGINAL_MODEL_TYPES[llava["model_type"]]
    llava_only = ("architectures", "auto_map", "_name_or_path", "transformers_version", "model_type", "vision_tower")
    text = {key: value for key, value in llava.items() if key not in llava_only and "mm_" not in key
            and not key.startswith(("tokenizer_", "image_"))}
    return dict(text, model_type=model_type), family


def projector_depth_from_llava(llava: dict) -> int:
    projector = llava.get("mm_projector_type", "")
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector)
    if match is None:
        raise ValueError(f"config.json: mm_projector_type={projector!r} is not supported; Florence-VL checkpoints use "
                         "'mlp<N>x_gelu' (DBFusion channel concat followed by an N-layer GELU MLP).")
    return int(match.group(1))


def _read_json(path: Path) -> dict:
    with open(path) as file:
        return json.load(file)


def original_florence2_config(src: Path, llava: dict, florence2_config: str | None) -> tuple[dict, str]:
    """(the original Florence-2 config, where it came from): `florence2_config` (file or folder), else
    `SRC/vision_tower/config.json` (what the original training code saves), else the built-in Florence-2-large
    config when the projector width `mm_hidden_size` is Florence-2-large's (the weights' shapes are checked later)."""
    if florence2_config:
        path = Path(florence2_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"--florence2-config {florence2_config}: no Florence-2 config.json there.")
        return _read_json(path), str(path)
    path = src / "vision_tower" / "config.json"
    if path.is_file():
        return _read_json(path), str(path)
    large = FLORENCE2_LARGE_ORIGINAL["vision_config"]["projection_dim"]
    if llava.get("mm_hidden_size") == large:
        where = f"the built-in Florence-2-large config ({src / 'config.json'}: mm_hidden_size={large})"
        return FLORENCE2_LARGE_ORIGINAL, where
    raise ValueError(f"{src}: no vision_tower/config.json, and {src / 'config.json'} has mm_hidden_size="
                     f"{llava.get('mm_hidden_size')!r} (Florence-2-large's is {large}); pass --florence2-config with "
                     "the original Florence-2 config.json the checkpoint was trained with.")


def original_preprocessing(src: Path, llava: dict, image_size: int | None) -> tuple[int, str, list[str]]:
    """(image_size, image_aspect_ratio, notes) of an original checkpoint.

    `image_size` (when not given) and the normalisation come from `SRC/vision_tower/preprocessor_config.json`
    (Florence-2's processor as the original saved it); `image_aspect_ratio` from config.json: "pad" pads,
    "square" or none stretches (`process_images`' other branch), "anyres" is not supported."""
    notes = []
    path = src / "vision_tower" / "preprocessor_config.json"
    if path.is_file():
        saved = _read_json(path)
        reference = florence2_image_processor()
        for key in ("image_mean", "image_std"):
            if key in saved and any(abs(a - b) > 1e-6 for a, b in zip(saved[key], getattr(reference, key))):
                raise ValueError(f"{path}: {key}={saved[key]} differs from Florence-2's {list(getattr(reference, key))}"
                                 "; this converter reproduces Florence-2's preprocessing only.")
        if saved.get("resample", 3) != 3 or saved.get("do_center_crop"):
            raise ValueError(f"{path}: resample={saved.get('resample')}, do_center_crop={saved.get('do_center_crop')}"
                             "; Florence-2 resizes bicubic (3) without a centre crop.")
        size = saved.get("size", {})
        if image_size is None:
            if not (isinstance(size, dict) and size.get("height") and size.get("height") == size.get("width")):
                raise ValueError(f"{path}: size={size!r} is not a square height/width; pass --image-size.")
            image_size = int(size["height"])
    elif image_size is None:
        image_size = 768
        notes.append("no vision_tower/preprocessor_config.json: image size 768 (Florence-2-large's)")
    ratio = llava.get("image_aspect_ratio") or "square"
    if ratio not in ("pad", "square"):
        raise ValueError(f"{src / 'config.json'}: image_aspect_ratio={ratio!r} is not supported; the original's "
                         "'pad' and 'square' are (processor image_aspect_ratio 'pad' / 'resize').")
    return image_size, "pad" if ratio == "pad" else "resize", notes


def load_original_tokenizer(src: Path):
    """The LLM tokenizer of an original checkpoint, read from its tokenizer files only.

    `AutoTokenizer.from_pretrained(src)` would also read config.json, whose `llava_phi` / `llava_llama` type is
    unknown to transformers and whose legacy `rope_scaling` breaks the generic config it falls back to."""
    from transformers import PreTrainedConfig as _Config

    try:
        return AutoTokenizer.from_pretrained(src, config=_Config())
    except Exception as error:  # any failure inside transformers: say which files and what to do
        files = sorted(path.name for path in src.iterdir() if path.name.startswith(("tokenizer", "special_tokens")))
        raise ValueError(f"{src}: cannot load the LLM tokenizer from {files} ({type(error).__name__}: {error}); "
                         "fix or replace the tokenizer files, or remove them and pass --image-token-id.") from error


# ----------------------------------------------------------------------------------------------- weights I/O


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: those its index names, else `*.safetensors`, else
    `pytorch_model*.bin` (never other `.bin` files such as the pickled `training_args.bin`)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            return [folder / name for name in sorted(set(_read_json(folder / index_name)["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder; `.bin` files are read with `weights_only=True`."""
    files = weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            tensors.update(load_file(file))
        else:
            tensors.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return tensors


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


# ----------------------------------------------------------------------------------------------- shared steps


def add_image_token(tokenizer, report: ConversionReport) -> int:
    """Make `<image>` a special token of `tokenizer` (added if new); left padding for batched generation."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        report.added_tokens.append(IMAGE_TOKEN)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        report.notes.append(f"the LLM tokenizer has no pad token: padding with {tokenizer.eos_token!r}")
    tokenizer.padding_side = "left"
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def fit_vocabulary(model: FlorenceVLForConditionalGeneration, size: int, report: ConversionReport) -> None:
    """Grow the LLM embeddings (and a separate `lm_head`) to `size` rows; new rows = mean of the old rows."""
    old = model.get_input_embeddings().weight.shape[0]
    if size <= old:
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[old:] = weight[:old].mean(0)
    report.vocab_resized = (old, size)


def resolve_chat_template(chat_template: str | None, text_model_type: str) -> str:
    """A family name (`CHAT_TEMPLATES` key), a Jinja template, or None = the family of the LLM's model_type."""
    if chat_template is None:
        chat_template = chat_family(text_model_type)
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    if "{%" not in chat_template and "{{" not in chat_template:
        raise ValueError(f"chat_template={chat_template!r} is neither one of {sorted(CHAT_TEMPLATES)} nor a Jinja "
                         "template.")
    return chat_template


def build_processor(tokenizer, config: FlorenceVLConfig, chat_template: str,
                    image_aspect_ratio: str = "pad") -> FlorenceVLProcessor:
    """The processor of a new model; "pad" (the original's aspect-ratio handling) unless told otherwise."""
    if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r} must be one of {IMAGE_ASPECT_RATIOS}.")
    return FlorenceVLProcessor(image_processor=florence2_image_processor(config.image_size), tokenizer=tokenizer,
                               chat_template=chat_template, num_image_tokens=config.num_image_tokens,
                               image_aspect_ratio=image_aspect_ratio)


def set_generation_defaults(model, tokenizer, generation_config: GenerationConfig | None = None) -> None:
    """Greedy decoding, as the original evaluated (temperature 0): stop at the LLM's EOS ids (from
    `generation_config` if given) and every known end-of-turn token, pad with the pad id, never emit `<image>`.
    Nothing else is inherited: an instruct LLM's sampling defaults (do_sample, temperature, top_p) are dropped."""
    source = generation_config or GenerationConfig.from_model_config(model.config.text_config)
    eos = source.eos_token_id if source.eos_token_id is not None else tokenizer.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    eos = list(dict.fromkeys(token for token in eos + end_of_turn_ids(tokenizer) if token is not None))
    model.generation_config = GenerationConfig(
        bos_token_id=source.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[model.config.image_token_id], do_sample=False,
    )


def load_from_state_dict(config: FlorenceVLConfig, state_dict: dict, dtype) -> FlorenceVLForConditionalGeneration:
    """transformers' loader (meta init, missing weights initialised by `_init_weights`, tying) on a state dict."""
    model = FlorenceVLForConditionalGeneration.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype)
    return model.eval()


# ----------------------------------------------------------------------------------------------- from parts


def prompt_ids(tokenizer, prompts: tuple[str, ...] | list[str]) -> tuple[tuple[int, ...], ...]:
    """Prompts tokenized with the Florence-2 tokenizer, padded to one length with its pad id (as the original)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("The Florence-2 tokenizer has no pad token; the prompt rows are padded with it.")
    rows = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    width = max(len(row) for row in rows)
    return tuple(tuple(row) + (tokenizer.pad_token_id,) * (width - len(row)) for row in rows)


def from_pretrained_parts(
    florence2: str,
    llm: str,
    *,
    image_size: int = 768,
    vision_prompts: tuple[str, ...] | list[str] = DEFAULT_VISION_PROMPTS,
    chat_template: str | None = None,
    dtype: torch.dtype | str | None = None,
    model_init_kwargs: dict | None = None,
    **config_options,
) -> tuple[FlorenceVLForConditionalGeneration, FlorenceVLProcessor]:
    """Florence-VL from a native Florence-2 checkpoint and a causal LM (local folders or Hub ids).

    Keeps DaViT, the Florence-2 image projection and the BART encoder with its shared embeddings; drops the
    BART decoder and LM head. The LLM weights are copied unchanged; the DBFusion projector is initialised fresh.
    `<image>` is added to the LLM tokenizer (embeddings grown if it is new). `chat_template` is a family of
    `CHAT_TEMPLATES` (default: from the LLM's model_type) or a Jinja template; `config_options` go to
    `FlorenceVLConfig` (e.g. `fusion_mode`, `vision_feature_sources`, `vision_prompt_names`); `model_init_kwargs`
    go to every `from_pretrained` of the parts (e.g. `revision`, `trust_remote_code`, `attn_implementation`, which
    the built model keeps).

    ```python
    >>> model, processor = from_pretrained_parts("florence-community/Florence-2-large",
    ...                                          "microsoft/Phi-3.5-mini-instruct", dtype="bfloat16")
    ```"""
    report = ConversionReport()
    load_kwargs = dict(model_init_kwargs or {})
    hub_kwargs = {key: load_kwargs[key] for key in ("revision", "trust_remote_code") if key in load_kwargs}
    template = resolve_chat_template(chat_template, PreTrainedConfig.get_config_dict(llm, **hub_kwargs)[0].get(
        "model_type"))
    florence_config = Florence2Config.get_config_dict(florence2, **hub_kwargs)[0]
    if florence_config.get("model_type") != "florence2" or "dim_embed" in florence_config.get("vision_config", {}):
        raise ValueError(f"{florence2!r} is not a native-format Florence-2 checkpoint (transformers' "
                         "Florence2ForConditionalGeneration, e.g. florence-community/Florence-2-large).")
    florence_model = _load_complete(Florence2ForConditionalGeneration, florence2, dtype, **load_kwargs)
    vision_weights = rename_state_dict(florence_model.state_dict(), FLORENCE2_NATIVE_RULES, report)
    rows = prompt_ids(AutoTokenizer.from_pretrained(florence2, **hub_kwargs), vision_prompts)

    causal_lm = _load_complete(AutoModelForCausalLM, llm, dtype, **load_kwargs)
    text_weights = _llm_weights(causal_lm)
    tokenizer = AutoTokenizer.from_pretrained(llm, **hub_kwargs)
    image_token_id = add_image_token(tokenizer, report)

    config = FlorenceVLConfig(vision_config=florence_model.config, text_config=causal_lm.config,
                              image_token_id=image_token_id, image_size=image_size,
                              vision_prompts=tuple(vision_prompts), vision_prompt_ids=rows, **config_options)
    state_dict = {**vision_weights, **text_weights}
    check_complete(config, state_dict, f"{florence2!r} + {llm!r}", may_miss="model.multi_modal_projector.")
    report.loaded = len(state_dict)
    model = load_from_state_dict(config, state_dict, causal_lm.dtype)
    if "attn_implementation" in load_kwargs:
        model.set_attn_implementation(load_kwargs["attn_implementation"])
    fit_vocabulary(model, len(tokenizer), report)
    set_generation_defaults(model, tokenizer, copy.deepcopy(causal_lm.generation_config))
    processor = build_processor(tokenizer, config, template)
    logger.info("from_pretrained_parts: %s", report.summary())
    model.conversion_report = report
    return model, processor


def _load_complete(model_class, name: str, dtype, **kwargs):
    """`model_class.from_pretrained(name)`, refusing a checkpoint that leaves weights randomly initialised."""
    model, info = model_class.from_pretrained(name, dtype=dtype, output_loading_info=True, **kwargs)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(f"{name!r} does not fit {model.__class__.__name__}: missing {sorted(info['missing_keys'])}, "
                         f"mismatched {sorted(info['mismatched_keys'])}.")
    return model


def _llm_weights(causal_lm) -> dict[str, torch.Tensor]:
    """A causal LM's weights under our names: its base model -> `model.language_model.*`, its head -> `lm_head`."""
    base = getattr(causal_lm, causal_lm.base_model_prefix)
    weights = {f"model.language_model.{key}": value for key, value in base.state_dict().items()}
    head = causal_lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(causal_lm).__name__} has an LM head with a bias; Florence-VL's lm_head has none.")
    weights["lm_head.weight"] = head.weight
    return weights


# ----------------------------------------------------------------------------------------------- original checkpoints


def original_weights(src: Path, report: ConversionReport, config: FlorenceVLConfig | None = None
                     ) -> dict[str, torch.Tensor]:
    """SRC's weights under our names; vision weights from SRC itself or from `SRC/vision_tower/`.

    The original saves `vision_tower/pytorch_model.bin` from `named_parameters()`, without the constant
    `pos_idx_to_embed` buffer: with `config`, it is recomputed (a function of the config only)."""
    source = read_weights(src)
    if not source:
        raise ValueError(f"{src} holds no *.safetensors or pytorch_model*.bin weights.")
    vision = {key[len(ORIGINAL_VISION_PREFIX):]: source.pop(key) for key in list(source)
              if key.startswith(ORIGINAL_VISION_PREFIX)}
    label = ORIGINAL_VISION_PREFIX
    if not vision and (src / "vision_tower").is_dir():
        vision, label = read_weights(src / "vision_tower"), "vision_tower/"
    vision_report = ConversionReport()
    renamed = rename_state_dict(vision, FLORENCE2_ORIGINAL_RULES, vision_report, ORIGINAL_TRANSPOSED)
    report.dropped += [label + key for key in vision_report.dropped]
    report.unrecognised += [label + key for key in vision_report.unrecognised]
    renamed.update(rename_state_dict(source, LLAVA_RULES, report))
    table = DAVIT_PROJECTOR + "visual_temporal_embed.pos_idx_to_embed"
    if config is not None and vision and table not in renamed:
        from transformers.models.florence2.modeling_florence2 import Florence2VisionPositionalEmbeddingCosine1D

        renamed[table] = Florence2VisionPositionalEmbeddingCosine1D(config.vision_config).pos_idx_to_embed
        report.notes.append(f"recomputed {label}visual_temporal_embed.pos_idx_to_embed (a constant of the config)")
    return renamed


def convert_original(
    src: str | Path,
    dst: str | Path,
    *,
    image_size: int | None = None,
    florence2_config: str | None = None,
    image_token_id: int | None = None,
    max_shard_size: str = "5GB",
    base_models: tuple[str, ...] | list[str] = (),
    license: str = "other",
) -> ConversionReport:
    """Convert an original Florence-VL checkpoint folder (LLaVA layout) into this package's format in `dst`.

    SRC as the original training code writes it: config.json (`llava_phi` / `llava_llama`, mm_* fields, legacy
    `rope_scaling`), the weights, the LLM tokenizer files and `vision_tower/{config.json, preprocessor_config.json,
    pytorch_model.bin}`. The Florence-2 config, image size and aspect-ratio handling are read from there
    (`florence2_config` / `image_size` override them). Writes sharded safetensors, config (with the original prompt
    id rows, fed without a mask as the original does), a greedy generation config, the three code files, the
    processor (if SRC has a tokenizer; `<image>` is added; the chat template of the LLM family with the original
    system prompt) and README.md (`base_models` go into its metadata; `mm_vision_tower`, a path on the machine
    that trained the model, does not). Without a tokenizer in SRC, give `image_token_id`.
    Raises ValueError naming the file and field at fault.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a checkpoint folder (no config.json); download it first, e.g. "
                         "`hf download jiuhai/florence-vl-8b-sft --local-dir SRC`.")
    llava = _read_json(src / "config.json")
    text_config, family = text_config_from_llava(llava)
    vision_config = florence2_config_from_original(*original_florence2_config(src, llava, florence2_config))
    projection_dim = vision_config.vision_config.projection_dim
    if llava.get("mm_hidden_size", projection_dim) != projection_dim:
        raise ValueError(f"{src / 'config.json'}: mm_hidden_size={llava['mm_hidden_size']} differs from the "
                         f"Florence-2 projection_dim {projection_dim}; pass --florence2-config with the Florence-2 "
                         "config the checkpoint was trained with.")
    report = ConversionReport()
    image_size, aspect_ratio, notes = original_preprocessing(src, llava, image_size)
    report.notes += notes
    tokenizer = None
    if _has_tokenizer(src):
        tokenizer = load_original_tokenizer(src)
        image_token_id = add_image_token(tokenizer, report)
    elif image_token_id is None:
        raise ValueError(f"{src} has no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json): "
                         "pass --image-token-id (image_token_id=), the id of `<image>` in your tokenizer.")
    config = FlorenceVLConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id, image_size=image_size,
        vision_prompts=DEFAULT_VISION_PROMPTS, vision_prompt_ids=DEFAULT_VISION_PROMPT_IDS,
        projector_depth=projector_depth_from_llava(llava), projector_hidden_act="gelu", fusion_mode="channel_concat",
    )
    state_dict = original_weights(src, report, config)
    check_complete(config, state_dict, str(src))
    report.loaded = len(state_dict)
    model = load_from_state_dict(config, state_dict, state_dict["model.language_model.embed_tokens.weight"].dtype)
    if tokenizer is not None:
        fit_vocabulary(model, len(tokenizer), report)
    generation = GenerationConfig.from_pretrained(src) if (src / "generation_config.json").is_file() else None
    if tokenizer is not None:
        set_generation_defaults(model, tokenizer, generation)
    processor = (build_processor(tokenizer, config, CHAT_TEMPLATES[family], aspect_ratio)
                 if tokenizer is not None else None)
    save_for_hub(model, processor, dst, base_models=base_models, license=license, max_shard_size=max_shard_size)
    return report


# ----------------------------------------------------------------------------------------------- publishing


def model_card(config: FlorenceVLConfig, base_models: tuple[str, ...] | list[str] = (), license: str = "other",
               repo_id: str = "REPO_ID") -> str:
    """README.md with Hub metadata and a usage snippet for a Florence-VL checkpoint."""
    data = ModelCardData(library_name="transformers", pipeline_tag="image-text-to-text", license=license,
                         base_model=list(base_models) or None,
                         tags=["florence-vl", "florence-2", "multimodal", "vision-language", "custom_code"])
    text = config.text_config
    body = f"""
# Florence-VL ({text.model_type}, {text.num_hidden_layers} layers, hidden {text.hidden_size})

Florence-VL ([arXiv 2412.04424](https://arxiv.org/abs/2412.04424)): Florence-2's DaViT features ("depth") and
its BART encoder features for {len(config.vision_prompts)} task prompts ("breadth"), fused by
`{config.fusion_mode}` (Depth-Breadth Fusion) and projected into a causal LLM.
{config.num_image_tokens} image tokens per {config.image_size}x{config.image_size} image.

## Usage

```python
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

repo = "{repo_id}"
device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cuda":
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
else:  # bfloat16 only on CPUs that compute in it natively (AVX512-BF16, AMX, Arm BF16): 3-4x faster there
    flags = torch.cpu.get_capabilities()  # torch >= 2.11
    dtype = torch.bfloat16 if any(flags.get(f) for f in ("avx512_bf16", "amx_bf16", "bf16")) else torch.float32
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, dtype=dtype).to(device)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe the image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=Image.open("image.jpg"), return_tensors="pt").to(model.device)
output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Check the licenses of the base models before use.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def save_for_hub(model, processor, folder: str | Path, *, base_models=(), license: str = "other",
                 max_shard_size: str = "5GB", repo_id: str = "REPO_ID") -> list[str]:
    """Save weights, config, code files, processor and README.md: the folder a Hub repo should hold.

    `model.push_to_hub` alone would upload neither `processing_florence_vl.py` (only `processor.save_pretrained`
    writes it, yet `auto_map` names it) nor this README (it writes a generic card). Returns `files_to_upload`.
    """
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if processor is not None:
        processor.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(model.config, base_models, license, repo_id))
    return files_to_upload(folder)


def files_to_upload(folder: str | Path, allow_patterns=None, ignore_patterns=None) -> list[str]:
    """The paths `HfApi.upload_folder(folder_path=folder, ...)` commits (same filtering), without a network."""
    folder = Path(folder)
    files = sorted(path.relative_to(folder).as_posix() for path in folder.glob("**/*") if path.is_file())
    ignore = list(ignore_patterns or []) + list(DEFAULT_IGNORE_PATTERNS)
    return list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore))


def push_folder_to_hub(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                       commit_message: str = "Upload Florence-VL") -> str:
    """Create `repo_id` if needed and upload `folder` (as written by `save_for_hub`) in one commit."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    return commit.commit_url


# ----------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m florence_vl.convert", description=convert_original.__doc__)
    parser.add_argument("src", help="original Florence-VL checkpoint folder (LLaVA layout)")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--image-size", type=int, help="default: from SRC/vision_tower/preprocessor_config.json")
    parser.add_argument("--florence2-config", help="original Florence-2 config.json (or its folder)")
    parser.add_argument("--image-token-id", type=int, help="id of <image> when SRC has no tokenizer")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--license", default="other")
    parser.add_argument("--base-model", action="append", default=[], help="Hub id for the card's base_model "
                        "metadata (repeatable); the checkpoint's machine-local mm_vision_tower is never used")
    args = parser.parse_args(argv)
    try:
        report = convert_original(args.src, args.dst, image_size=args.image_size,
                                  florence2_config=args.florence2_config, image_token_id=args.image_token_id,
                                  max_shard_size=args.max_shard_size, license=args.license,
                                  base_models=args.base_model)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.src} -> {args.dst}: {report.summary()}")
    return 0


__all__ = ["ConversionReport", "convert_original", "files_to_upload", "from_pretrained_parts", "model_card",
           "push_folder_to_hub", "save_for_hub"]

if __name__ == "__main__":
    raise SystemExit(main())
