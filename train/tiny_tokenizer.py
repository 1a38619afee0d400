"""A small byte-level BPE tokenizer trained locally on the shapes-and-words texts.

Every word of the task's questions, captions and answers is one token in the form it occurs in (" red" in a
caption, "red" as an answer); being byte-level, any unicode text still encodes and decodes. The special tokens
are those of the Phi-3.5 chat format plus `<image>` (eos is `<|end|>`, the end of a turn, so generation stops
there); the chat template is set later by the processor.
"""

import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .shapes import COLORS, DESCRIBE, SHAPES, WORDS

# Fixed ids: <pad> 0, <s> 1, </s> 2, <unk> 3, <image> 4, then the chat markers 5-8.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
DEFAULT_VOCAB_SIZE = 400  # an upper bound: the task texts run out of merges at 374 tokens


def task_texts() -> list[str]:
    """Every question and caption the task can produce, and each answer word on its own."""
    texts = [DESCRIBE, "What shape is on the left?", "What shape is on the right?",
             "What word is written in the image?"]
    texts += [f"What color is the {shape}?" for shape in SHAPES]
    texts += [f"A {c1} {s1} on the left, a {c2} {s2} on the right, and the word {w}."
              for c1 in COLORS for s1 in SHAPES for c2 in COLORS for s2 in SHAPES for w in WORDS]
    texts += list(COLORS) + list(SHAPES) + list(WORDS)
    return texts


def task_words() -> list[str]:
    """Every word of the task texts in the form it occurs there: " red" inside a caption, "red" as an answer."""
    return sorted({word for text in task_texts() for word in re.findall(r" ?[A-Za-z]+", text)})


def split_words(tokenizer: PreTrainedTokenizerFast, words: list[str]) -> dict[str, list[str]]:
    """The words that `tokenizer` splits into several tokens, with their pieces."""
    return {word: tokens for word in words if len(tokens := tokenizer.tokenize(word)) != 1}


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (default: `task_texts()`), deterministically.

    With the default texts it checks that every task word is one token and raises ValueError if `vocab_size`
    is too small for that.
    """
    if texts is not None and not texts:
        raise ValueError("texts is empty: give training texts or None for the shapes task's texts")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(task_texts() if texts is None else texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    if texts is None and (split := split_words(tokenizer, task_words())):
        raise ValueError(f"vocab_size={vocab_size} is too small: these task words split into several tokens: "
                         f"{split}")
    return tokenizer
