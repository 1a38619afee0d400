"""A small byte-level BPE tokenizer trained locally on the shapes-and-words texts (every task word is one token)."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def task_texts() -> list[str]:
    from .shapes import COLORS, SHAPES, WORDS

    texts = ["Describe the image.", "What shape is on the left?", "What shape is on the right?",
             "What word is written in the image?"]
    texts += [f"What color is the {shape}?" for shape in SHAPES]
    texts += [f"A {c1} {s1} on the left, a {c2} {s2} on the right, and the word {w}."
              for c1 in COLORS for s1 in SHAPES for c2 in COLORS for s2 in SHAPES for w in WORDS]
    texts += list(COLORS) + list(SHAPES) + list(WORDS)
    return texts


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts or task_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
