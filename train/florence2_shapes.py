"""A tiny native Florence-2 pretrained on Florence-2's own tasks over the shapes-and-words scenes.

Florence-VL's claim is about what Florence-2's task prompts make its encoder emit; a Florence-2 that never learned
the tasks cannot show it. This module teaches transformers' `Florence2ForConditionalGeneration` (DaViT + BART
encoder-decoder, tiny dims) the three task families Florence-VL's prompts come from, in Florence-2's own formats:

- `<MORE_DETAILED_CAPTION>` -> the full description of the scene (`shapes.caption`);
- `<OCR>` -> the printed word;
- `<OD>` -> each shape's name and its box as four quantised `<loc_N>` tokens (1000 bins per side, the
  quantisation of transformers' `Florence2PostProcessor`), left shape first.

Training is a transformers `Seq2SeqTrainer`; evaluation decodes with `generate` and parses with
`Florence2Processor.post_process_generation`, as a user of Florence-2 would. The saved folder is a plain native
Florence-2 checkpoint (`Florence2ForConditionalGeneration.from_pretrained`, `pipeline("image-text-to-text")`).
"""

import json
import math
import random
import time
from pathlib import Path

import torch

from . import shapes

TASKS = ("<MORE_DETAILED_CAPTION>", "<OCR>", "<OD>")
LOC_BINS = 1000
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<image>")  # BART's ids 0-3, then the image placeholder
# Dims: the vision part of train/recipes/tiny_shapes_model.json, a BART of width 64.
VISION = dict(depths=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], num_groups=[1, 2, 4, 8],
              window_size=4, drop_path_rate=0.0, projection_dim=64, max_position_embeddings=16)
TEXT = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)


def task_prompts() -> dict[str, str]:
    """Task token -> the prompt text `Florence2Processor` expands it to (asked of the processor itself)."""
    processor = build_processor(_byte_tokenizer())
    prompts = {task: processor._construct_prompts(task)[0] for task in TASKS}
    if any(prompt == task for task, prompt in prompts.items()):
        raise RuntimeError(f"this transformers' Florence2Processor does not expand one of {TASKS}: {prompts}")
    return prompts


def _byte_tokenizer(texts=()):
    """A byte-level BPE over `texts` with the special tokens (none: bytes only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(list(texts) or ["a"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def grid_size(image_size: int = shapes.SIZE, vision: dict | None = None) -> int:
    """Side of DaViT's output grid (the conv arithmetic of each stage, as FlorenceVLConfig.vision_grid_size)."""
    from transformers import Florence2VisionConfig

    config = Florence2VisionConfig(**(vision or VISION))
    size = image_size
    for kernel, stride, padding in zip(config.patch_size, config.patch_stride, config.patch_padding):
        size = (size + 2 * padding - kernel) // stride + 1
    return size


def _image_processor(image_size: int = shapes.SIZE, vision: dict | None = None):
    from florence_vl.processing_florence_vl import florence2_image_processor

    processor = florence2_image_processor(image_size)
    processor.image_seq_length = grid_size(image_size, vision) ** 2 + 1  # grid tokens + DaViT's pooled token
    return processor


def target(scene: shapes.Scene, task: str) -> str:
    """The answer text of `task` for `scene`, in Florence-2's output format."""
    if task == "<MORE_DETAILED_CAPTION>":
        return shapes.caption(scene)
    if task == "<OCR>":
        return scene.word
    if task == "<OD>":
        return "".join(item.shape + "".join(f"<loc_{v}>" for v in quantize(item.box())) for item in (scene.left,
                                                                                                    scene.right))
    raise ValueError(f"unknown task {task!r}; use one of {TASKS}")


def quantize(box, size: int = shapes.SIZE) -> list[int]:
    """Florence2PostProcessor.quantize for one box in a square image of side `size`: floor(x / (size / 1000))."""
    per_bin = size / LOC_BINS
    return [min(LOC_BINS - 1, max(0, int(v // per_bin))) for v in box]


def tokenizer_texts() -> list[str]:
    texts = list(task_prompts().values()) + [shapes.caption(s) for s in _scenes(2000, seed=99)]
    return texts + list(shapes.SHAPES) + list(shapes.WORDS)


def build_tokenizer():
    """Byte-level BPE trained on the task texts; `<loc_0>`…`<loc_999>` are added tokens (kept in decoded text)."""
    from tokenizers import AddedToken

    tokenizer = _byte_tokenizer(tokenizer_texts())
    tokenizer.add_tokens([AddedToken(f"<loc_{i}>", special=False, normalized=False) for i in range(LOC_BINS)])
    return tokenizer


# Florence2PostProcessor's parse rules, as in microsoft/Florence-2-large's processor (it refuses a parse type
# missing here).
POST_PROCESSOR_CONFIG = {
    "ocr": {"PATTERN": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
            "AREA_THRESHOLD": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": []}, "pure_text": {}, "description_with_bboxes": {},
    "description_with_polygons": {}, "polygons": {}, "bboxes": {}, "description_with_bboxes_or_polygons": {},
}


def build_processor(tokenizer=None, vision: dict | None = None):
    from transformers import Florence2Processor

    return Florence2Processor(image_processor=_image_processor(vision=vision), tokenizer=tokenizer or build_tokenizer(),
                              post_processor_config=POST_PROCESSOR_CONFIG)


def build_model(tokenizer, seed: int = 0, vision: dict | None = None, text: dict | None = None):
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    torch.manual_seed(seed)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id)
    text_config = dict(text or TEXT, vocab_size=len(tokenizer), **ids)
    config = Florence2Config(vision_config=vision or VISION, text_config=text_config,
                             image_token_id=tokenizer.image_token_id)
    model = Florence2ForConditionalGeneration(config)
    init_for_small_width(model)
    init_location_embeddings(model, tokenizer)
    model.generation_config.update(**ids, max_new_tokens=32, num_beams=1, do_sample=False)
    return model


@torch.no_grad()
def init_for_small_width(model) -> None:
    """Re-draw every convolution and linear layer with torch's default (fan-in scaled) init and the token embeddings
    (tied to the output layer) from N(0, 1/width), instead of Florence-2's fixed std 0.02.

    Why: std 0.02 suits Florence-2's widths (256-2048 channels). At 16-128 channels it makes each residual branch a
    few percent of its stream and the logits near zero, and the first study run learned boxes in 3,000 steps but
    read neither colour nor word (docs/study.md). What each part of the fix did (`<OCR>` alone, 8 words, batch 32):
    a linear probe of the word on DaViT's features stays at chance for 300 steps with the 0.02 init and is at loss
    < 0.01 by step 50 with this one; the whole model with this init and `freeze_vision_callback(300)` is at 0.03 by
    step 300, without the freeze it is still at the prior (0.70, chance on the word) at step 300.
    """
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and name != "lm_head":  # lm_head: the embeddings
            module.reset_parameters()
    embeddings = model.get_input_embeddings().weight
    embeddings.normal_(0.0, embeddings.shape[1] ** -0.5)


@torch.no_grad()
def init_location_embeddings(model, tokenizer) -> None:
    """Give `<loc_0>`…`<loc_999>` ordered embeddings: sines and cosines of the bin index at wavelengths from 2,000 down
    to 16 bins, scaled to the std of the other rows.

    Why: BART ties its output layer to these rows, so with random rows each of the 1,000 bins is a separate class
    that a tiny model sees ~300 times in a whole run; the first attempt (random rows, docs/study.md) learned the
    captions and the word but sat at loss ≈ 1.03 from step 400 to 1,200, which is the loss of boxes guessed at
    their prior. Ordered rows make neighbouring bins score alike, so a near miss is a small loss.
    Real Florence-2 learned its location rows from hundreds of millions of boxes; the paper says nothing of their init.
    """
    embeddings = model.get_input_embeddings().weight
    ids = torch.tensor(tokenizer.convert_tokens_to_ids([f"<loc_{i}>" for i in range(LOC_BINS)]))
    half = embeddings.shape[1] // 2
    wavelengths = torch.logspace(math.log10(2000), math.log10(16), half)
    angles = torch.arange(LOC_BINS, dtype=torch.float32)[:, None] * (2 * math.pi / wavelengths)[None]
    rows = torch.cat([angles.sin(), angles.cos()], dim=1)
    embeddings[ids] = (rows / rows.std() * embeddings.std()).to(embeddings.dtype)


def _scenes(n: int, seed: int) -> list[shapes.Scene]:
    rng = random.Random(seed)
    return [shapes.sample_scene(rng) for _ in range(n)]


class TaskDataset(torch.utils.data.Dataset):
    """Scene i of `seed`, with task `TASKS[i % 3]`: (image, task token, target text); drawn on the fly."""

    def __init__(self, n: int, seed: int, tasks: tuple[str, ...] = TASKS):
        self.scenes, self.tasks = _scenes(n, seed), tasks

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, index):
        scene = self.scenes[index]
        task = self.tasks[index % len(self.tasks)]
        return {"image": shapes.render(scene), "task": task, "target": target(scene, task)}


class Collator:
    """Florence2Processor for the inputs (image placeholders + expanded task prompt); labels = <s> target </s>,
    padding ignored (-100); the model shifts them right into decoder inputs itself."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items):
        inputs = self.processor(text=[item["task"] for item in items], images=[item["image"] for item in items],
                                padding=True, return_tensors="pt")
        tokenizer = self.processor.tokenizer
        labels = tokenizer([tokenizer.bos_token + item["target"] + tokenizer.eos_token for item in items],
                           padding=True, add_special_tokens=False, return_tensors="pt")
        ids = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        return {**inputs, "labels": ids}


def box_iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def decode_generated(processor, output) -> list[str]:
    """Generated ids -> texts for `post_process_generation`: special tokens kept (the `<loc_N>` parse needs the raw
    text) but a batch's padding dropped, as `post_process_generation` strips only <s> and </s> from plain text
    ("cat</s><pad>" would stay "cat<pad>": a batched evaluation would count the shorter answers wrong)."""
    return [text.replace(processor.tokenizer.pad_token, "")
            for text in processor.batch_decode(output, skip_special_tokens=False)]


@torch.inference_mode()
def evaluate(model, processor, n: int = 200, seed: int = 12345, batch_size: int = 32,
             tasks: tuple[str, ...] = TASKS) -> dict:
    """Each task on the same `n` held-out scenes, parsed by `post_process_generation`: caption and OCR exact match,
    detection recall at IoU 0.5 (a ground-truth box counts when a predicted box of the same label overlaps it)."""
    model.eval()
    scenes = _scenes(n, seed)
    images = [shapes.render(scene) for scene in scenes]
    hits = {task: [] for task in tasks}
    for task in tasks:
        for start in range(0, n, batch_size):
            batch = images[start:start + batch_size]
            inputs = processor(text=[task] * len(batch), images=batch, padding=True, return_tensors="pt")
            output = model.generate(**inputs, max_new_tokens=40, do_sample=False, num_beams=1)
            texts = decode_generated(processor, output)
            for scene, text in zip(scenes[start:start + batch_size], texts):
                parsed = processor.post_process_generation(text, task=task, image_size=(shapes.SIZE, shapes.SIZE))
                answer = parsed[task]
                if task == "<MORE_DETAILED_CAPTION>":
                    hits[task].append(answer == shapes.caption(scene))
                elif task == "<OCR>":
                    hits[task].append(answer == scene.word)
                else:
                    for item in (scene.left, scene.right):
                        hits[task].append(any(label == item.shape and box_iou(box, item.box()) >= 0.5
                                              for box, label in zip(answer["bboxes"], answer["labels"])))
    names = {"<MORE_DETAILED_CAPTION>": "caption_exact_match", "<OCR>": "ocr_exact_match", "<OD>": "od_recall@0.5"}
    scores = {names[task]: sum(values) / len(values) for task, values in hits.items()}
    scores["n"] = n
    return scores


def vision_parameters(model) -> list[torch.nn.Parameter]:
    return [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]


def freeze_vision_callback(steps: int):
    """A TrainerCallback keeping DaViT and the image projection frozen (no gradient, so AdamW skips them) for the
    first `steps` optimizer steps.

    Why: in the first steps the decoder learns the answer templates and the answers' prior, and the gradient that
    reaches the vision part says nothing about the image; AdamW still moves every vision weight by ~lr per step, and
    within ~100 steps the image features collapse to a constant (across-image std of the projected features 0.25 at
    init, 0.005 after 300 steps) that the decoder then learns to ignore. Frozen, the random DaViT's features (which do
    differ per image) are what the decoder learns to read; then DaViT trains on a gradient that carries the image.
    FlorenceVL's stage 1 has the same warm-up (`train/sft.py`, `--vision_freeze_steps`).
    How long (2,400 steps x 32 of the three tasks, 100 held-out scenes): frozen for 300 steps, colours, shapes and
    boxes were learned but not the word (caption exact match 0.13, OCR 0.09, detection recall 1.0): `<OCR>` is a third
    of the batches and the decoder learns the templates first; frozen for 1,000 steps: 1.0, 1.0, 1.0.
    """
    from transformers import TrainerCallback

    class FreezeVision(TrainerCallback):
        def set(self, model, trainable: bool) -> None:
            for parameter in vision_parameters(model):
                parameter.requires_grad_(trainable)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.set(model, state.global_step >= steps)

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == steps:
                self.set(model, True)

    return FreezeVision()


def train(out_dir: str | Path, steps: int = 3000, batch_size: int = 32, learning_rate: float = 1e-3, seed: int = 0,
          n_eval: int = 200, logging_steps: int = 100, vision: dict | None = None, text: dict | None = None,
          tasks: tuple[str, ...] = TASKS, vision_freeze_steps: int = 0) -> dict:
    """Pretrain the tiny Florence-2 for `steps` with `Seq2SeqTrainer`, save it as a native folder, evaluate it.

    Returns (and writes to `out_dir/metrics.json`) the held-out scores, the training loss history and the time."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    out_dir = Path(out_dir)
    start = time.time()
    processor = build_processor(vision=vision)
    model = build_model(processor.tokenizer, seed, vision, text)
    args = Seq2SeqTrainingArguments(
        output_dir=str(out_dir / "trainer"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps * 3 // 100),
        weight_decay=0.0, logging_steps=logging_steps, save_strategy="no", report_to="none", use_cpu=True,
        seed=seed, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    dataset = TaskDataset(steps * batch_size, seed=seed + 1, tasks=tasks)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset,
                             data_collator=Collator(processor),
                             callbacks=[freeze_vision_callback(vision_freeze_steps)] if vision_freeze_steps else None)
    trainer.train()
    train_seconds = time.time() - start
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    scores = evaluate(model, processor, n=n_eval, tasks=tasks)
    metrics = {"scores": scores, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
               "seed": seed, "train_seconds": round(train_seconds, 1),
               "loss": [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "metrics.json")


def ship(run_folder: str | Path, dest: str | Path) -> Path:
    """Copy a finished pretraining run to `dest` as a native Florence-2 checkpoint with a model card whose numbers
    come from the run's `metrics.json`."""
    import shutil

    run_folder, dest = Path(run_folder), Path(dest)
    metrics = json.loads((run_folder / "metrics.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        shutil.copy(run_folder / name, dest / name)
    scores = metrics["scores"]
    (dest / "README.md").write_text(f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [florence2, synthetic, shapes-and-words]
---
# Tiny Florence-2 for the shapes-and-words task

A native `Florence2ForConditionalGeneration` (DaViT 16/32/64/128, BART 2+2 layers of width 64),
pretrained from scratch with `Seq2SeqTrainer` by `python -m florence_vl.train.study` (train/florence2_shapes.py)
on three Florence-2 tasks over 128x128 scenes: `<MORE_DETAILED_CAPTION>`, `<OCR>`, `<OD>`. It is the vision part
of the Florence-VL study (docs/study.md); it knows nothing outside this synthetic task.

Held-out ({scores['n']} scenes, `post_process_generation`): caption exact match {scores['caption_exact_match']:.3f},
OCR exact match {scores['ocr_exact_match']:.3f}, detection recall at IoU 0.5 {scores['od_recall@0.5']:.3f}
({metrics['steps']} steps x {metrics['batch_size']}, {metrics['train_seconds']:.0f} s of training).

```python
from transformers import pipeline
pipe = pipeline("image-text-to-text", model="checkpoints/florence2-tiny-shapes")
pipe(images=image, text="<OD>")
```
""")
    return dest
