"""Training data in TRL's conversational format (`images` + `messages`) from what users have.

- `load_llava_json`: LLaVA-style JSON/JSONL (`{"image": path, "conversations": [{"from": "human", ...}]}`).
- `load_captions`: image + caption pairs -> one "describe" turn each.
- `load_any`: any `datasets` dataset (Hub id, local folder, parquet/json files), optionally streamed.
A missing or unreadable image is never replaced by a blank one: the sample is skipped, counted and reported.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)
DEFAULT_CAPTION_PROMPT = "Describe the image in detail."
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class SkipReport:
    """Counts samples dropped because an image could not be read; keeps the first few paths and reasons."""

    skipped: int = 0
    examples: list[str] = field(default_factory=list)
    keep: int = 5

    def add(self, path, reason: str) -> None:
        self.skipped += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{path}: {reason}")

    def summary(self) -> str:
        if not self.skipped:
            return "all images readable"
        return f"skipped {self.skipped} samples with unreadable images, e.g. " + "; ".join(self.examples)


def open_image(path: str | Path, report: SkipReport) -> Image.Image | None:
    """Fully decode an image file; return None (and record why) if it is missing or corrupt."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        report.add(path, "missing file")
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises these for truncated/corrupt data
        report.add(path, f"unreadable ({type(error).__name__}: {error})")
    return None


def llava_to_messages(conversations: list[dict], n_images: int) -> list[dict]:
    """LLaVA turns -> TRL messages; `<image>` markers become `{"type": "image"}` items before the turn's text."""
    messages, seen_images = [], 0
    for turn in conversations:
        role = ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"Unknown conversation role {turn.get('from')!r}; expected one of {sorted(ROLES)}.")
        text = turn.get("value", turn.get("content", ""))
        # As the original's preprocess_multimodal: the markers are removed, the text stripped, the images go first.
        count = text.count("<image>")
        text = text.replace("<image>", "").strip() if count else text
        content = [{"type": "image"}] * count + ([{"type": "text", "text": text}] if text else [])
        seen_images += count
        messages.append({"role": role, "content": content})
    if seen_images == 0 and n_images:  # LLaVA data may omit the marker: the image goes before the first turn
        messages[0]["content"].insert(0, {"type": "image"})
    elif seen_images != n_images:
        raise ValueError(f"conversation has {seen_images} <image> markers but {n_images} images")
    return messages


def load_llava_json(path: str | Path, image_folder: str | Path, report: SkipReport | None = None) -> list[dict]:
    """Read LLaVA-style JSON (a list) or JSONL; returns TRL conversational examples with opened images."""
    report = report if report is not None else SkipReport()
    text = Path(path).read_text()
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                       if line.strip()]
    examples = []
    for record in records:
        names = record.get("image") or []
        names = [names] if isinstance(names, str) else list(names)
        images = [open_image(Path(image_folder) / name, report) for name in names]
        if any(image is None for image in images):
            continue
        try:
            messages = llava_to_messages(record["conversations"], len(images))
        except ValueError as error:
            report.add(record.get("id", names), str(error))
            continue
        examples.append({"images": images, "messages": messages})
    logger.info("%s: %d examples, %s", path, len(examples), report.summary())
    return examples


def caption_example(image: Image.Image, caption: str, prompt: str = DEFAULT_CAPTION_PROMPT) -> dict:
    """One image + caption -> a one-turn "describe" conversation."""
    return {
        "images": [image],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]},
        ],
    }


def load_captions(pairs, image_folder: str | Path | None = None, prompt: str = DEFAULT_CAPTION_PROMPT,
                  report: SkipReport | None = None) -> list[dict]:
    """`pairs`: iterable of (image or path, caption); paths are resolved against `image_folder`."""
    report = report if report is not None else SkipReport()
    examples = []
    for image, caption in pairs:
        if not isinstance(image, Image.Image):
            image = open_image(Path(image_folder or ".") / image, report)
            if image is None:
                continue
        examples.append(caption_example(image, caption, prompt))
    return examples


def load_any(name_or_path: str, split: str = "train", streaming: bool = False, **kwargs):
    """Any `datasets` dataset already in conversational format: a Hub id, a saved folder or data files."""
    from datasets import load_dataset, load_from_disk

    path = Path(name_or_path)
    if path.is_dir() and any((path / name).exists() for name in ("dataset_dict.json", "state.json")):
        dataset = load_from_disk(str(path))
        return dataset[split] if hasattr(dataset, "keys") else dataset
    if path.suffix in (".parquet", ".json", ".jsonl", ".csv"):
        builder = {".jsonl": "json"}.get(path.suffix, path.suffix[1:])
        return load_dataset(builder, data_files=str(path), split=split, streaming=streaming, **kwargs)
    return load_dataset(name_or_path, split=split, streaming=streaming, **kwargs)
