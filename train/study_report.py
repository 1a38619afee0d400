"""The study's claims, tested on whatever runs have finished: `results.json`, `results.md` and figures.

The tests and the verdict rule were fixed in docs/study.md before any comparison ran:
- paired t-test over training seeds (two-sided, df = seeds - 1) on the per-seed values;
- for accuracies also an exact McNemar test on the held-out examples pooled over seeds (pairs: same seed, same
  example, two variants);
- "reproduced" when the difference goes the paper's way and every test available gives p < 0.05, "contradicted"
  when it goes the other way with p < 0.05, else "not separable"; fewer than 3 finished seeds: "pending".
"""

import json
import math
import statistics
from pathlib import Path

from .shapes import ALL_QUESTION_TYPES

# Question types whose answer needs what one prompt carries (docs/study.md).
NEEDS = {"ocr": ("word", "first_letter"), "grounding": ("higher", "bigger", "count"), "caption": ("describe",)}
MIN_SEEDS = 3


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (continued fraction, Numerical Recipes' betacf)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + numerator / c
            c = c if abs(c) > 1e-300 else 1e-300
            result *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    return front * result / a


def paired_t(a: list[float], b: list[float]) -> dict:
    """Two-sided paired t-test of a - b: mean difference, t, p (p = 1 when every difference is 0)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_t needs two equally long lists of >= 2 values, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    df = len(diffs) - 1
    if sd == 0:
        return {"diff": mean, "t": math.inf if mean else 0.0, "p": 0.0 if mean else 1.0, "df": df}
    t = mean / (sd / math.sqrt(len(diffs)))
    return {"diff": mean, "t": t, "p": _betainc(df / 2, 0.5, df / (df + t * t)), "df": df}


def mcnemar(a: list[int], b: list[int]) -> dict:
    """Exact two-sided McNemar test on paired 0/1 outcomes: (a right, b wrong) vs (a wrong, b right)."""
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n if n else 1.0
    return {"only_first": only_a, "only_second": only_b, "p": min(1.0, 2 * tail)}


def verdict(direction_ok: bool, ps: list[float], seeds: int) -> str:
    if seeds < MIN_SEEDS:
        return "pending"
    if all(p < 0.05 for p in ps):
        return "reproduced" if direction_ok else "contradicted"
    return "not separable"


def _load(folder: Path) -> dict | None:
    if (folder / "DONE").is_file() and (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text())
    return None


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _group_hits(run: dict, types: tuple[str, ...]) -> list[int]:
    """The run's per-example hits restricted to `types` (held-out example i has type ALL_QUESTION_TYPES[i % 9])."""
    return [hit for i, hit in enumerate(run["hits"]) if ALL_QUESTION_TYPES[i % len(ALL_QUESTION_TYPES)] in types]


def compare_accuracy(runs: dict, first: str, second: str, types: tuple[str, ...], expect_first_higher: bool) -> dict:
    """`first` vs `second` on the mean accuracy over question `types`, paired by seed and by example."""
    seeds = sorted(set(runs.get(first, {})) & set(runs.get(second, {})))
    out = {"first": first, "second": second, "types": list(types), "seeds": seeds}
    if not seeds:
        return out | {"verdict": "pending"}
    a = [statistics.fmean(_group_hits(runs[first][s], types)) for s in seeds]
    b = [statistics.fmean(_group_hits(runs[second][s], types)) for s in seeds]
    out |= {"first_score": _mean_sd(a), "second_score": _mean_sd(b)}
    ps = []
    if len(seeds) >= 2:
        out["t_test"] = paired_t(a, b)
        ps.append(out["t_test"]["p"])
    hits_a = [h for s in seeds for h in _group_hits(runs[first][s], types)]
    hits_b = [h for s in seeds for h in _group_hits(runs[second][s], types)]
    out["mcnemar"] = mcnemar(hits_a, hits_b)
    ps.append(out["mcnemar"]["p"])
    diff = statistics.fmean(a) - statistics.fmean(b)
    out["verdict"] = verdict((diff > 0) == expect_first_higher and diff != 0, ps, len(seeds))
    return out


def compare_loss(runs: dict, first: str, second: str, key: str) -> dict:
    """Alignment loss of feature set `first` vs `second` (the paper: `first`, all four, is lower), paired by seed."""
    seeds = sorted(runs)
    out = {"first": first, "second": second, "seeds": seeds, "measure": key}
    if not seeds:
        return out | {"verdict": "pending"}
    a = [runs[s][key][first] for s in seeds]
    b = [runs[s][key][second] for s in seeds]
    out |= {"first_loss": _mean_sd(a), "second_loss": _mean_sd(b)}
    if len(seeds) < 2:
        return out | {"verdict": "pending"}
    out["t_test"] = paired_t(a, b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    return out | {"verdict": verdict(diff < 0, [out["t_test"]["p"]], len(seeds))}


def collect(out: Path, schedule: dict) -> dict:
    """Every finished run's metrics, and the claims tested on them."""
    from .study import SOURCES

    results = {"florence2": _load(out / "florence2"), "llm": _load(out / "llm"), "fvl": {}, "alignment": {},
               "pca": {}, "pending": []}
    for part in ("florence2", "llm"):
        if results[part] is None:
            results["pending"].append(part)
        else:
            results[part].pop("loss", None)
    runs: dict[str, dict[int, dict]] = {}
    for variant in schedule["variants"]:
        for seed in schedule["seeds"]:
            run = _load(out / "fvl" / variant / f"seed-{seed}")
            if run is None:
                results["pending"].append(f"fvl/{variant}/seed-{seed}")
                continue
            runs.setdefault(variant, {})[seed] = run
            results["fvl"].setdefault(variant, {})[str(seed)] = {"scores": run["scores"],
                                                                 "wall_seconds": run.get("wall_seconds")}
    for variant, by_seed in runs.items():
        per_type = {t: _mean_sd([r["scores"][t] for r in by_seed.values()]) for t in (*ALL_QUESTION_TYPES, "overall")}
        results["fvl"][variant]["summary"] = per_type
    for kind in ("parts", "trained"):
        align = {}
        for seed in schedule["seeds"]:
            run = _load(out / "alignment" / kind / f"seed-{seed}")
            if run is None:
                results["pending"].append(f"alignment/{kind}/seed-{seed}")
            else:
                align[seed] = run
        results["alignment"][kind] = {"runs": {str(s): {k: r[k] for k in ("final_loss", "heldout_loss")}
                                               for s, r in align.items()}, "claims": []}
        everything = "+".join(SOURCES)
        others = [s for s in SOURCES] + ["+".join(x for x in SOURCES if x != s) for s in SOURCES] + ["image+noise3"]
        for key in ("final_loss", "heldout_loss"):
            for other in others:
                results["alignment"][kind]["claims"].append(compare_loss(align, everything, other, key))
    for kind in ("parts", "trained"):
        run = _load(out / "pca" / kind)
        results["pca"][kind] = run if run is not None else "pending"
    claims_b = [compare_accuracy(runs, "channel_concat", f"no_{prompt}", types, True)
                for prompt, types in NEEDS.items()]
    # the control: removing a prompt should hurt its own question types more than the others
    claims_c = [compare_accuracy(runs, "channel_concat", other, tuple(ALL_QUESTION_TYPES), True)
                for other in ("token_concat", "average")]
    results["claims"] = {"b_drop_prompt": claims_b, "c_fusion": claims_c}
    return results


def _fmt(stat: dict | None) -> str:
    return "–" if not stat else f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def _p(test: dict | None) -> str:
    return "–" if not test else f"{test['p']:.3g}"


def markdown(results: dict) -> str:
    lines = ["# Study results (generated by `python -m florence_vl.train.study --report docs/study`)", ""]
    f2, llm = results["florence2"], results["llm"]
    if f2:
        lines += [f"Tiny Florence-2: {json.dumps(f2['scores'])}, {f2.get('train_seconds')} s of training.", ""]
    if llm:
        lines += [f"Tiny LLM: held-out loss {llm['eval_loss']}, follow-up accuracy {llm['follow_up_accuracy']}.", ""]
    if results["fvl"]:
        header = ["variant", "seeds", *ALL_QUESTION_TYPES, "overall"]
        lines += ["## Florence-VL variants (held-out exact match, mean ± sd over seeds)", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for variant, entry in results["fvl"].items():
            summary = entry.get("summary", {})
            seeds = len([k for k in entry if k != "summary"])
            lines.append(f"| {variant} | {seeds} | " + " | ".join(_fmt(summary.get(t)) for t in header[2:]) + " |")
        lines.append("")
    lines += ["## (b) dropping a prompt, (c) fusion", "", "| comparison | question types | first | second | "
              "t-test p | McNemar p | verdict |", "|---|---|---|---|---|---|---|"]
    for claim in results["claims"]["b_drop_prompt"] + results["claims"]["c_fusion"]:
        types = "all" if len(claim["types"]) == len(ALL_QUESTION_TYPES) else ", ".join(claim["types"])
        lines.append(f"| {claim['first']} vs {claim['second']} | {types} | {_fmt(claim.get('first_score'))} | "
                     f"{_fmt(claim.get('second_score'))} | {_p(claim.get('t_test'))} | {_p(claim.get('mcnemar'))} | "
                     f"{claim['verdict']} |")
    for kind, entry in results["alignment"].items():
        lines += ["", f"## (a) alignment loss, model {kind}", "", "| all four vs | measure | all four | other | "
                  "t-test p | verdict |", "|---|---|---|---|---|---|"]
        for claim in entry["claims"]:
            lines.append(f"| {claim['second']} | {claim['measure']} | {_fmt(claim.get('first_loss'))} | "
                         f"{_fmt(claim.get('second_loss'))} | {_p(claim.get('t_test'))} | {claim['verdict']} |")
    for kind, entry in results["pca"].items():
        if isinstance(entry, dict):
            lines += ["", f"## (d) where each prompt's features differ from V (1 - cos), model {kind}", ""]
            for source, value in entry["differences"].items():
                lines.append(f"- {source}: shape rows {value['shape_rows']}, word row {value['word_row']}")
    if results["pending"]:
        lines += ["", "Pending runs: " + ", ".join(results["pending"])]
    return "\n".join(lines) + "\n"


def plot(results: dict, folder: Path) -> list[Path]:
    from matplotlib.figure import Figure

    paths = []
    if results["fvl"]:
        variants = list(results["fvl"])
        types = [*ALL_QUESTION_TYPES, "overall"]
        figure = Figure(figsize=(11, 4), dpi=110)
        axes = figure.add_subplot()
        width = 0.8 / len(variants)
        for index, variant in enumerate(variants):
            summary = results["fvl"][variant].get("summary", {})
            means = [summary.get(t, {}).get("mean", 0) for t in types]
            sds = [summary.get(t, {}).get("sd", 0) for t in types]
            axes.bar([i + index * width for i in range(len(types))], means, width, yerr=sds, label=variant, capsize=2)
        axes.set_xticks([i + 0.4 - width / 2 for i in range(len(types))], types, rotation=30, fontsize=8)
        axes.set_ylabel("held-out exact match")
        axes.legend(fontsize=7, ncol=3)
        figure.tight_layout()
        paths.append(folder / "variants.png")
        figure.savefig(paths[-1])
    for kind, entry in results["alignment"].items():
        runs = entry["runs"]
        if not runs:
            continue
        names = list(next(iter(runs.values()))["final_loss"])
        means = [statistics.fmean(r["final_loss"][n] for r in runs.values()) for n in names]
        sds = [statistics.stdev([r["final_loss"][n] for r in runs.values()]) if len(runs) > 1 else 0 for n in names]
        figure = Figure(figsize=(10, 4), dpi=110)
        axes = figure.add_subplot()
        axes.bar(range(len(names)), means, yerr=sds, capsize=2)
        axes.set_xticks(range(len(names)), [n.replace("grounding", "grd").replace("caption", "cap") for n in names],
                        rotation=60, fontsize=7)
        axes.set_ylabel("alignment loss after fit (lower = better)")
        axes.set_ylim(min(means) * 0.9, max(means) * 1.05)
        axes.set_title(f"Alignment loss per feature set ({kind} model, {len(runs)} seeds)")
        figure.tight_layout()
        paths.append(folder / f"alignment_{kind}.png")
        figure.savefig(paths[-1])
    return paths


def write_report(out: Path, schedule: dict, folder: Path) -> dict:
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    results = collect(out, schedule)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (folder / "results.md").write_text(markdown(results))
    plot(results, folder)
    for kind, entry in results["pca"].items():
        if isinstance(entry, dict):
            for index, path in enumerate(entry["figures"][:1]):
                shutil.copy(path, folder / f"pca_{kind}.png")
    return results
