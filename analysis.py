"""The paper's analyses (arXiv 2412.04424): alignment loss (§4, Fig. 4-5), PCA feature maps (Fig. 3), and the
fusion / feature ablations (Tables 1, 4, 5) on the shapes-and-words task.

```bash
florence-vl analyze alignment --model checkpoints/florence-vl-tiny-shapes --out-dir analysis/alignment
florence-vl analyze pca examples/shapes_0.png --out analysis/pca.png
florence-vl analyze ablations --seeds 0 1 --jobs 2 --out-dir analysis/ablations   # 16 tiny models: see README
```

matplotlib (the `analysis` extra) is imported only by the functions that draw a plot.
"""

import argparse
import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent
RECIPES = REPO / "train" / "recipes"
SOURCE_LABELS = {"image": "V", "caption": "V caption", "ocr": "V OCR", "grounding": "V grounding"}

# ---------------------------------------------------------------------------------------------------------------
# Alignment loss (§4): how well a linear map can align pooled vision features with the LLM's text features.
# ---------------------------------------------------------------------------------------------------------------


def feature_variants(sources: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The feature combinations of Fig. 5 for a model fusing `sources` (config order), name -> sources kept.

    `all`; `no_<source>` for each source; `image_only` (V, the depth feature); `prompts_only` (the breadth
    features, the same set as `no_image`).
    """
    sources = tuple(sources)
    variants = {"all": sources}
    if len(sources) > 1:
        variants.update({f"no_{source}": tuple(s for s in sources if s != source) for source in sources})
    prompts = tuple(s for s in sources if s != "image")
    if "image" in sources and prompts:
        variants["image_only"] = ("image",)
        variants["prompts_only"] = prompts
    return variants


def alignment_loss(vision: torch.Tensor, text: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Cross-entropy of softmax(F_v · F_tᵀ / temperature) against the identity: pair n's vision row must pick text n.

    `vision` (N, d) and `text` (N, d) are pooled features in the same space; both are L2-normalised here.
    """
    if vision.shape != text.shape or vision.dim() != 2:
        raise ValueError(f"vision {tuple(vision.shape)} and text {tuple(text.shape)} must both be (N, d).")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    logits = F.normalize(vision, dim=-1) @ F.normalize(text, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(vision), device=vision.device))


def fit_alignment(vision: torch.Tensor, text: torch.Tensor, steps: int, lr: float, temperature: float = 0.07,
                  seed: int = 0) -> list[float]:
    """Train a linear projection vision dim -> text dim with Adam on all pairs at once; the loss before each step.

    `vision` (N, d_v) is pooled over tokens before the projection, which equals pooling after it (the map is
    linear), so the full token sequences are never projected.
    """
    if steps < 1 or lr <= 0:
        raise ValueError(f"steps={steps} must be >= 1 and lr={lr} > 0.")
    if len(vision) != len(text) or len(vision) < 2:
        raise ValueError(f"need the same number (>= 2) of vision ({len(vision)}) and text ({len(text)}) rows.")
    vision, text = vision.detach().float(), text.detach().float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = nn.Linear(vision.shape[-1], text.shape[-1]).to(vision.device)
    optimizer = torch.optim.Adam(projection.parameters(), lr=lr)
    curve = []
    for _ in range(steps):
        loss = alignment_loss(projection(vision), text, temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return curve


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def pooled_text_features(model, processor, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean over the (unpadded) tokens of the LLM's last hidden layer for each text: (N, hidden_size)."""
    language_model = model.model.language_model
    device = next(language_model.parameters()).device
    pooled = []
    for batch in _batches(texts, batch_size):
        inputs = processor.tokenizer(batch, padding=True, return_tensors="pt").to(device)
        hidden = language_model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        pooled.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(pooled)


@torch.no_grad()
def pooled_source_features(model, processor, images: list, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Each of the model's feature sources, averaged over its tokens: source name -> (N, projection_dim)."""
    device = next(model.parameters()).device
    sources = model.config.feature_sources
    pooled: dict[str, list[torch.Tensor]] = {source: [] for source in sources}
    for batch in _batches(images, batch_size):
        pixel_values = processor.image_processor(batch, return_tensors="pt")["pixel_values"]
        features = model.model.vision_tower(pixel_values.to(device, model.dtype)).source_features
        for source, feature in zip(sources, features):
            pooled[source].append(feature.float().mean(1))
    return {source: torch.cat(parts) for source, parts in pooled.items()}


def load_vision_encoder(path: str | Path):
    """A transformers vision model (CLIP, SigLIP, DINOv2, ... or the vision half of CLIPModel/SiglipModel) and its
    image processor from one folder."""
    from transformers import AutoImageProcessor, AutoModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"vision encoder {str(path)!r} is not a model folder (no config.json).")
    if not (folder / "preprocessor_config.json").is_file():
        raise ValueError(f"vision encoder {str(path)!r} has no preprocessor_config.json; save its image processor "
                         "there (image_processor.save_pretrained(folder)).")
    encoder = AutoModel.from_pretrained(folder)
    encoder = getattr(encoder, "vision_model", encoder)  # CLIPModel / SiglipModel: keep the vision tower
    return encoder.eval(), AutoImageProcessor.from_pretrained(folder)


@torch.no_grad()
def pooled_encoder_features(encoder, image_processor, images: list, batch_size: int = 16) -> torch.Tensor:
    """`last_hidden_state` of a transformers vision model averaged over tokens: (N, hidden_size)."""
    device = next(encoder.parameters()).device
    pooled = []
    for batch in _batches(images, batch_size):
        pixel_values = image_processor(batch, return_tensors="pt")["pixel_values"].to(device)
        pooled.append(encoder(pixel_values=pixel_values).last_hidden_state.float().mean(1))
    return torch.cat(pooled)


def alignment_curves(model, processor, pairs: Sequence[tuple], variants: Sequence[str] | None = None,
                     steps: int = 200, lr: float = 1e-3, temperature: float = 0.07, seed: int = 0,
                     batch_size: int = 16) -> dict[str, list[float]]:
    """The §4 alignment loss per step for each variant: variant -> `steps` losses (the Fig. 4-5 curves).

    `pairs` are (image, caption) pairs. A variant is a feature combination of this model (see `feature_variants`;
    default: all of them), fused by channel concat, or the path of a folder holding any transformers vision
    model (CLIP, SigLIP, DINOv2) and its image processor. Text features come from this model's LLM.
    """
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 image-text pairs, got {len(pairs)}.")
    images, texts = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
    combinations = feature_variants(model.config.feature_sources)
    variants = list(combinations) if variants is None else list(variants)
    unknown = [v for v in variants if v not in combinations and not Path(v).is_dir()]
    if unknown:
        raise ValueError(f"unknown alignment variants {unknown}: use {sorted(combinations)} or the folder of a "
                         "transformers vision model.")
    model.eval()
    text = pooled_text_features(model, processor, texts, batch_size)
    sources = pooled_source_features(model, processor, images, batch_size) if set(variants) & set(combinations) else {}
    curves = {}
    for variant in variants:
        if variant in combinations:
            vision = torch.cat([sources[source] for source in combinations[variant]], dim=-1)
        else:
            vision = pooled_encoder_features(*load_vision_encoder(variant), images, batch_size)
        curves[variant] = fit_alignment(vision, text, steps, lr, temperature, seed)
    return curves


def write_curves_csv(curves: dict[str, list[float]], path: str | Path) -> Path:
    """One row per step: `step`, then one column per variant."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(curves)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", *names])
        for step, losses in enumerate(zip(*(curves[name] for name in names)), start=1):
            writer.writerow([step, *(f"{loss:.6f}" for loss in losses)])
    return path


def plot_curves(curves: dict[str, list[float]], path: str | Path, title: str = "Alignment loss") -> Path:
    """Fig. 4-5 style: loss against step, one line per variant."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    for name, losses in curves.items():
        axes.plot(range(1, len(losses) + 1), losses, label=Path(name).name if Path(name).is_dir() else name)
    axes.set(xlabel="step", ylabel="alignment loss", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# PCA feature maps (Fig. 3).
# ---------------------------------------------------------------------------------------------------------------


def pca_rgb(tokens: torch.Tensor, grid: int, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """First three principal components of `tokens` (grid*grid, D) as RGB over the grid: (rgb, foreground).

    PC1 is oriented so that the grid border (usually background) scores lower on average than the interior;
    tokens whose PC1 lies less than `threshold` standard deviations above its mean are background (black).
    Each component is min-max scaled to [0, 1] over the foreground tokens (0.5 where they do not vary).
    Returns `rgb` (grid, grid, 3) and the boolean `foreground` (grid, grid).
    """
    if tokens.dim() != 2 or tokens.shape[0] != grid * grid:
        raise ValueError(f"tokens {tuple(tokens.shape)} must be ({grid}*{grid}, D): the grid tokens only.")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold={threshold} must be a finite number of standard deviations.")
    centered = tokens.float() - tokens.float().mean(0)
    _, _, components = torch.linalg.svd(centered, full_matrices=False)
    scores = torch.zeros(grid * grid, 3)
    scores[:, :min(3, len(components))] = centered @ components[:3].T
    scores = scores.view(grid, grid, 3)
    if grid >= 3:
        border = torch.ones(grid, grid, dtype=torch.bool)
        border[1:-1, 1:-1] = False
        if scores[..., 0][border].mean() > scores[..., 0][~border].mean():
            scores[..., 0] = -scores[..., 0]
    first = scores[..., 0]
    foreground = first > threshold * first.std() if first.std() > 1e-12 else torch.zeros_like(first, dtype=torch.bool)
    if not foreground.any():
        return torch.zeros(grid, grid, 3), foreground
    rgb = torch.stack([_min_max(scores[..., k], scores[..., k][foreground]) for k in range(3)], dim=-1)
    return rgb * foreground.unsqueeze(-1), foreground


def _min_max(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    low, high = reference.min(), reference.max()
    if high - low <= 1e-12:
        return torch.full_like(values, 0.5)
    return ((values - low) / (high - low)).clamp(0, 1)


@torch.no_grad()
def pca_maps(model, processor, image, threshold: float = 0.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`pca_rgb` of each feature source of `model` for one image (pooled token dropped): source -> (rgb, mask)."""
    from florence_vl.processing_florence_vl import to_rgb

    model.eval()
    pixel_values = processor.image_processor(to_rgb(image), return_tensors="pt")["pixel_values"]
    features = model.model.vision_tower(pixel_values.to(next(model.parameters()).device, model.dtype)).source_features
    grid = model.config.vision_grid_size
    maps = {}
    for source, feature in zip(model.config.feature_sources, features):
        if feature.shape[1] != grid * grid + 1:
            raise ValueError(f"{source} has {feature.shape[1]} tokens; expected {grid}x{grid} grid + 1 pooled.")
        maps[source] = pca_rgb(feature[0, 1:].cpu(), grid, threshold)  # token 0 is Florence-2's pooled token
    return maps


LABEL_HEIGHT = 20


def pca_figure(model, processor, image, out_png: str | Path, threshold: float = 0.0,
               panel_size: int | None = None) -> Path:
    """Fig. 3: one row image | V | V caption | V OCR | V grounding (the model's sources), labels above.

    Each panel is `panel_size` pixels square (default: the smallest multiple of the grid >= 256, so every token
    is an equal block, upsampled nearest); the masked background is black. Size: (panels * panel_size,
    panel_size + 20).
    """
    from PIL import Image, ImageDraw, ImageFont

    from florence_vl.processing_florence_vl import to_rgb

    grid = model.config.vision_grid_size
    size = panel_size or grid * math.ceil(256 / grid)
    maps = pca_maps(model, processor, image, threshold)
    panels = [("image", to_rgb(image).resize((size, size), Image.Resampling.BICUBIC))]
    for source, (rgb, _) in maps.items():
        array = (rgb * 255).round().to(torch.uint8).numpy()
        panels.append((SOURCE_LABELS.get(source, source),
                       Image.fromarray(array, "RGB").resize((size, size), Image.Resampling.NEAREST)))
    canvas = Image.new("RGB", (size * len(panels), size + LABEL_HEIGHT), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=14)
    for index, (label, panel) in enumerate(panels):
        canvas.paste(panel, (index * size, LABEL_HEIGHT))
        draw.text((index * size + size // 2, LABEL_HEIGHT // 2), label, fill=(0, 0, 0), font=font, anchor="mm")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png


# ---------------------------------------------------------------------------------------------------------------
# Ablations (Tables 1, 4, 5) on the tiny shapes-and-words recipe.
# ---------------------------------------------------------------------------------------------------------------

PROMPTS = ("caption", "ocr", "grounding")
ABLATION_VARIANTS = {
    "channel_concat": {"fusion_mode": "channel_concat"},  # the paper's DBFusion, all four sources
    "token_concat": {"fusion_mode": "token_concat"},
    "average": {"fusion_mode": "average"},
    "image_only": {"vision_feature_sources": ["image"]},
    "prompts_only": {"vision_feature_sources": list(PROMPTS)},
    **{f"no_{prompt}": {"vision_feature_sources": ["image", *(p for p in PROMPTS if p != prompt)]}
       for prompt in PROMPTS},
}
def _recipe(name: str) -> dict:
    import yaml

    return yaml.safe_load((RECIPES / name).read_text())


STAGE_ONE, STAGE_TWO = "tiny_shapes_pretrain.yaml", ("tiny_shapes_questions.yaml", "tiny_shapes_finetune.yaml")


def recipe_steps() -> tuple[int, int]:
    """Stage-1 and stage-2 steps of the tiny recipe (`train/tiny_shapes.sh`; stage 2 has two parts)."""
    return _recipe(STAGE_ONE)["max_steps"], sum(_recipe(name)["max_steps"] for name in STAGE_TWO)


def _stage_argv(recipe: str, steps: int, output_dir: Path, seed: int, extra: list[str]) -> list[str]:
    batch = _recipe(recipe)["per_device_train_batch_size"]
    return ["--config", str(RECIPES / recipe), "--output_dir", str(output_dir), "--max_steps", str(steps),
            "--shapes_train_size", str(steps * batch), "--image_sensitivity_steps", "0", "--seed", str(seed),
            "--logging_steps", str(max(1, steps // 10)), "--disable_tqdm", "true", *extra]


def train_variant(name: str, steps: int, finetune_steps: int, out_dir: Path, seed: int = 0):
    """The tiny recipe with the variant's config and training seed `seed`, in `out_dir/name/seed-{seed}/`: stage 1
    for `steps`, then (when `finetune_steps` > 0) the two parts of stage 2, splitting `finetune_steps` as the recipe
    does. The vision warm-up and the data sizes scale with the steps. Returns the last trainer."""
    from florence_vl.train import sft

    folder = out_dir / name
    run = folder / f"seed-{seed}"
    run.mkdir(parents=True, exist_ok=True)
    options = json.loads((RECIPES / "tiny_shapes_model.json").read_text())
    options.update(ABLATION_VARIANTS[name])
    (folder / "model.json").write_text(json.dumps(options, indent=1))
    pretrain = _recipe(STAGE_ONE)
    freeze = round(steps * pretrain["vision_freeze_steps"] / pretrain["max_steps"])
    source = run / ("pretrain" if finetune_steps else "model")
    argv = _stage_argv(STAGE_ONE, steps, source, seed,
                       ["--model_config", str(folder / "model.json"), "--vision_freeze_steps", str(freeze)])
    trainer = sft.main(*sft.make_parser().parse_args_and_config(args=argv))
    if finetune_steps:
        shares = [_recipe(recipe)["max_steps"] for recipe in STAGE_TWO]
        for recipe, share, target in zip(STAGE_TWO, shares, (run / "questions", run / "model")):
            part = max(1, round(finetune_steps * share / sum(shares)))
            argv = _stage_argv(recipe, part, target, seed, ["--model_name_or_path", str(source)])
            trainer = sft.main(*sft.make_parser().parse_args_and_config(args=argv))
            source = target
    return trainer


def shapes_answer_fn(model, processor, max_new_tokens: int = 32):
    """`answer_fn` for `shapes.evaluate`: greedy, batched (left padding), one answer per question."""

    @torch.inference_mode()
    def answer(images, questions):
        prompts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True) for question in questions]
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt").to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    return answer


def _ablation_run(name: str, seed: int, steps: int, finetune_steps: int, out_dir: Path, n_eval: int,
                  eval_seed: int, threads: int | None = None) -> dict:
    """One (variant, seed) run: train, then exact-match accuracy on the held-out set. Also a worker entry point."""
    from florence_vl.train.shapes import evaluate

    if threads:
        torch.set_num_threads(threads)
    trainer = train_variant(name, steps, finetune_steps, out_dir, seed)
    return evaluate(shapes_answer_fn(trainer.model.eval(), trainer.processing_class), n=n_eval, seed=eval_seed,
                    progress=False)


def summarize(runs: dict[int, dict]) -> dict:
    """Per-seed scores -> {"runs": per seed, "mean": ..., "std": ... (population sd; 0 for one seed)}."""
    keys = next(iter(runs.values())).keys()
    values = {key: [scores[key] for scores in runs.values()] for key in keys}
    return {"runs": {str(seed): scores for seed, scores in runs.items()},
            "mean": {key: round(statistics.fmean(v), 4) for key, v in values.items()},
            "std": {key: round(statistics.pstdev(v), 4) for key, v in values.items()}}


def _reusable(earlier: dict, variants: Sequence[str], seeds: list[int], setting: dict) -> dict[str, dict]:
    """The entries of an earlier `ablations.json` that this call keeps: same setting, and for the variants asked
    for again, the same seeds."""
    def keep(name: str, entry) -> bool:
        if not isinstance(entry, dict) or entry.get("setting") != setting:
            return False
        return name not in variants or sorted(entry["runs"]) == sorted(map(str, seeds))

    return {name: entry for name, entry in earlier.items() if keep(name, entry)}


def run_ablations(variants: Sequence[str], steps: int, out_dir: str | Path, finetune_steps: int | None = None,
                  n_eval: int = 500, eval_seed: int = 12345, seeds: Sequence[int] = (0,),
                  jobs: int = 1) -> dict[str, dict]:
    """Train one tiny shapes-and-words model per variant and training seed, evaluate each, write table and chart.

    Variants are names from `ABLATION_VARIANTS` (fusion modes; feature subsets). Each runs the tiny recipe
    (`train/tiny_shapes.sh`, see `train_variant`) with `steps` stage-1 steps and `finetune_steps` stage-2 steps
    (default `steps * 4 // 5`, the recipe's ratio; 0 skips stage 2) and `--seed` set to each of `seeds` (the data
    stay the recipe's). `jobs` > 1 runs that many trainings at once, one CPU thread each.
    Writes `ablations.md`, `ablations.json` and `ablations.png` in `out_dir` after each finished variant; a variant
    already in `out_dir/ablations.json` with the same seeds is not trained again, and the table keeps the variants
    of earlier runs. Returns variant -> `summarize` of its seeds.
    """
    unknown = [v for v in variants if v not in ABLATION_VARIANTS]
    if unknown or not variants:
        raise ValueError(f"ablation variants {unknown or list(variants)} are not known; use {list(ABLATION_VARIANTS)}.")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1.")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds={seeds}: give one or more distinct integers.")
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} must be an integer >= 1.")
    finetune_steps = steps * 4 // 5 if finetune_steps is None else finetune_steps
    out_dir = Path(out_dir)
    setting = dict(steps=steps, finetune_steps=finetune_steps, n_eval=n_eval, eval_seed=eval_seed)
    saved = out_dir / "ablations.json"
    earlier = json.loads(saved.read_text()) if saved.is_file() else {}
    results = _reusable(earlier, variants, seeds, setting)
    if set(earlier) - set(results):
        print(f"ablations: not kept from {saved} (other steps or seeds): {sorted(set(earlier) - set(results))}")
    tasks = [(name, seed) for name in variants if name not in results for seed in seeds]
    common = (steps, finetune_steps, out_dir, n_eval, eval_seed)
    scores: dict[str, dict[int, dict]] = {name: {} for name in variants}

    def record(name: str, seed: int, value: dict) -> None:
        scores[name][seed] = value
        print(f"{name} seed {seed}: {value}", flush=True)
        if len(scores[name]) == len(seeds):  # rewritten after each variant: an interrupted run keeps what it finished
            results[name] = summarize({s: scores[name][s] for s in seeds}) | {"setting": setting}
            saved.write_text(json.dumps(results, indent=1) + "\n")
            (out_dir / "ablations.md").write_text(ablation_table(results))
            plot_ablations(results, out_dir / "ablations.png")

    if jobs == 1:
        for name, seed in tasks:
            record(name, seed, _ablation_run(name, seed, *common))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_ablation_run, name, seed, *common, threads=1): (name, seed)
                       for name, seed in tasks}
            for future, (name, seed) in futures.items():
                record(name, seed, future.result())
    return {name: results[name] for name in variants}


def ablation_table(results: dict[str, dict]) -> str:
    """Markdown: one row per variant, mean exact-match accuracy per question type and overall (± the sd over
    seeds when there are several)."""
    from florence_vl.train.shapes import QUESTION_TYPES

    columns = [*QUESTION_TYPES, "overall"]
    lines = ["| variant | seeds | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for name, summary in results.items():
        several = len(summary["runs"]) > 1
        cells = [f"{summary['mean'][c]:.3f}" + (f" ± {summary['std'][c]:.3f}" if several else "") for c in columns]
        lines.append(f"| {name} | {len(summary['runs'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ablations(results: dict[str, dict], path: str | Path) -> Path:
    """Grouped bars: accuracy per question type (and overall), one bar per variant."""
    from matplotlib.figure import Figure

    from florence_vl.train.shapes import QUESTION_TYPES

    columns = [*QUESTION_TYPES, "overall"]
    figure = Figure(figsize=(8, 4), dpi=120)
    axes = figure.add_subplot()
    width = 0.8 / len(results)
    for index, (name, summary) in enumerate(results.items()):
        axes.bar([c + index * width for c in range(len(columns))], [summary["mean"][c] for c in columns], width,
                 yerr=[summary["std"][c] for c in columns], capsize=2, label=name)
    axes.set_xticks([c + 0.4 - width / 2 for c in range(len(columns))], columns)
    axes.set(ylabel="exact match", ylim=(0, 1), title="Shapes-and-words ablations")
    axes.legend(fontsize="small")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Command line: `florence-vl analyze alignment|pca|ablations`.
# ---------------------------------------------------------------------------------------------------------------


def caption_pairs(args) -> list[tuple]:
    """(image, caption) pairs: LLaVA JSON (the first assistant reply) or held-out shapes-and-words captions."""
    if args.llava_json:
        from florence_vl.train.data import SkipReport, load_llava_json

        report = SkipReport()
        examples = load_llava_json(args.llava_json, args.image_folder or ".", report)[:args.n]
        print(f"{len(examples)} pairs from {args.llava_json}; {report.summary()}")
        return [(example["images"][0], next(_text(m) for m in example["messages"] if m["role"] == "assistant"))
                for example in examples]
    from florence_vl.train.shapes import COLORS, SHAPES, WORDS, make_examples

    kinds = len(COLORS) * len(SHAPES)
    if args.n > (kinds * kinds - kinds) * len(WORDS):
        raise ValueError(f"--n {args.n}: the shapes task has only {(kinds * kinds - kinds) * len(WORDS)} distinct "
                         "captions; use fewer pairs.")
    pairs = {}  # distinct captions only: a repeated caption makes the identity target ambiguous
    for example in make_examples(8 * args.n, args.seed, "pretrain"):
        pairs.setdefault(example["answer"], example["images"][0])
    if len(pairs) < args.n:
        raise ValueError(f"--n {args.n}: the shapes task gave only {len(pairs)} distinct captions; use fewer pairs.")
    return [(image, text) for text, image in list(pairs.items())[:args.n]]


def _text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else " ".join(i["text"] for i in content if i["type"] == "text")


def analyze_alignment(args) -> None:
    from florence_vl.cli import UsageError, load, require_extra

    require_extra("analysis", "matplotlib")
    model, processor = load(args.model, args.device, args.dtype)
    variants = (args.variants or list(feature_variants(model.config.feature_sources))) + (args.vision_model or [])
    try:
        curves = alignment_curves(model, processor, caption_pairs(args), variants, args.steps, args.lr,
                                  args.temperature, args.seed)
    except ValueError as error:
        raise UsageError(str(error)) from error
    out_dir = Path(args.out_dir)
    print(f"wrote {write_curves_csv(curves, out_dir / 'alignment.csv')} and "
          f"{plot_curves(curves, out_dir / 'alignment.png')}")
    for name, losses in curves.items():
        print(f"{name:>16}: first {losses[0]:.4f}  last {losses[-1]:.4f}")


def analyze_pca(args) -> None:
    from florence_vl.cli import UsageError, load, open_image

    image = open_image(args.image)
    model, processor = load(args.model, args.device, args.dtype)
    try:
        print(f"wrote {pca_figure(model, processor, image, args.out, args.threshold, args.panel_size)}")
    except ValueError as error:
        raise UsageError(str(error)) from error


def analyze_ablations(args) -> None:
    from florence_vl.cli import UsageError, require_extra

    require_extra("train", "trl", "peft", "datasets", "yaml")
    require_extra("analysis", "matplotlib")
    try:
        steps, finetune_steps = recipe_steps()
        results = run_ablations(args.variants, steps if args.steps is None else args.steps, args.out_dir,
                                finetune_steps if args.finetune_steps is None else args.finetune_steps,
                                args.n_eval, args.eval_seed, args.seeds, args.jobs)
    except ValueError as error:
        raise UsageError(str(error)) from error
    print(ablation_table(results))


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """`analyze alignment|pca|ablations` under the `florence-vl` command."""
    from florence_vl.cli import DEFAULT_MODEL

    analyze = subparsers.add_parser("analyze", help="the paper's analyses: alignment loss, PCA maps, ablations")
    commands = analyze.add_subparsers(dest="analysis", required=True)

    def model_options(command):
        command.add_argument("--model", default=DEFAULT_MODEL, help="model folder (default: the tiny checkpoint)")
        command.add_argument("--device", default="cpu")
        command.add_argument("--dtype", default="float32")

    alignment = commands.add_parser("alignment", help="§4 alignment loss curves per feature combination (Fig. 4-5)")
    model_options(alignment)
    alignment.add_argument("--variants", nargs="+", help="feature combinations (default: all, no_<source>, "
                                                         "image_only, prompts_only)")
    alignment.add_argument("--vision-model", nargs="+", help="folders of transformers vision models to compare")
    alignment.add_argument("--llava-json", help="image-caption pairs (default: shapes-and-words captions)")
    alignment.add_argument("--image-folder")
    alignment.add_argument("--n", type=int, default=256, help="number of image-text pairs")
    alignment.add_argument("--steps", type=int, default=200)
    alignment.add_argument("--lr", type=float, default=1e-3)
    alignment.add_argument("--temperature", type=float, default=0.07)
    alignment.add_argument("--seed", type=int, default=0)
    alignment.add_argument("--out-dir", default="analysis/alignment")
    alignment.set_defaults(run=analyze_alignment)

    pca = commands.add_parser("pca", help="PCA maps of V and each prompt feature (Fig. 3)")
    pca.add_argument("image")
    model_options(pca)
    pca.add_argument("--out", default="pca.png")
    pca.add_argument("--threshold", type=float, default=0.0,
                     help="background: PC1 less than this many standard deviations above its mean")
    pca.add_argument("--panel-size", type=int, default=None)
    pca.set_defaults(run=analyze_pca)

    ablations = commands.add_parser("ablations", help="train + evaluate one tiny model per variant (Tables 1, 4, 5)")
    ablations.add_argument("--variants", nargs="+", default=list(ABLATION_VARIANTS), choices=list(ABLATION_VARIANTS))
    ablations.add_argument("--steps", type=int, help="stage-1 steps per variant (default: the recipe's)")
    ablations.add_argument("--finetune-steps", type=int, help="stage-2 steps (default: the recipe's; 0: none)")
    ablations.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds per variant")
    ablations.add_argument("--jobs", type=int, default=1, help="trainings at once (one CPU thread each)")
    ablations.add_argument("--n-eval", type=int, default=500)
    ablations.add_argument("--eval-seed", type=int, default=12345)
    ablations.add_argument("--out-dir", default="analysis/ablations")
    ablations.set_defaults(run=analyze_ablations)
    return analyze


__all__ = [
    "ABLATION_VARIANTS", "alignment_curves", "alignment_loss", "feature_variants", "fit_alignment", "pca_figure",
    "pca_maps", "pca_rgb", "run_ablations", "add_analyze_parser", "analyze_alignment", "analyze_pca",
    "analyze_ablations",
]
