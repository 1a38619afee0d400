"""Tiny random configs shared by the tests (hidden 32, 2 layers, 64-px images)."""

from transformers import Florence2Config

from florence_vl import FlorenceVLConfig

TEXT_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "phi3": dict(model_type="phi3", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
IMAGE_TOKEN_ID = 127


def tiny_florence2_config() -> Florence2Config:
    vision = dict(depths=(1, 1, 1, 1), embed_dim=(8, 16, 16, 32), num_heads=(1, 2, 2, 4), num_groups=(1, 2, 2, 4),
                  window_size=2, drop_path_rate=0.0, projection_dim=24, max_position_embeddings=16)
    text = dict(vocab_size=64, d_model=24, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=128,
                dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return Florence2Config(vision_config=vision, text_config=text)


def tiny_config(llm: str = "llama", **overrides) -> FlorenceVLConfig:
    """FlorenceVL with tiny DaViT + BART encoder + LLM; 64-px images give 2x2 + 1 = 5 image tokens."""
    options = dict(
        vision_config=tiny_florence2_config(), text_config=dict(TEXT_CONFIGS[llm]), image_token_id=IMAGE_TOKEN_ID,
        image_size=64, vision_prompt_ids=((0, 5, 6, 7, 2), (0, 8, 9, 2, 1), (0, 10, 11, 12, 2)),
    )
    options.update(overrides)
    return FlorenceVLConfig(**options)
