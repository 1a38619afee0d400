"""Model sizes the benchmarks build with random weights: Florence-2, the LLaVA-1.5 vision tower and reduced LLMs.

Florence-2 "base" and "large" follow the released checkpoints (DaViT depths (1, 1, 9, 1), window 12; BART
base / large); "small" is a scaled-down one for CPU training runs; "toy" is for the smoke suite.
The BART vocabulary is Florence-2's 51,289 tokens plus the `<image>` placeholder stock Florence-2 needs.
"""

from transformers import CLIPVisionConfig, Florence2Config, LlamaConfig, LlavaConfig

from florence_vl import FlorenceVLConfig

FLORENCE2_IMAGE_TOKEN_ID = 51289
FLORENCE2_VISION = {
    "base": dict(embed_dim=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), num_groups=(4, 8, 16, 32),
                 depths=(1, 1, 9, 1), window_size=12, projection_dim=768),
    "large": dict(embed_dim=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64), num_groups=(8, 16, 32, 64),
                  depths=(1, 1, 9, 1), window_size=12, projection_dim=1024),
    "small": dict(embed_dim=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), num_groups=(1, 2, 4, 8),
                  depths=(1, 1, 3, 1), window_size=12, projection_dim=256),
    "toy": dict(embed_dim=(8, 16, 16, 32), num_heads=(1, 2, 2, 4), num_groups=(1, 2, 2, 4), depths=(1, 1, 1, 1),
                window_size=2, projection_dim=24),
}
BART = {
    "base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, vocab_size=51290),
    "large": dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=51290),
    "small": dict(d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, vocab_size=51290),
    "toy": dict(d_model=24, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=64),
}
# LLMs: "cpu" is the reduced LLM of the CPU suite; "phi3.5-mini" has Phi-3.5-mini's shapes in a Llama layout
# (Phi-3 fuses qkv and gate/up, the same FLOPs and bytes); "toy" is for the smoke suite.
LLM = {
    "toy": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=272),
    "cpu": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=32064),
    "phi3.5-mini": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32064),
    # Phi-3.5-mini widths at 2 layers: CPU runs at real width (bench_cpu.py, the compile check in bf16)
    "phi3.5-mini-2l": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064),
}
CLIP_VISION = {  # CLIP ViT-L/14-336, LLaVA-1.5's tower: 24x24 = 576 patch tokens
    "vit-l-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, projection_dim=768),
    "toy": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                patch_size=14, projection_dim=32),
}


def florence2_config(size: str) -> Florence2Config:
    """A stock Florence-2 config; `projection_dim` equals the BART `d_model`, as in the released models."""
    if size not in FLORENCE2_VISION:
        raise ValueError(f"Florence-2 size {size!r} is unknown; use one of {tuple(FLORENCE2_VISION)}.")
    text = dict(BART[size], dropout=0.0, attention_dropout=0.0, max_position_embeddings=1024)
    vision = dict(FLORENCE2_VISION[size], drop_path_rate=0.0)
    return Florence2Config(vision_config=vision, text_config=text, image_token_id=FLORENCE2_IMAGE_TOKEN_ID
                           if size != "toy" else 63)


def llm_config(size: str) -> LlamaConfig:
    if size not in LLM:
        raise ValueError(f"LLM size {size!r} is unknown; use one of {tuple(LLM)}.")
    return LlamaConfig(**LLM[size], max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def image_token_id(llm: str) -> int:
    """The `<image>` id used for both models: the last id of the LLM vocabulary."""
    return LLM[llm]["vocab_size"] - 1


def florence_vl_config(florence2: str, llm: str, image_size: int, **overrides) -> FlorenceVLConfig:
    options = dict(vision_config=florence2_config(florence2), text_config=llm_config(llm).to_dict(),
                   image_token_id=image_token_id(llm), image_size=image_size)
    if florence2 == "toy":
        options["vision_prompt_ids"] = ((0, 5, 6, 7, 2), (0, 8, 9, 2, 1), (0, 10, 11, 12, 2))
    options.update(overrides)
    return FlorenceVLConfig(**options)


def llava_config(clip: str, llm: str) -> LlavaConfig:
    """LLaVA-1.5 layout: CLIP tower, penultimate layer, patch tokens only, 2-layer GELU projector."""
    return LlavaConfig(vision_config=CLIPVisionConfig(**CLIP_VISION[clip]), text_config=llm_config(llm).to_dict(),
                       image_token_id=image_token_id(llm), vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def llava_num_image_tokens(clip: str) -> int:
    return (CLIP_VISION[clip]["image_size"] // CLIP_VISION[clip]["patch_size"]) ** 2
