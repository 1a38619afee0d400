"""The synthetic shapes-and-words task (DESIGN §6): 128x128 scenes of two coloured shapes and a word.

Held-out sets are built elsewhere from the same spec, so the drawing follows it to the pixel. Everything is
deterministic per seed (a private `random.Random(seed)`, never the global RNG); examples are in TRL's
conversational format (`images` + `messages`), ready for `SFTTrainer`.

>>> examples = make_examples(4, seed=0, stage="finetune")
>>> examples[0]["messages"][1]["content"][0]["text"] == examples[0]["answer"]
True
"""

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "car", "star")
QUESTION_TYPES = ("color", "left_shape", "right_shape", "word", "describe")
# Question types added for the Florence-VL study (docs/study.md): each needs what one Florence-2 prompt carries.
# Text reading (OCR): the word's first letter; positions/counts (grounding): which shape is higher / bigger, how many
# of a kind. Not in QUESTION_TYPES, so the default held-out set and the shipped checkpoint's score are unchanged.
STUDY_QUESTION_TYPES = ("first_letter", "higher", "bigger", "count")
ALL_QUESTION_TYPES = QUESTION_TYPES + STUDY_QUESTION_TYPES
COUNT_WORDS = ("zero", "one", "two")
MIN_GAP = 4  # "higher" / "bigger" are asked only when the two shapes differ by >= 4 px (no near-ties)
STAGES = ("pretrain", "finetune", "heldout")
DESCRIBE = "Describe the image."
SIZE, BACKGROUND, INK = 128, (255, 255, 255), (0, 0, 0)
LEFT_X, RIGHT_X, CENTER_Y, JITTER = 32, 96, 64, 8
MIN_SIZE, MAX_SIZE = 24, 36
WORD_XY, FONT_SIZE = (64, 110), 20
DEFAULT_QUESTION_MIX = {"pretrain": 0.0, "finetune": 0.8}  # finetune: the 4 question types and captions, 20 % each


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its colour and kind, centre (cx, cy) and bounding-box side `size` in pixels."""

    color: str
    shape: str
    cx: int
    cy: int
    size: int

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) = (cx - s/2, cy - s/2, cx + s/2, cy + s/2)."""
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclass(frozen=True)
class Scene:
    left: Shape
    right: Shape
    word: str


def _place(rng: random.Random, color: str, shape: str, x: int) -> Shape:
    cx, cy = x + rng.randint(-JITTER, JITTER), CENTER_Y + rng.randint(-JITTER, JITTER)
    return Shape(color, shape, cx, cy, rng.randint(MIN_SIZE, MAX_SIZE))


def sample_scene(rng: random.Random) -> Scene:
    """Left and right (colour, shape) uniform and independent, both redrawn while equal; then geometry; word uniform."""
    while True:
        left = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        right = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        if left != right:
            break
    return Scene(_place(rng, *left, LEFT_X), _place(rng, *right, RIGHT_X), rng.choice(WORDS))


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=FONT_SIZE)
    if not isinstance(font, ImageFont.FreeTypeFont):  # the bitmap fallback ignores `size`: other pixels
        raise RuntimeError("The shapes task draws its word with Pillow's FreeType default font; install a Pillow "
                           f">= 10.1 built with FreeType (got {type(font).__name__}).")
    return font


def render(scene: Scene) -> Image.Image:
    """The 128x128 RGB image of `scene`: filled shapes without outline, the word in black centred at (64, 110)."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for item in (scene.left, scene.right):
        fill, (x0, y0, x1, y1) = COLORS[item.color], item.box()
        if item.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif item.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif item.shape == "triangle":
            draw.polygon([(item.cx, y0), (x0, y1), (x1, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {item.shape!r}; use one of {SHAPES}")
    draw.text(WORD_XY, scene.word, fill=INK, font=_font(), anchor="mm")
    return image


def caption(scene: Scene) -> str:
    return (f"A {scene.left.color} {scene.left.shape} on the left, a {scene.right.color} {scene.right.shape} "
            f"on the right, and the word {scene.word}.")


def ask(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of type `qtype`. "color" asks about a shape that appears exactly once (uniformly chosen
    among those) and raises ValueError when both shapes are the same kind."""
    if qtype == "color":
        kinds = (scene.left.shape, scene.right.shape)
        unique = [item for item in (scene.left, scene.right) if kinds.count(item.shape) == 1]
        if not unique:
            raise ValueError(f"both shapes are the same ({scene.left.shape}): the colour question is ambiguous "
                             "for this scene; ask another type")
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
    if qtype == "first_letter":
        return "What is the first letter of the word?", scene.word[0]
    if qtype == "higher":
        if abs(scene.left.cy - scene.right.cy) < MIN_GAP:
            raise ValueError("the shapes are at about the same height: 'higher' is ambiguous; ask another type")
        return "Which shape is higher, left or right?", "left" if scene.left.cy < scene.right.cy else "right"
    if qtype == "bigger":
        if abs(scene.left.size - scene.right.size) < MIN_GAP:
            raise ValueError("the shapes are about the same size: 'bigger' is ambiguous; ask another type")
        return "Which shape is bigger, left or right?", "left" if scene.left.size > scene.right.size else "right"
    if qtype == "count":
        kind = rng.choice(SHAPES)
        return f"How many {kind}s are there?", COUNT_WORDS[(scene.left.shape, scene.right.shape).count(kind)]
    raise ValueError(f"unknown question type {qtype!r}; use one of {ALL_QUESTION_TYPES}")


def can_ask(scene: Scene, qtype: str) -> bool:
    """Whether `ask(scene, qtype)` has one unambiguous answer."""
    if qtype == "color":
        return scene.left.shape != scene.right.shape
    if qtype == "higher":
        return abs(scene.left.cy - scene.right.cy) >= MIN_GAP
    if qtype == "bigger":
        return abs(scene.left.size - scene.right.size) >= MIN_GAP
    return True


def normalize(text: str) -> str:
    """Lowercase, strip whitespace and one trailing period: the form answers are compared in."""
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


def _check_arguments(n: int, stage: str, question_mix: float | None) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n={n!r}: the number of examples must be an int >= 0")
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; use one of {STAGES}")
    if question_mix is None:
        return
    if stage == "heldout":
        raise ValueError("question_mix does not apply to stage='heldout' (it cycles the five question types); "
                         "leave it None")
    if not 0.0 <= question_mix <= 1.0:
        raise ValueError(f"question_mix={question_mix!r} must be a fraction in [0, 1]")


def _training_type(scene: Scene, mix: float, rng: random.Random) -> str:
    """A question (any of the four, uniform) with probability `mix`, else the caption; an impossible colour
    question becomes one of the other three."""
    qtype = rng.choice(QUESTION_TYPES[:4]) if rng.random() < mix else "describe"
    if qtype == "color" and scene.left.shape == scene.right.shape:
        qtype = rng.choice(QUESTION_TYPES[1:4])
    return qtype


def _check_types(question_types) -> tuple[str, ...]:
    types = tuple(question_types)
    unknown = [t for t in types if t not in ALL_QUESTION_TYPES]
    if not types or unknown or len(set(types)) != len(types):
        raise ValueError(f"question_types={list(types)}: give distinct names from {ALL_QUESTION_TYPES}")
    return types


def make_examples(n: int, seed: int, stage: str, question_mix: float | None = None,
                  question_types: tuple[str, ...] | list[str] | None = None) -> list[dict]:
    """`n` examples in TRL's conversational format, deterministic per `seed`.

    - "pretrain": "Describe the image." → caption, plus a `question_mix` fraction of questions (default 0);
    - "finetune": questions at `question_mix` (default 0.8, so each of the five types is 20 %);
    - "heldout": example i has type `QUESTION_TYPES[i % 5]`; a scene that cannot take its type is redrawn.

    `question_types` (default `QUESTION_TYPES`, drawn exactly as before) may name any of `ALL_QUESTION_TYPES`:
    training stages then draw uniformly among its types other than "describe" (a type the scene cannot take is
    redrawn), and "heldout" cycles through it.
    """
    _check_arguments(n, stage, question_mix)
    types = None if question_types is None else _check_types(question_types)
    rng = random.Random(seed)
    mix = question_mix if question_mix is not None else DEFAULT_QUESTION_MIX.get(stage)
    examples = []
    while len(examples) < n:
        scene = sample_scene(rng)
        if stage == "heldout":
            qtype = (types or QUESTION_TYPES)[len(examples) % len(types or QUESTION_TYPES)]
            if not can_ask(scene, qtype):
                continue  # draw a new scene, keeping the type cycle
        elif types is None:
            qtype = _training_type(scene, mix, rng)
        else:
            questions = [t for t in types if t != "describe" and can_ask(scene, t)]
            wants_question = rng.random() < mix or "describe" not in types
            if wants_question and not questions:
                continue
            qtype = rng.choice(questions) if wants_question else "describe"
        examples.append(_example(scene, qtype, rng))
    return examples


def make_dataset(n: int, seed: int, stage: str, question_mix: float | None = None,
                 question_types: tuple[str, ...] | list[str] | None = None):
    """`make_examples` as a `datasets.Dataset` (`images`: a list of PIL images, `messages`, `question_type`,
    `answer`), the layout TRL's `SFTTrainer` takes for vision-language models."""
    from datasets import Dataset

    return Dataset.from_list(make_examples(n, seed, stage, question_mix, question_types))


AnswerFn = Callable[[list[Image.Image], list[str]], list[str]]


def evaluate(answer_fn: AnswerFn, n: int = 500, seed: int = 12345, batch_size: int = 16,
             progress: bool = True, question_types: tuple[str, ...] | list[str] | None = None,
             details: list | None = None) -> dict:
    """Exact-match accuracy on `n` held-out examples: {"overall": …, one entry per question type, "n": n}.

    `answer_fn(images, questions)` gets up to `batch_size` PIL images and questions and returns one answer each.
    `question_types` as in `make_examples` (default: the five); `details`, a list, receives one bool per example
    (paired tests compare two models example by example).
    """
    from tqdm.auto import tqdm

    if n < 1 or batch_size < 1:
        raise ValueError(f"n={n!r} and batch_size={batch_size!r} must both be >= 1")
    examples = make_examples(n, seed, "heldout", question_types=question_types)
    hits: dict[str, list[bool]] = {qtype: [] for qtype in (question_types or QUESTION_TYPES)}
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="eval-shapes", unit="batch"):
        batch = examples[start:start + batch_size]
        questions = [example["messages"][0]["content"][1]["text"] for example in batch]
        answers = list(answer_fn([example["images"][0] for example in batch], questions))
        if len(answers) != len(batch):
            raise ValueError(f"answer_fn returned {len(answers)} answers for {len(batch)} questions")
        for example, prediction in zip(batch, answers):
            hits[example["question_type"]].append(is_correct(prediction, example["answer"]))
            if details is not None:
                details.append(is_correct(prediction, example["answer"]))
    scores = {qtype: sum(values) / len(values) for qtype, values in hits.items() if values}
    scores["overall"] = sum(sum(values) for values in hits.values()) / n
    scores["n"] = n
    return scores


def save_examples(folder, n: int, seed: int) -> list[dict]:
    """Write `n` held-out examples as `shapes_{i}.png` plus `examples.json` (image, question, answer) for demos."""
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


RESULTS_FILE = "eval_results.json"
_RESULTS_LINE = "Held-out shapes-and-words exact match"


def record_results(folder, scores: dict, seed: int) -> dict:
    """Write `scores` of `evaluate` (held-out `seed`) to `folder/eval_results.json` and into its model card.

    The card (README.md, created from the config if absent) gets the figures as Hub `model-index` metadata and as
    one line of text, both from `scores`: numbers in a card are never typed by hand.
    """
    import json
    from pathlib import Path

    from huggingface_hub import EvalResult, ModelCard

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} is not a model folder (no config.json); pass --model FOLDER to record.")
    missing = [key for key in (*QUESTION_TYPES, "overall", "n") if key not in scores]
    if missing:
        raise ValueError(f"scores lack {missing}; pass the dict returned by evaluate().")
    record = {"task": "shapes-and-words", "split": f"heldout seed {seed}", "n": scores["n"], "seed": seed,
              "command": f"florence-vl eval-shapes --model {folder} --n {scores['n']} --seed {seed} --record",
              "scores": {key: scores[key] for key in (*QUESTION_TYPES, "overall")}}
    (folder / RESULTS_FILE).write_text(json.dumps(record, indent=1) + "\n")

    card_path = folder / "README.md"
    if card_path.is_file():
        card = ModelCard.load(card_path)
    else:
        from transformers import AutoConfig

        from florence_vl.convert import model_card

        card = ModelCard(model_card(AutoConfig.from_pretrained(folder, trust_remote_code=True)))
    card.data.model_name = card.data.model_name or folder.name
    card.data.eval_results = [
        EvalResult(task_type="image-text-to-text", dataset_type="shapes-and-words", dataset_name=record["split"],
                   metric_type="exact_match", metric_name=f"exact match ({name})", metric_value=round(value, 3))
        for name, value in record["scores"].items()
    ]
    per_type = ", ".join(f"{name} {record['scores'][name]:.3f}" for name in QUESTION_TYPES)
    line = (f"{_RESULTS_LINE} on {scores['n']} images of seed {seed} (`{record['command']}`): "
            f"{record['scores']['overall']:.3f} overall ({per_type}).")
    body = [text for text in card.text.rstrip("\n").split("\n") if not text.startswith(_RESULTS_LINE)]
    card.text = "\n".join(body).rstrip("\n") + "\n\n" + line + "\n"
    card.save(card_path)
    return record
