"""Florence-VL in miniature: the paper's recipe and analyses on the shapes-and-words task, as one resumable command.

```bash
nice -n 15 python -m florence_vl.train.study --out runs/study --jobs 2 --report docs/study  # the study; rerun = resume
python -m florence_vl.train.study --out runs/study --report docs/study --report-only  # results so far
python -m florence_vl.train.study --out /tmp/s --schedule ci             # the same machinery at a few steps (CI)
```

Every run (the Florence-2 pretraining, the LLM pretraining, each Florence-VL variant x seed, each alignment seed,
the PCA maps) lives in its own folder under `--out` and ends by writing `metrics.json` and then a `DONE` marker;
a run whose folder has `DONE` is skipped, so the command resumes after an interruption (a run cut mid-way restarts
from its beginning). Schedule and seeds are fixed in `SCHEDULES` (docs/study.md says why) before any comparison.
"""

import argparse
import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

import torch

DONE = "DONE"
METRICS = "metrics.json"

# Fixed before any comparison was run (docs/study.md). "full" is the study; "ci" the same machinery at a few steps.
SCHEDULES = {
    "full": dict(
        florence2=dict(steps=2400, batch_size=32, learning_rate=1e-3, seed=0, n_eval=200, vision_freeze_steps=1000),
        llm=dict(steps=1500, batch_size=32, learning_rate=1e-3, seed=0),
        stage1=dict(steps=600, batch_size=16, question_mix=0.3),  # learning rates: train/recipes/study_stage*.yaml
        stage2=dict(steps=600, batch_size=16, question_mix=0.8),
        seeds=(0, 1, 2),
        variants=("channel_concat", "no_caption", "no_ocr", "no_grounding", "token_concat", "average"),
        n_eval=450, eval_seed=12345,
        alignment=dict(pairs=256, steps=200, lr=1e-3),
    ),
    "ci": dict(
        florence2=dict(steps=3, batch_size=4, learning_rate=1e-3, seed=0, n_eval=3, vision_freeze_steps=1),
        llm=dict(steps=3, batch_size=4, learning_rate=1e-3, seed=0),
        stage1=dict(steps=2, batch_size=2, question_mix=0.3),
        stage2=dict(steps=2, batch_size=2, question_mix=0.8),
        seeds=(0,),
        variants=("channel_concat", "no_ocr"),
        n_eval=9, eval_seed=12345,
        alignment=dict(pairs=8, steps=3, lr=1e-3),
    ),
}


@contextlib.contextmanager
def _locked(folder: Path, wait: bool):
    """One process per run folder. Another study process on the same `--out` waits here (`wait`: the run is
    needed next) or gets False and moves on to the next run (`--jobs`)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def is_done(folder: Path) -> bool:
    return (folder / DONE).is_file() and (folder / METRICS).is_file()


def run_once(folder: Path, work, log=print, wait: bool = False, settings: dict | None = None) -> dict | None:
    """`work(folder)` -> metrics dict, unless `folder` already holds a finished run; returns its metrics (None when
    another process is running it and `wait` is False).

    The metrics are written first and the `DONE` marker last, so a run killed at any point is redone whole."""
    folder = Path(folder)
    with _locked(folder, wait) as mine:
        if not mine:
            log(f"busy (another process): {folder}")
            return None
        if is_done(folder):
            metrics = json.loads((folder / METRICS).read_text())
            recorded = metrics.get("settings", json.loads(json.dumps(settings)))  # runs before this check: none
            if settings is not None and recorded != json.loads(json.dumps(settings)):
                raise ValueError(f"{folder} finished with other settings ({metrics.get('settings')}) than this "
                                 f"schedule's ({settings}); resume with the same schedule, or use a new --out.")
            log(f"skip (done): {folder}")
            return metrics
        log(f"run: {folder}")
        start = time.time()
        metrics = dict(work(folder))
        metrics.setdefault("wall_seconds", round(time.time() - start, 1))
        if settings is not None:
            metrics["settings"] = settings
        (folder / METRICS).write_text(json.dumps(metrics, indent=1) + "\n")
        (folder / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
        return metrics


def florence2_run(schedule: dict):
    def work(folder: Path) -> dict:
        from florence_vl.train import florence2_shapes

        return florence2_shapes.train(folder, **schedule["florence2"])

    return work


def llm_run(schedule: dict):
    def work(folder: Path) -> dict:
        from florence_vl.train import llm_shapes

        return llm_shapes.train(folder, **schedule["llm"])

    return work


# Feature sets and fusion modes (the names of analysis.ABLATION_VARIANTS): Table 1's drop-one-prompt rows, Table 4-5's
# fusion modes. Every variant is trained with the same schedule, data and seeds.
RECIPES = Path(__file__).resolve().parent / "recipes"


def vision_prompts(florence2: Path) -> tuple[str, ...]:
    """The prompts Florence-VL feeds the Florence-2 encoder: the expansions of the three tasks the tiny Florence-2
    was pretrained on (caption, OCR, grounding order), read from its own processor."""
    from florence_vl.train.florence2_shapes import task_prompts

    return tuple(task_prompts().values())


def build_parts(out: Path, folder: Path, variant: str, seed: int):
    """`from_pretrained_parts(tiny Florence-2, tiny LLM)` with the variant's fusion/feature options; the fresh
    projector is drawn from `seed`."""
    from florence_vl.convert import from_pretrained_parts

    torch.manual_seed(seed)
    model, processor = from_pretrained_parts(str(out / "florence2"), str(out / "llm"), image_size=128,
                                             vision_prompts=vision_prompts(out / "florence2"), chat_template="phi3",
                                             **_variant_options(variant))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def _variant_options(variant: str) -> dict:
    from florence_vl.analysis import ABLATION_VARIANTS

    if variant not in ABLATION_VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {list(ABLATION_VARIANTS)}")
    return dict(ABLATION_VARIANTS[variant])


def _sft(recipe: str, source: Path, output: Path, stage: dict, seed: int, data_seed: int):
    from florence_vl.train import sft

    argv = ["--config", str(RECIPES / recipe), "--model_name_or_path", str(source), "--output_dir", str(output),
            "--max_steps", str(stage["steps"]), "--per_device_train_batch_size", str(stage["batch_size"]),
            "--shapes_train_size", str(stage["steps"] * stage["batch_size"]), "--shapes_seed", str(data_seed),
            "--shapes_question_mix", str(stage["question_mix"]), "--seed", str(seed),
            "--logging_steps", str(max(1, stage["steps"] // 10)), "--trust_remote_code", "true"]
    return sft.main(*sft.make_parser().parse_args_and_config(args=argv))


def evaluate_fvl(model, processor, schedule: dict) -> dict:
    """Exact match per question type on the held-out set of all nine types, and each example's hit (paired tests)."""
    from florence_vl.analysis import shapes_answer_fn
    from florence_vl.train import shapes

    details: list[bool] = []
    scores = shapes.evaluate(shapes_answer_fn(model.eval(), processor), n=schedule["n_eval"],
                             seed=schedule["eval_seed"], question_types=shapes.ALL_QUESTION_TYPES, progress=False,
                             details=details)
    return {"scores": scores, "hits": [int(hit) for hit in details]}


def fvl_run(out: Path, schedule: dict, variant: str, seed: int):
    """Parts -> stage 1 -> stage 2 -> held-out evaluation. The data of seed s are the same for every variant."""
    def work(folder: Path) -> dict:
        build_parts(out, folder / "init", variant, seed)
        data_seed = 1000 + seed
        trainer = _sft("study_stage1.yaml", folder / "init", folder / "stage1", schedule["stage1"], seed, data_seed)
        loss1 = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        trainer = _sft("study_stage2.yaml", folder / "stage1", folder / "stage2", schedule["stage2"], seed,
                       data_seed + 500)
        loss2 = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        metrics = evaluate_fvl(trainer.model, trainer.processing_class, schedule)
        return {**metrics, "variant": variant, "seed": seed, "stage1_loss": loss1, "stage2_loss": loss2}

    return work


SOURCES = ("image", "caption", "ocr", "grounding")


def subsets() -> dict[str, tuple[str, ...]]:
    """Every non-empty subset of the four sources, named by joining them with '+' (V first)."""
    from itertools import combinations

    return {"+".join(combo): combo for k in range(1, 5) for combo in combinations(SOURCES, k)}


def _caption_pairs(n: int, seed: int):
    import random

    from florence_vl.train import shapes

    rng = random.Random(seed)
    scenes = [shapes.sample_scene(rng) for _ in range(n)]
    return [shapes.render(scene) for scene in scenes], [shapes.caption(scene) for scene in scenes]


def alignment_metrics(model, processor, settings: dict, seed: int) -> dict:
    """§4's alignment loss (analysis.fit_alignment: linear map, L2 norm, softmax over the batch against the
    identity) for every subset of [V, V_cap, V_ocr, V_grd] concatenated, on `pairs` (image, description) pairs of
    `seed`: the training loss after `steps` (the paper's measure), and the loss of that map on as many other pairs
    (held out). A control of the concat's larger width: V plus three Gaussian blocks of V's scale ("image+noise3",
    the width of all four, no extra information)."""
    from florence_vl.analysis import alignment_loss, pooled_source_features, pooled_text_features

    n = settings["pairs"]
    images, texts = _caption_pairs(2 * n, 2000 + seed)
    features = pooled_source_features(model, processor, images)
    text = pooled_text_features(model, processor, texts)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(2 * n, 3 * features["image"].shape[1], generator=generator) * features["image"].std()
    combos = {name: torch.cat([features[s] for s in combo], -1) for name, combo in subsets().items()}
    combos["image+noise3"] = torch.cat([features["image"], noise], -1)
    train, held = slice(0, n), slice(n, 2 * n)
    final, heldout, curves = {}, {}, {}
    for name, vision in combos.items():
        projection, curve = _fit_map(vision[train], text[train], settings, seed)
        final[name] = curve[-1]
        curves[name] = curve[:: max(1, len(curve) // 50)]
        with torch.no_grad():
            heldout[name] = alignment_loss(projection(vision[held].float()), text[held].float()).item()
    return {"final_loss": final, "heldout_loss": heldout, "curves": curves, "seed": seed, "pairs": n}


def _fit_map(vision, text, settings: dict, seed: int):
    """analysis.fit_alignment's loop (Adam on all pairs at once), keeping the map: (map, loss before each step)."""
    from torch import nn

    from florence_vl.analysis import alignment_loss

    vision, text = vision.detach().float(), text.detach().float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = nn.Linear(vision.shape[-1], text.shape[-1])
    optimizer = torch.optim.Adam(projection.parameters(), lr=settings["lr"])
    curve = []
    for _ in range(settings["steps"]):
        loss = alignment_loss(projection(vision), text)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return projection, curve


def alignment_run(out: Path, schedule: dict, seed: int, model_folder: Path | None):
    """On the model from parts (before any Florence-VL training; `model_folder` None) or a trained one."""
    def work(folder: Path) -> dict:
        from florence_vl import FlorenceVLForConditionalGeneration, FlorenceVLProcessor

        if model_folder is None:
            model, processor = build_parts(out, folder / "model", "channel_concat", seed)
        else:
            model = FlorenceVLForConditionalGeneration.from_pretrained(model_folder)
            processor = FlorenceVLProcessor.from_pretrained(model_folder)
        return alignment_metrics(model.eval(), processor, schedule["alignment"], seed)

    return work


def feature_differences(model, processor, n: int = 64, seed: int = 3000) -> dict:
    """Where each prompt's features differ from V: 1 - cos(V_p, V) per grid cell, averaged over `n` scenes, on the
    grid rows that hold the shapes (y < 96 px) and on the row of the word (y >= 96 px)."""
    images, _ = _caption_pairs(n, seed)
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.model.vision_tower(pixel_values.to(model.dtype)).source_features
    grid = model.config.vision_grid_size
    named = dict(zip(model.config.feature_sources, features))
    cells = {name: value[:, 1:].float().view(n, grid, grid, -1) for name, value in named.items()}
    word_rows = slice(grid * 3 // 4, grid)
    shape_rows = slice(0, grid * 3 // 4)
    result = {}
    for name in cells:
        if name == "image":
            continue
        distance = 1 - torch.nn.functional.cosine_similarity(cells[name], cells["image"], dim=-1)  # (n, grid, grid)
        result[name] = {"shape_rows": round(distance[:, shape_rows].mean().item(), 4),
                        "word_row": round(distance[:, word_rows].mean().item(), 4),
                        "map": [[round(v, 4) for v in row] for row in distance.mean(0).tolist()]}
    return result


def pca_run(out: Path, model_folder: Path | None):
    def work(folder: Path) -> dict:
        from florence_vl import FlorenceVLForConditionalGeneration, FlorenceVLProcessor
        from florence_vl.analysis import pca_figure

        if model_folder is None:
            model, processor = build_parts(out, folder / "model", "channel_concat", 0)
        else:
            model = FlorenceVLForConditionalGeneration.from_pretrained(model_folder)
            processor = FlorenceVLProcessor.from_pretrained(model_folder)
        images, _ = _caption_pairs(3, 4000)
        figures = []
        for index, image in enumerate(images):
            figures.append(str(pca_figure(model.eval(), processor, image, folder / f"pca_{index}.png")))
        return {"figures": figures, "differences": feature_differences(model.eval(), processor)}

    return work


PHASES = ("florence2", "llm", "alignment", "pca", "fvl")


def work_through(out: Path, schedule: dict, phases) -> None:
    """Every run of `phases` in order, skipping finished ones (and, without waiting, those another process holds)."""
    if "florence2" in phases:
        run_once(out / "florence2", florence2_run(schedule), wait=True, settings=schedule["florence2"])
    if "llm" in phases:
        run_once(out / "llm", llm_run(schedule), wait=True, settings=schedule["llm"])
    if "alignment" in phases:
        for seed in schedule["seeds"]:
            run_once(out / "alignment" / "parts" / f"seed-{seed}", alignment_run(out, schedule, seed, None))
    if "pca" in phases:
        run_once(out / "pca" / "parts", pca_run(out, None))
    if "fvl" in phases:
        for seed in schedule["seeds"]:  # seed-major: every variant of seed 0 first, so a cut study compares variants
            for variant in schedule["variants"]:
                run_once(out / "fvl" / variant / f"seed-{seed}", fvl_run(out, schedule, variant, seed),
                         settings={key: schedule[key] for key in ("stage1", "stage2", "n_eval", "eval_seed")})
    trained = {seed: out / "fvl" / "channel_concat" / f"seed-{seed}" for seed in schedule["seeds"]}
    if "alignment" in phases:
        for seed, run in trained.items():
            if is_done(run):
                run_once(out / "alignment" / "trained" / f"seed-{seed}",
                         alignment_run(out, schedule, seed, run / "stage2"))
    if "pca" in phases and is_done(trained[schedule["seeds"][0]]):
        run_once(out / "pca" / "trained", pca_run(out, trained[schedule["seeds"][0]] / "stage2"))


def _spawn_helper(argv):
    """Another process running the same study (`--jobs`); file locks keep the two on different runs."""
    import subprocess
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    keep, skip = [], False
    for item in argv:  # the helper neither spawns helpers nor writes the report
        if skip:
            skip = False
            continue
        if item in ("--jobs", "--report"):
            skip = True
            continue
        if not item.startswith(("--jobs=", "--report=")):
            keep.append(item)
    return subprocess.Popen([sys.executable, "-m", "florence_vl.train.study", *keep])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/study", help="Folder of every run (resumable).")
    parser.add_argument("--schedule", default="full", choices=sorted(SCHEDULES))
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: CPU shared).")
    parser.add_argument("--report", default=None, help="Write results.json and figures here (e.g. docs/study).")
    parser.add_argument("--jobs", type=int, default=1, help="Processes working through the runs side by side.")
    parser.add_argument("--report-only", action="store_true",
                        help="Only write --report from the runs finished so far (while a study runs elsewhere).")
    parser.add_argument("--ship-florence2", default=None, metavar="DIR",
                        help="Copy the finished tiny Florence-2 here as a checkpoint folder with its card.")
    args = parser.parse_args(argv)
    if args.report_only and not args.report:
        raise ValueError("--report-only needs --report DIR (where to write results.json and the figures)")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs} must be >= 1")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    schedule, out = SCHEDULES[args.schedule], Path(args.out)
    helpers = [] if args.report_only else [_spawn_helper(argv) for _ in range(args.jobs - 1)]
    if not args.report_only:
        work_through(out, schedule, args.phases)
    for helper in helpers:
        if helper.wait():
            raise RuntimeError(f"a study helper process failed (exit {helper.returncode}); rerun to resume")
    if helpers:  # runs that waited on a helper's results (alignment/PCA of trained models)
        work_through(out, schedule, args.phases)
    if args.report:
        from florence_vl.train.study_report import write_report

        results = write_report(out, schedule, Path(args.report))
        print(f"report written to {args.report}; pending: {results['pending'] or 'nothing'}")
    if args.ship_florence2 and is_done(out / "florence2"):
        from florence_vl.train.florence2_shapes import ship

        print(f"tiny Florence-2 shipped to {ship(out / 'florence2', args.ship_florence2)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
