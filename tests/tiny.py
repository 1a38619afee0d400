"""Tiny random configs, tokenizer and processor shared by the tests (hidden 32, 2 layers, 64-px images)."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Florence2Config, PreTrainedTokenizerFast

from florence_vl import FlorenceVLConfig
from florence_vl.processing_florence_vl import CHAT_TEMPLATES, FlorenceVLProcessor, florence2_image_processor

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<image>"]
IMAGE_TOKEN_ID = 8
VOCAB_SIZE = 272  # 9 special tokens + 256 byte symbols, rounded up
TEXT_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=7),
    "phi3": dict(model_type="phi3", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                 pad_token_id=0, bos_token_id=1, eos_token_id=7),
}


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


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer without merges: every byte is a token, so any text round-trips."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


def tiny_processor(config: FlorenceVLConfig | None = None, family: str = "phi3") -> FlorenceVLProcessor:
    config = config or tiny_config()
    return FlorenceVLProcessor(
        image_processor=florence2_image_processor(config.image_size), tokenizer=tiny_tokenizer(),
        chat_template=CHAT_TEMPLATES[family], num_image_tokens=config.num_image_tokens,
    )
