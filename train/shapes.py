"""The synthetic shapes-and-words task (DESIGN §6): 128x128 scenes of two coloured shapes and a word.

Deterministic per seed; examples are in TRL's conversational format (`images` + `messages`).
"""

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "car", "star")
QUESTION_TYPES = ("color", "left_shape", "right_shape", "word", "describe")
DESCRIBE = "Describe the image."
SIZE, BACKGROUND = 128, (255, 255, 255)


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    cx: int
    cy: int
    size: int

    def box(self) -> tuple[float, float, float, float]:
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclass(frozen=True)
class Scene:
    left: Shape
    right: Shape
    word: str


def _shape(rng: random.Random, kind: tuple[str, str], x: int) -> Shape:
    cx, cy = x + rng.randint(-8, 8), 64 + rng.randint(-8, 8)
    return Shape(kind[0], kind[1], cx, cy, rng.randint(24, 36))


def sample_scene(rng: random.Random) -> Scene:
    """Left and right (colour, shape) drawn uniformly and independently, redrawn while equal; word uniform."""
    while True:
        left = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        right = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        if left != right:
            break
    return Scene(_shape(rng, left, 32), _shape(rng, right, 96), rng.choice(WORDS))


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for item in (scene.left, scene.right):
        fill, (x0, y0, x1, y1) = COLORS[item.color], item.box()
        if item.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif item.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(item.cx, y0), (x0, y1), (x1, y1)], fill=fill)
    draw.text((64, 110), scene.word, fill=(0, 0, 0), font=ImageFont.load_default(size=20), anchor="mm")
    return image


def caption(scene: Scene) -> str:
    return (f"A {scene.left.color} {scene.left.shape} on the left, a {scene.right.color} {scene.right.shape} "
            f"on the right, and the word {scene.word}.")


def ask(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of one type; "color" only about a shape that appears exactly once."""
    if qtype == "color":
        unique = [item for item in (scene.left, scene.right)
                  if (scene.left.shape, scene.right.shape).count(item.shape) == 1]
        if not unique:
            raise ValueError("both shapes are the same: the colour question is ambiguous for this scene")
        item = rng.choice(unique)
        return f"What color is the {item.shape}?", item.color
    if qtype == "left_shape":
        return "What shape is on the left?", scene.left.shape
    if qtype == "right_shape":
        return "What shape is on the right?", scene.right.shape
    if qtype == "word":
        return "What word is written in the image?", scene.word
    if qtype == "describe":
        return DESCRIBE, caption(scene)
    raise ValueError(f"unknown question type {qtype!r}; use one of {QUESTION_TYPES}")


def normalize(text: str) -> str:
    text = text.strip().lower()
    return text[:-1].strip() if text.endswith(".") else text


def is_correct(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def _example(scene: Scene, qtype: str, rng: random.Random) -> dict:
    question, answer = ask(scene, qtype, rng)
    return {
        "images": [render(scene)],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "question_type": qtype,
        "answer": answer,
    }


def make_examples(n: int, seed: int, stage: str, question_mix: float | None = None) -> list[dict]:
    """`pretrain`: captions (plus `question_mix` questions); `finetune`: all five types (questions at
    `question_mix`, default 0.8); `heldout`: example i has type i % 5."""
    if stage not in ("pretrain", "finetune", "heldout"):
        raise ValueError(f"stage={stage!r}; use 'pretrain', 'finetune' or 'heldout'")
    rng = random.Random(seed)
    mix = question_mix if question_mix is not None else {"pretrain": 0.0, "finetune": 0.8}.get(stage, 0.0)
    examples = []
    while len(examples) < n:
        scene = sample_scene(rng)
        if stage == "heldout":
            qtype = QUESTION_TYPES[len(examples) % 5]
        else:
            qtype = rng.choice(QUESTION_TYPES[:4]) if rng.random() < mix else "describe"
        if qtype == "color" and scene.left.shape == scene.right.shape:
            if stage == "heldout":
                continue  # redraw the scene, keeping the type cycle
            qtype = rng.choice(QUESTION_TYPES[1:4])
        examples.append(_example(scene, qtype, rng))
    return examples


def make_dataset(n: int, seed: int, stage: str, question_mix: float | None = None):
    from datasets import Dataset

    return Dataset.from_list(make_examples(n, seed, stage, question_mix))


def evaluate(answer_fn, n: int = 500, seed: int = 12345, batch_size: int = 32, progress: bool = True) -> dict:
    """Exact-match accuracy on `n` held-out examples; `answer_fn(images, questions) -> answers`."""
    from tqdm.auto import tqdm

    examples = make_examples(n, seed, "heldout")
    hits: dict[str, list[bool]] = {qtype: [] for qtype in QUESTION_TYPES}
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="eval-shapes", unit="batch"):
        batch = examples[start:start + batch_size]
        questions = [example["messages"][0]["content"][1]["text"] for example in batch]
        answers = answer_fn([example["images"][0] for example in batch], questions)
        for example, prediction in zip(batch, answers):
            hits[example["question_type"]].append(is_correct(prediction, example["answer"]))
    scores = {qtype: sum(values) / len(values) for qtype, values in hits.items() if values}
    scores["overall"] = sum(sum(values) for values in hits.values()) / n
    scores["n"] = n
    return scores


def save_examples(folder, n: int, seed: int) -> list[dict]:
    """PNG files `shapes_{i}.png` plus `examples.json` (image, question, answer) for demos."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, example in enumerate(make_examples(n, seed, "heldout")):
        name = f"shapes_{index}.png"
        example["images"][0].save(folder / name)
        records.append({"image": name, "question": example["messages"][0]["content"][1]["text"],
                        "answer": example["answer"]})
    (folder / "examples.json").write_text(json.dumps(records, indent=1) + "\n")
    return records
