"""The shapes-and-words generator follows DESIGN §6 to the pixel and is deterministic; the task tokenizer covers it."""

import json
import random

import numpy as np
import pytest

from florence_vl.train import shapes
from florence_vl.train.tiny_tokenizer import SPECIAL_TOKENS, build_tokenizer, task_words


def scene(left: tuple[str, str], right: tuple[str, str], word: str = "cat", size: int = 30) -> shapes.Scene:
    return shapes.Scene(shapes.Shape(*left, 32, 64, size), shapes.Shape(*right, 96, 64, size), word)


def texts(examples: list[dict]) -> list:
    return [(x["messages"], x["question_type"], x["answer"]) for x in examples]


def question(example: dict) -> str:
    return example["messages"][0]["content"][1]["text"]


@pytest.mark.parametrize("stage", shapes.STAGES)
def test_same_seed_same_examples_different_seed_different(stage):
    a, b, c = (shapes.make_examples(10, seed, stage) for seed in (3, 3, 4))
    assert texts(a) == texts(b)
    assert [x["images"][0].tobytes() for x in a] == [x["images"][0].tobytes() for x in b]
    assert texts(a) != texts(c)
    assert all(x["images"][0].tobytes() != y["images"][0].tobytes() for x, y in zip(a, c))


def test_the_global_rng_is_neither_used_nor_disturbed():
    random.seed(0)
    expected = random.random()
    random.seed(0)
    first = texts(shapes.make_examples(5, 1, "finetune"))
    assert random.random() == expected
    random.seed(99)
    assert texts(shapes.make_examples(5, 1, "finetune")) == first


@pytest.mark.parametrize("seed", range(30))
def test_rendered_pixels_match_the_scene(seed):
    drawn = shapes.sample_scene(random.Random(seed))
    image = shapes.render(drawn)
    assert image.mode == "RGB" and image.size == (128, 128)
    pixels = np.asarray(image).astype(int)
    assert (drawn.left.color, drawn.left.shape) != (drawn.right.color, drawn.right.shape)
    for item, x in ((drawn.left, 32), (drawn.right, 96)):
        assert 24 <= item.size <= 36 and abs(item.cx - x) <= 8 and abs(item.cy - 64) <= 8
        assert tuple(pixels[item.cy + 4, item.cx]) == shapes.COLORS[item.color]  # inside every shape kind
    for corner in ((0, 0), (0, 127), (127, 0), (127, 127)):
        assert tuple(pixels[corner]) == (255, 255, 255)
    word_band = pixels[100:121, 30:98]
    assert (word_band.sum(-1) == 0).sum() > 20, "the word is drawn in black around (64, 110)"
    assert (pixels[:90].sum(-1) == 0).sum() == 0, "nothing black above the word"


def test_jitter_size_and_scene_draws_cover_the_spec_ranges():
    rng = random.Random(0)
    scenes = [shapes.sample_scene(rng) for _ in range(2000)]
    lefts, rights = [s.left for s in scenes], [s.right for s in scenes]
    assert {s.cx for s in lefts} == set(range(24, 41)) and {s.cx for s in rights} == set(range(88, 105))
    assert {s.cy for s in lefts + rights} == set(range(56, 73))
    assert {s.size for s in lefts + rights} == set(range(24, 37))
    assert {s.word for s in scenes} == set(shapes.WORDS)
    assert {(s.color, s.shape) for s in lefts} == {(c, k) for c in shapes.COLORS for k in shapes.SHAPES}
    same_kind = sum(s.left.shape == s.right.shape for s in scenes) / len(scenes)
    assert 0.25 < same_kind < 0.36  # (4 - 1) / (12 - 1) ≈ 0.27 of scenes share the shape kind (colours differ)


def test_shape_kinds_fill_their_bounding_box_as_specified():
    pixels = np.asarray(shapes.render(scene(("red", "square"), ("blue", "circle"), size=30)))
    assert tuple(pixels[64 - 14, 32 - 14]) == shapes.COLORS["red"]  # a square fills its box corner
    assert tuple(pixels[64 - 14, 96 - 14]) == (255, 255, 255)  # a circle does not
    assert tuple(pixels[64, 96 - 14]) == shapes.COLORS["blue"]
    pixels = np.asarray(shapes.render(scene(("green", "triangle"), ("yellow", "square"), size=30)))
    assert tuple(pixels[64 - 13, 32]) == shapes.COLORS["green"]  # upward apex at (cx, cy - s/2)
    assert tuple(pixels[64 - 13, 32 - 10]) == (255, 255, 255)
    assert tuple(pixels[64 + 14, 32 - 14]) == shapes.COLORS["green"]  # base corners (cx ± s/2, cy + s/2)
    colours = {tuple(p) for p in pixels[30:100].reshape(-1, 3)}
    assert colours <= {(255, 255, 255), shapes.COLORS["green"], shapes.COLORS["yellow"]}  # no outline, no blending


def test_caption_and_questions():
    drawn = scene(("red", "circle"), ("blue", "square"), "tree")
    assert shapes.caption(drawn) == "A red circle on the left, a blue square on the right, and the word tree."
    rng = random.Random(0)
    assert shapes.ask(drawn, "left_shape", rng) == ("What shape is on the left?", "circle")
    assert shapes.ask(drawn, "right_shape", rng) == ("What shape is on the right?", "square")
    assert shapes.ask(drawn, "word", rng) == ("What word is written in the image?", "tree")
    assert shapes.ask(drawn, "describe", rng) == ("Describe the image.", shapes.caption(drawn))
    with pytest.raises(ValueError, match="'size'"):
        shapes.ask(drawn, "size", rng)


def test_color_question_is_about_a_shape_that_appears_once_chosen_uniformly():
    same = scene(("red", "circle"), ("blue", "circle"))
    with pytest.raises(ValueError, match="same"):
        shapes.ask(same, "color", random.Random(0))
    mixed = scene(("red", "circle"), ("blue", "square"))
    asked = [shapes.ask(mixed, "color", random.Random(i)) for i in range(400)]
    assert set(asked) == {("What color is the circle?", "red"), ("What color is the square?", "blue")}
    assert 150 < asked.count(("What color is the circle?", "red")) < 250


@pytest.mark.parametrize("stage", ["finetune", "heldout"])
def test_datasets_never_ask_the_colour_of_a_shape_that_appears_twice(stage, monkeypatch):
    asked, original_ask = [], shapes.ask

    def recording_ask(drawn, qtype, rng):
        asked.append((drawn, qtype, original_ask(drawn, qtype, rng)))
        return asked[-1][2]

    monkeypatch.setattr(shapes, "ask", recording_ask)
    examples = shapes.make_examples(300, 5, stage, question_mix=1.0 if stage == "finetune" else None)
    assert [qtype for _, qtype, _ in asked] == [x["question_type"] for x in examples]
    colour_questions = [(drawn, result) for drawn, qtype, result in asked if qtype == "color"]
    assert len(colour_questions) >= 40
    for drawn, (text, answer) in colour_questions:
        named = text.removeprefix("What color is the ").removesuffix("?")
        assert [drawn.left.shape, drawn.right.shape].count(named) == 1
        assert answer == (drawn.left if drawn.left.shape == named else drawn.right).color
    if stage == "finetune":
        assert any(d.left.shape == d.right.shape for d, _, _ in asked), "same-shape scenes get another question type"


def test_heldout_cycles_question_types_and_pretrain_is_captions():
    heldout = shapes.make_examples(25, 9, "heldout")
    assert [x["question_type"] for x in heldout] == list(shapes.QUESTION_TYPES) * 5
    for example in shapes.make_examples(10, 1, "pretrain"):
        assert example["question_type"] == "describe" and question(example) == "Describe the image."
        assert example["messages"][1]["content"][0]["text"] == example["answer"]
        assert example["answer"].startswith("A ") and " on the left, a " in example["answer"]
        assert example["messages"][0]["content"][0] == {"type": "image"} and len(example["images"]) == 1


def test_question_mix_sets_the_fraction_of_questions():
    pretrain = shapes.make_examples(400, 2, "pretrain", question_mix=0.3)
    assert 0.24 < sum(x["question_type"] != "describe" for x in pretrain) / 400 < 0.36
    finetune = [x["question_type"] for x in shapes.make_examples(400, 2, "finetune")]
    assert set(finetune) == set(shapes.QUESTION_TYPES) and 0.14 < finetune.count("describe") / 400 < 0.26


@pytest.mark.parametrize("n, stage, mix, match", [
    (3, "train", None, "stage='train'"), (3, "pretrain", 1.5, "question_mix=1.5"),
    (3, "heldout", 0.5, "heldout"), (-1, "pretrain", None, "n=-1"),
])
def test_bad_arguments_are_refused(n, stage, mix, match):
    with pytest.raises(ValueError, match=match):
        shapes.make_examples(n, 0, stage, question_mix=mix)


def test_scoring():
    assert shapes.is_correct("Red.", "red") and shapes.is_correct("red.", "red") and shapes.is_correct(" red. ", "red")
    assert shapes.is_correct("A red circle.", "a red circle")
    assert not shapes.is_correct("reds", "red") and not shapes.is_correct("red..", "red")
    assert not shapes.is_correct("blue", "red")


def test_dataset_round_trips_images_and_messages():
    examples = shapes.make_examples(6, 0, "finetune")
    dataset = shapes.make_dataset(6, 0, "finetune")
    assert dataset.column_names == ["images", "messages", "question_type", "answer"]
    for row, example in zip(dataset, examples):
        assert [image.tobytes() for image in row["images"]] == [example["images"][0].tobytes()]
        assert row["images"][0].mode == "RGB"
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert [[c.get("text") for c in m["content"]] for m in row["messages"]] == [
            [None, question(example)], [example["answer"]]]
        assert (row["question_type"], row["answer"]) == (example["question_type"], example["answer"])


def test_evaluate_scores_per_question_type_in_batches():
    answers = {x["images"][0].tobytes(): x["answer"] for x in shapes.make_examples(23, 7, "heldout")}
    batches = []

    def oracle(images, questions):
        batches.append(len(images))
        return [answers[image.tobytes()].upper() + " " for image in images]

    scores = shapes.evaluate(oracle, n=23, seed=7, batch_size=10, progress=False)
    assert batches == [10, 10, 3]
    assert scores == {**{qtype: 1.0 for qtype in shapes.QUESTION_TYPES}, "overall": 1.0, "n": 23}
    scores = shapes.evaluate(lambda images, qs: ["circle"] * len(images), n=20, seed=7, progress=False)
    assert scores["word"] == scores["describe"] == 0.0
    assert scores["overall"] == pytest.approx(sum(scores[q] for q in shapes.QUESTION_TYPES) / 5)
    with pytest.raises(ValueError, match="1 answers for 16 questions"):
        shapes.evaluate(lambda images, qs: ["red"], n=20, seed=7, progress=False)


def test_save_examples_writes_images_and_questions(tmp_path):
    records = shapes.save_examples(tmp_path, 5, 3)
    written = json.loads((tmp_path / "examples.json").read_text())
    assert written == records and [r["image"] for r in records] == [f"shapes_{i}.png" for i in range(5)]
    for record, example in zip(records, shapes.make_examples(5, 3, "heldout")):
        from PIL import Image

        assert Image.open(tmp_path / record["image"]).tobytes() == example["images"][0].tobytes()
        assert (record["question"], record["answer"]) == (question(example), example["answer"])


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_task_words_are_single_tokens(tokenizer):
    for word in [*shapes.COLORS, *shapes.SHAPES, *shapes.WORDS]:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    for word in task_words():
        assert len(tokenizer.tokenize(word)) == 1, word
    assert 300 < len(tokenizer) <= 600
    with pytest.raises(ValueError, match="vocab_size=300 is too small"):
        build_tokenizer(vocab_size=300)


def test_tokenizer_round_trips_any_text_and_is_deterministic(tokenizer):
    for text in ["Hello wörld 🙂", "What color is the circle?", "  tabs\tand\nnewlines  ", "日本語"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.unk_token_id not in tokenizer("Hello wörld 🙂")["input_ids"]
    assert build_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_special_tokens(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS] == list(range(9))
    assert SPECIAL_TOKENS[:5] == ("<pad>", "<s>", "</s>", "<unk>", "<image>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (0, 1, 3)
    assert tokenizer.eos_token == "<|end|>" and tokenizer.image_token == "<image>"
    assert tokenizer.padding_side == "left" and tokenizer.chat_template is None
    ids = tokenizer("<|user|>\n<image>What color is the circle?<|end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 6 and ids[2] == 4 and ids[-1] == 8
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\nWhat color is the circle?"
