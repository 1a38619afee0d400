"""The shapes-and-words generator follows DESIGN §6 and is deterministic; the task tokenizer covers it."""

import random

import numpy as np
import pytest

from florence_vl.train import shapes
from florence_vl.train.tiny_tokenizer import build_tokenizer


def test_same_seed_same_examples_different_seed_different():
    a, b, c = (shapes.make_examples(20, seed, "finetune") for seed in (3, 3, 4))
    assert [x["messages"] for x in a] == [x["messages"] for x in b]
    assert all(x["images"][0].tobytes() == y["images"][0].tobytes() for x, y in zip(a, b))
    assert [x["messages"] for x in a] != [x["messages"] for x in c]


@pytest.mark.parametrize("seed", range(30))
def test_rendered_pixels_match_the_scene(seed):
    scene = shapes.sample_scene(random.Random(seed))
    pixels = np.asarray(shapes.render(scene)).astype(int)
    assert pixels.shape == (128, 128, 3)
    assert (scene.left.color, scene.left.shape) != (scene.right.color, scene.right.shape)
    for item in (scene.left, scene.right):
        assert 24 <= item.size <= 36 and abs(item.cy - 64) <= 8
        assert tuple(pixels[item.cy + 4, item.cx]) == shapes.COLORS[item.color]  # inside every shape kind
    for corner in ((0, 0), (0, 127), (127, 0), (127, 127)):
        assert tuple(pixels[corner]) == shapes.BACKGROUND
    word_band = pixels[100:121, 30:98]
    assert (word_band.sum(-1) < 100).sum() > 20, "the word is drawn in black around (64, 110)"


def test_square_and_circle_differ_at_the_box_corner():
    scene = shapes.Scene(shapes.Shape("red", "square", 32, 64, 30), shapes.Shape("blue", "circle", 96, 64, 30), "cat")
    pixels = np.asarray(shapes.render(scene))
    assert tuple(pixels[64 - 14, 32 - 14]) == shapes.COLORS["red"]
    assert tuple(pixels[64 - 14, 96 - 14]) == shapes.BACKGROUND


def test_color_question_only_about_a_unique_shape():
    for example in shapes.make_examples(300, 0, "finetune", question_mix=1.0):
        question = example["messages"][0]["content"][1]["text"]
        if example["question_type"] == "color":
            assert question.startswith("What color is the ")
    same = shapes.Scene(shapes.Shape("red", "circle", 32, 64, 30), shapes.Shape("blue", "circle", 96, 64, 30), "cat")
    with pytest.raises(ValueError, match="same"):
        shapes.ask(same, "color", random.Random(0))
    mixed = shapes.Scene(shapes.Shape("red", "circle", 32, 64, 30), shapes.Shape("blue", "square", 96, 64, 30), "cat")
    assert {shapes.ask(mixed, "color", random.Random(i)) for i in range(20)} == {
        ("What color is the circle?", "red"), ("What color is the square?", "blue")}


def test_heldout_cycles_question_types_and_pretrain_is_captions():
    heldout = shapes.make_examples(25, 9, "heldout")
    assert [x["question_type"] for x in heldout] == list(shapes.QUESTION_TYPES) * 5
    assert all(x["question_type"] == "describe" for x in shapes.make_examples(10, 1, "pretrain"))


def test_scoring():
    assert shapes.is_correct("Red.", "red") and shapes.is_correct(" red. ", "red")
    assert not shapes.is_correct("reds", "red") and not shapes.is_correct("red..", "red")


def test_tokenizer_words_are_single_tokens_and_text_round_trips():
    tokenizer = build_tokenizer()
    for word in [*shapes.COLORS, *shapes.SHAPES, *shapes.WORDS]:
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    text = "Hello wörld 🙂"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()
    assert tokenizer.pad_token_id == 0 and tokenizer.convert_tokens_to_ids("<image>") == 4
