"""The paper's analyses: alignment loss (§4), PCA maps (Fig. 3), ablation runner (Tables 1, 4, 5)."""

import argparse
import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_config, tiny_processor
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from florence_vl import FlorenceVLForConditionalGeneration, analysis
from florence_vl.analysis import LABEL_HEIGHT, alignment_loss, fit_alignment, pca_figure, pca_maps, pca_rgb
from florence_vl.train.shapes import QUESTION_TYPES, make_examples


@pytest.fixture(scope="module")
def tiny_model():
    """Tiny random Florence-VL at 128 px: a 4x4 grid, so PCA maps have some structure."""
    torch.manual_seed(0)
    config = tiny_config(image_size=128)
    return FlorenceVLForConditionalGeneration(config).eval(), tiny_processor(config)


@pytest.fixture(scope="module")
def shapes_pairs():
    return [(example["images"][0], example["answer"]) for example in make_examples(12, seed=5, stage="pretrain")]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_alignment_loss_is_lower_for_aligned_features():
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(32, 8, generator=generator)
    aligned = alignment_loss(text * 3.0, text)  # same directions, other scale
    random = alignment_loss(torch.randn(32, 8, generator=generator), text)
    assert aligned < 0.5 * random
    assert random > 0.5 * np.log(32)


def test_fitted_projection_aligns_linearly_related_features_better_than_random_ones():
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(64, 8, generator=generator)
    related = text @ torch.randn(8, 12, generator=generator)  # an invertible linear map away from the text
    unrelated = torch.randn(64, 12, generator=generator)
    related_curve = fit_alignment(related, text, steps=150, lr=1e-2)
    unrelated_curve = fit_alignment(unrelated, text, steps=150, lr=1e-2)
    assert len(related_curve) == 150
    assert related_curve[-1] < 0.5 * related_curve[0]
    assert related_curve[-1] < 0.5 * unrelated_curve[-1]


def test_alignment_loss_rejects_mismatched_features():
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        alignment_loss(torch.zeros(4, 8), torch.zeros(4, 6))


def test_alignment_curves_decrease_for_every_variant(tiny_model, shapes_pairs, clip_folder, tmp_path):
    model, processor = tiny_model
    variants = [*analysis.feature_variants(model.config.feature_sources), str(clip_folder)]
    curves = analysis.alignment_curves(model, processor, shapes_pairs, variants, steps=150, lr=1e-2)
    assert list(curves) == variants
    assert {"all", "no_image", "no_caption", "no_ocr", "no_grounding", "image_only", "prompts_only"} <= set(curves)
    for name, losses in curves.items():
        assert len(losses) == 150
        assert losses[-1] < losses[0] - 0.1, name
    csv_path = analysis.write_curves_csv(curves, tmp_path / "alignment.csv")
    rows = csv_path.read_text().splitlines()
    assert rows[0].split(",") == ["step", *variants] and len(rows) == 151
    with Image.open(analysis.plot_curves(curves, tmp_path / "alignment.png")) as image:
        assert np.asarray(image.convert("L")).std() > 10  # lines drawn, not a blank canvas


def test_alignment_curves_name_unknown_variants(tiny_model, shapes_pairs):
    model, processor = tiny_model
    with pytest.raises(ValueError, match="no_colour"):
        analysis.alignment_curves(model, processor, shapes_pairs, ["all", "no_colour"], steps=2)


def test_pca_rgb_masks_background_and_orients_the_first_component():
    grid = 6
    tokens = torch.zeros(grid * grid, 5)
    tokens[:, 1:] = torch.randn(grid * grid, 4) * 0.01
    object_tokens = torch.zeros(grid, grid, dtype=torch.bool)
    object_tokens[2:4, 2:4] = True
    tokens[object_tokens.flatten(), 0] = -10.0  # the object sits on the negative side of the raw PC1
    rgb, foreground = pca_rgb(tokens, grid)
    assert torch.equal(foreground, object_tokens)
    assert (rgb[~foreground] == 0).all() and rgb.max() <= 1 and rgb.min() >= 0


def test_pca_figure_layout_and_pixels(tiny_model, tmp_path):
    model, processor = tiny_model
    image = make_examples(1, seed=3, stage="heldout")[0]["images"][0]
    out = pca_figure(model, processor, image, tmp_path / "pca.png", panel_size=64)
    with Image.open(out) as figure:
        pixels = np.asarray(figure.convert("RGB"))
    assert pixels.shape == (64 + LABEL_HEIGHT, 5 * 64, 3)  # image | V | caption | OCR | grounding
    panels = [pixels[LABEL_HEIGHT:, index * 64:(index + 1) * 64] for index in range(5)]
    assert all(panel.std() > 5 for panel in panels)
    block = 64 // model.config.vision_grid_size
    for panel, (rgb, foreground) in zip(panels[1:], pca_maps(model, processor, image).values()):
        assert 0 < int(foreground.sum()) < foreground.numel()
        grid_pixels = panel[block // 2::block, block // 2::block]  # one pixel per token
        assert (grid_pixels[~foreground.numpy()] == 0).all()  # masked background is black
        assert np.abs(grid_pixels / 255.0 - rgb.numpy()).max() < 1 / 255 + 1e-6


def test_run_ablations_writes_one_row_per_variant(tmp_path):
    results = analysis.run_ablations(["channel_concat", "image_only"], steps=3, out_dir=tmp_path,
                                     finetune_steps=1, n_eval=5)
    assert list(results) == ["channel_concat", "image_only"]
    table = (tmp_path / "ablations.md").read_text().strip().splitlines()
    assert table[0].split("|")[1:-1] == [" variant ", " seeds ", *(f" {c} " for c in (*QUESTION_TYPES, "overall"))]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["channel_concat", "image_only"]
    assert [row.split("|")[2].strip() for row in table[2:]] == ["1", "1"]
    assert (tmp_path / "image_only" / "seed-0" / "model" / "config.json").is_file()
    assert (tmp_path / "image_only" / "seed-0" / "questions" / "config.json").is_file()  # stage 2, first part
    assert '"image"' in (tmp_path / "image_only" / "model.json").read_text()
    with Image.open(tmp_path / "ablations.png") as chart:
        assert chart.size[0] > 200

    # A later call on the same folder keeps finished variants (same steps and seeds) and trains only the new one.
    weights = tmp_path / "image_only" / "seed-0" / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = analysis.run_ablations(["image_only", "average"], steps=3, out_dir=tmp_path, finetune_steps=1, n_eval=5)
    assert weights.stat().st_mtime_ns == before and again["image_only"] == results["image_only"]
    table = (tmp_path / "ablations.md").read_text().strip().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["channel_concat", "image_only", "average"]


def test_run_ablations_over_seeds_in_parallel_reports_mean_and_spread(tmp_path):
    results = analysis.run_ablations(["average"], steps=2, out_dir=tmp_path, finetune_steps=0, n_eval=5,
                                     seeds=[3, 4], jobs=2)
    summary = results["average"]
    assert sorted(summary["runs"]) == ["3", "4"]
    for key in (*QUESTION_TYPES, "overall"):
        values = [summary["runs"][seed][key] for seed in ("3", "4")]
        assert summary["mean"][key] == pytest.approx(sum(values) / 2, abs=1e-4)
        assert summary["std"][key] == pytest.approx(abs(values[0] - values[1]) / 2, abs=1e-4)
    assert json.loads((tmp_path / "ablations.json").read_text()) == results
    row = (tmp_path / "ablations.md").read_text().strip().splitlines()[2].split("|")
    assert row[2].strip() == "2" and all("±" in cell for cell in row[3:-1])
    for seed in (3, 4):
        config = json.loads((tmp_path / "average" / f"seed-{seed}" / "model" / "config.json").read_text())
        assert config["fusion_mode"] == "average"


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(seeds=[]), "seeds=[]"), (dict(seeds=[1, 1]), "seeds=[1, 1]"), (dict(jobs=0), "jobs=0"),
    (dict(steps=0), "steps=0"),
])
def test_run_ablations_names_bad_arguments(kwargs, message, tmp_path):
    arguments = dict(variants=["average"], steps=2, out_dir=tmp_path) | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        analysis.run_ablations(**arguments)
    assert not list(tmp_path.iterdir())  # nothing trained or written


def test_analyze_parser_wires_the_three_commands():
    parser = argparse.ArgumentParser()
    analysis.add_analyze_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", "pca", "x.png", "--out", "y.png", "--threshold", "0.3"])
    assert args.run is analysis.analyze_pca and args.image == "x.png" and args.threshold == 0.3
    args = parser.parse_args(["analyze", "ablations", "--variants", "average", "token_concat", "--steps", "5"])
    assert args.run is analysis.analyze_ablations and args.variants == ["average", "token_concat"]
    args = parser.parse_args(["analyze", "alignment", "--vision-model", "clip", "--n", "8"])
    assert args.run is analysis.analyze_alignment and args.vision_model == ["clip"] and args.n == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["analyze", "ablations", "--variants", "concat"])


@pytest.mark.parametrize(("argv", "missing", "extra"), [
    (["analyze", "alignment", "--n", "4"], "matplotlib", "analysis"),
    (["analyze", "ablations", "--steps", "1"], "trl", "train"),
])
def test_commands_name_the_missing_extra(argv, missing, extra, monkeypatch, capsys):
    from florence_vl import cli

    monkeypatch.setitem(sys.modules, missing, None)  # as if the extra were not installed: import fails
    assert cli.main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert message == (f"florence-vl: error: this command needs the {extra!r} extra ({missing} is not installed): "
                       f"pip install 'florence-vl[{extra}]'")
