"""Results tables for the book: our committed run summaries beside the paper's tables.

``collect(root)`` reads every ``<dataset>/<ratio>/split<k>/<variant>/seed<k>/summary.json`` under
``book/results``; ``aggregate`` gives mean ± std over seeds (and splits) per variant;
``paper_table(n)`` reads the paper's Table n from ``book/paper_tables.csv`` (transcribed once).
Nothing here is typed by hand: every number comes from one of those files.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

BOOK = Path(__file__).resolve().parents[1] / "book"
# Runs trained by code older than the reproduction protocol of issue #9 (scored on val only, the
# domain-adaptation demo transductively): kept for the record, never mixed into current tables.
EARLIER = BOOK / "results" / "earlier"


def collect(root=BOOK / "results"):
    """One dict per finished run (its summary.json plus where it was found)."""
    rows = []
    for path in sorted(Path(root).glob("*/*/split*/*/seed*/summary.json")):
        summary = json.loads(path.read_text())
        dataset, ratio, split, variant, seed = path.parts[-6:-1]
        rows.append({**summary, "dataset": dataset, "ratio": ratio.replace("-", "/"), "split": int(split[5:]),
                     "variant": variant, "seed": int(seed[4:]), "path": str(path)})
    return rows


def aggregate(rows):
    """Mean and (sample) std of mIoU over runs, per (dataset, ratio, profile, variant)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["ratio"], r["profile"], r["variant"]), []).append(r["miou"])
    out = []
    for (dataset, ratio, profile, variant), values in sorted(groups.items()):
        values = np.asarray(values, dtype=float)
        out.append({"dataset": dataset, "ratio": ratio, "profile": profile, "variant": variant, "runs": len(values),
                    "miou_mean": float(values.mean()), "miou_std": float(values.std(ddof=1)) if len(values) > 1 else None})
    return out


def paper_table(number, path=BOOK / "paper_tables.csv"):
    """Rows of the paper's Table ``number`` (strings, miou as float)."""
    with open(path, newline="") as f:
        return [{**row, "miou": float(row["miou"])} for row in csv.DictReader(f) if row["table"] == str(number)]


HEADLINE_RUN = BOOK / "results" / "camvid" / "1-8" / "split0" / "full" / "seed0"


def embeddings_path(run_dir=None, smoke=False):
    """``embeddings.npz`` of a run for the qualitative pages: the run's committed file if there is
    one, else written from its ``checkpoint.pt``; with ``smoke``, or when the run has neither,
    the seconds-long smoke profile on TinyShapes is trained (said clearly). Nothing else trains."""
    from .config import load_config
    from .embeddings import export
    from .train import train

    if run_dir or not smoke:  # a run named by the caller is shown in smoke mode too
        chosen = Path(run_dir) if run_dir else HEADLINE_RUN
        if (chosen / "embeddings.npz").exists():
            return chosen / "embeddings.npz"
        if (chosen / "checkpoint.pt").exists():
            return export(chosen)
        if run_dir:
            raise FileNotFoundError(f"run_dir {chosen} holds neither embeddings.npz nor checkpoint.pt")
        print(f"{chosen} holds neither embeddings.npz nor checkpoint.pt: using a smoke run instead")
    # FQF off: a few smoke iterations never reach phi, and the bank would stay empty
    cfg = load_config("smoke", {"fqf": False, "out_dir": str(BOOK.parent / "runs" / "book" / "smoke_full")})
    path = cfg.run_dir() / "embeddings.npz"
    if not path.exists():
        print(f"training the seconds-long smoke run into {cfg.run_dir()} (TinyShapes: the pictures mean nothing)")
        train(cfg, progress=False, overwrite=True)
    return path


# ----------------------------------------------------------------------------- the reproduction grid (issue #9)
GRID_VARIANTS = ("supervised", "no_contr", "full")


def grid_runs(runs, dataset="camvid", profile="quick"):
    """Runs of the reproduction grid: its variants (``GRID_VARIANTS``; the domain-adaptation demo
    shares the profile and is left out) whose summary holds student and teacher scores (written
    since the grid's protocol; older summaries scored val only and are left out)."""
    return [r for r in runs if r["dataset"] == dataset and r["profile"] == profile and "scores" in r
            and r["variant"] in GRID_VARIANTS]


def score(run, model="student", split="test"):
    return run["scores"][model][split]["miou"]


def cells(runs, model="student", split="test"):
    """``{(ratio, variant): {split index: mIoU}}`` of the grid runs."""
    out = {}
    for r in runs:
        out.setdefault((r["ratio"], r["variant"]), {})[r["split"]] = score(r, model, split)
    return out


def t_interval(values, level=0.95):
    """Mean and the two-sided Student-t interval of the mean (``n - 1`` degrees of freedom);
    ``None`` bounds with fewer than two values."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def paired(runs, ratio, a, b, model="student", split="test"):
    """Per-split differences ``a - b`` at ``ratio`` over the splits both variants finished, with
    their mean and 95 % t interval, and whether that interval includes 0."""
    table = cells(runs, model, split)
    left, right = table.get((ratio, a), {}), table.get((ratio, b), {})
    diffs = {k: left[k] - right[k] for k in sorted(set(left) & set(right))}
    mean, lo, hi = t_interval(list(diffs.values())) if diffs else (None, None, None)
    return {"ratio": ratio, "a": a, "b": b, "diffs": diffs, "n": len(diffs), "mean": mean, "lo": lo, "hi": hi,
            "includes_zero": None if lo is None else lo <= 0 <= hi}


def labeled_count(dataset, ratio, split, root=None):
    """Number of labeled training images of a grid run (from the committed split lists)."""
    from .data.splits import split_dir

    if ratio == "1/1":
        d = split_dir(dataset, "1/8", 0)
        return sum(len((d / f).read_text().split()) for f in ("labeled.txt", "unlabeled.txt"))
    return len((split_dir(dataset, ratio, split) / "labeled.txt").read_text().split())


def ceiling(runs, model="student", split="test"):
    """Mean mIoU of the fully supervised runs (ratio 1/1): the 100 % of the relative numbers."""
    values = list(cells(runs, model, split).get(("1/1", "supervised"), {}).values())
    return float(np.mean(values)) if values else None


def fmt_interval(p):
    if p["mean"] is None:
        return "no finished pair"
    if p["lo"] is None:
        return f"{p['mean']:+.2f} (one split)"
    return f"{p['mean']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}]"


def fmt_pair(p):
    """A table cell of a paired difference: :func:`fmt_interval` and the number of splits."""
    return fmt_interval(p) + (f", {p['n']} splits" if p["n"] > 1 else "")


def conclusions(runs, model="student", split="test", ratios=("1/16", "1/8")):
    """Sentences generated from the grid's numbers: they stay true when the numbers change."""
    sentences = []
    for ratio in ratios:
        for a, b, what in (("full", "supervised", "the full method over supervised-only"),
                           ("full", "no_contr", "the memory bank's loss (full over no_contr)")):
            p = paired(runs, ratio, a, b, model, split)
            if not p["n"]:
                sentences.append(f"At {ratio} no split has finished both {a} and {b} yet.")
                continue
            text = f"At {ratio}, {what} adds {p['mean']:+.2f} mIoU on {split}"
            if p["lo"] is None:
                text += " from a single split, so there is no interval yet."
            else:
                verdict = ("the interval includes 0: no effect is shown" if p["includes_zero"]
                           else "the interval excludes 0")
                text += (f" (mean of {p['n']} splits, 95 % t interval [{p['lo']:+.2f}, {p['hi']:+.2f}]); "
                         f"{verdict}.")
            sentences.append(text)
    top = ceiling(runs, model, split)
    if top is not None:
        table = cells(runs, model, split)
        for ratio in ratios:
            for variant in GRID_VARIANTS:
                values = list(table.get((ratio, variant), {}).values())
                if values:
                    sentences.append(f"{variant} at {ratio} reaches {100 * np.mean(values) / top:.1f} % of the "
                                     f"fully supervised ceiling ({top:.2f} mIoU, {len(values)} split(s)).")
    return sentences


def unlabeled_signals(run, beta_level=0.05):
    """What the unlabeled terms had to work with in one run, read from its ``metrics.jsonl``
    (issue #9, "what limits the gain"): where the warm-up ended (``warmup_end`` in newer
    summaries, else the fixed ``warmup_frac`` of its config), the first logged iteration at which
    the teacher's mean pixel weight beta reached ``beta_level`` (the warm-up gate's default,
    :meth:`semiseg.train.Trainer.end_warmup`), the first at which the memory bank held more than
    one class, and at the end: pseudo-label accuracy, mean beta, and the classes in the bank.
    None where the log never reached it."""
    import yaml

    folder = Path(run["path"]).parent
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r]
    cfg = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else {}
    fixed = round(cfg.get("warmup_frac", 0) * cfg.get("iterations", run.get("iterations", 0)))
    end = run.get("warmup_end", fixed)

    def first(pred):
        return next((r["iteration"] for r in steps if pred(r)), None)

    last = steps[-1] if steps else {}
    fill = last.get("bank_fill_per_class", [])
    return {"warmup_end": end,
            "beta_reached": first(lambda r: r.get("pseudo_beta", 0) >= beta_level),
            "bank_two_classes": first(lambda r: sum(f > 0 for f in r.get("bank_fill_per_class", [])) > 1),
            "pseudo_acc_end": last.get("pseudo_acc"), "beta_end": last.get("pseudo_beta"),
            "bank_classes_end": sum(f > 0 for f in fill), "classes": len(fill)}


def readme_tables(runs, model="student", split="test", ratios=("1/16", "1/8")):
    """The README's headline tables, in Markdown: per split the student's test mIoU with val in
    brackets, the mean ± std over splits (% of the ceiling beside it), the ceiling's seeds, and the
    paired differences with their 95 % t intervals. ``python -m semiseg.results`` prints them."""
    def fmt(run):
        return f"{score(run, model, split):.2f} ({score(run, model, 'val'):.2f})" if run else "not yet"

    by = {(r["ratio"], r["variant"], r["split"]): r for r in runs}
    top = ceiling(runs, model, split)
    lines = ["| ratio | split | " + " | ".join(GRID_VARIANTS) + " |", "|---|---|---|---|---|"]
    for ratio in ratios:
        splits = sorted({r["split"] for r in runs if r["ratio"] == ratio})
        for k in splits:
            lines.append(f"| {ratio} | {k} | " + " | ".join(fmt(by.get((ratio, v, k))) for v in GRID_VARIANTS) + " |")
        means = []
        for v in GRID_VARIANTS:
            values = [score(by[ratio, v, k], model, split) for k in splits if (ratio, v, k) in by]
            if not values:
                means.append("–")
                continue
            cell = f"**{np.mean(values):.2f}**" + (f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")
            cell += f" ({100 * np.mean(values) / top:.0f} %)" if top else ""
            means.append(cell + ("" if len(values) == len(splits) else f", {len(values)} splits"))
        lines.append(f"| {ratio} | mean ± std | " + " | ".join(means) + " |")
    full = sorted((r for r in runs if r["ratio"] == "1/1" and r["variant"] == "supervised"), key=lambda r: r["seed"])
    if full:
        lines.append(f"| 1/1 (ceiling) | seeds {', '.join(str(r['seed']) for r in full)} | "
                     + ", ".join(fmt(r) for r in full) + f"; mean **{top:.2f}** | | |")
    pairs = (("full", "supervised"), ("full", "no_contr"), ("no_contr", "supervised"))
    lines += ["", "| ratio | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |", "|---|---|---|---|"]
    for ratio in ratios:
        lines.append(f"| {ratio} | " + " | ".join(
            fmt_pair(p) for p in (paired(runs, ratio, a, b, model, split) for a, b in pairs))
            + " |")
    return "\n".join(lines)


# The warm-up gate checked after the grid (README "What limits the gain"): `full` with
# warmup_beta = 0.05 on the grid's cells, one folder per run named <ratio>_split<k>_full_seed<k>.
GATE_CHECK = BOOK / "results" / "checks" / "warmup_gate_1500"


def check_runs(root=GATE_CHECK, variant="full_gate"):
    """Finished runs of a check folder, as :func:`collect` rows whose variant is ``variant`` (the
    ratio, split and seed come from each summary), so :func:`paired` sets them against the grid."""
    rows = []
    for path in sorted(Path(root).glob("*/summary.json")):
        summary = json.loads(path.read_text())
        rows.append({**summary, "variant": variant, "path": str(path)})
    return rows


def gate_table(runs, gate, model="student", split="test", ratios=("1/16", "1/8")):
    """Markdown: per split the gated ``full`` run beside the grid's ``full`` and ``supervised``
    (test, val in brackets), then the paired differences with their 95 % t intervals."""
    both = runs + gate
    by = {(r["ratio"], r["variant"], r["split"]): r for r in both}
    cols = ("full_gate", "full", "supervised")
    lines = ["| ratio | split | full, gated warm-up | full (grid) | supervised (grid) | commit of the gated run |",
             "|---|---|---|---|---|---|"]
    for ratio in ratios:
        for k in sorted({r["split"] for r in gate if r["ratio"] == ratio}):
            cells_ = [f"{score(by[ratio, v, k], model, split):.2f} ({score(by[ratio, v, k], model, 'val'):.2f})"
                      if (ratio, v, k) in by else "–" for v in cols]
            lines.append(f"| {ratio} | {k} | " + " | ".join(cells_) + f" | {by[ratio, 'full_gate', k].get('commit', '?')} |")
    pairs = (("full_gate", "full"), ("full_gate", "supervised"))
    lines += ["", "| ratio | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |", "|---|---|---|"]
    for ratio in ratios:
        if any(r["ratio"] == ratio for r in gate):
            lines.append(f"| {ratio} | " + " | ".join(
                fmt_pair(p)
                for p in (paired(both, ratio, a, b, model, split) for a, b in pairs)) + " |")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m semiseg.results",
                                     description="The README's reproduction tables, from the committed summaries.")
    parser.add_argument("--results", default=str(BOOK / "results"), help="folder of the committed runs")
    parser.add_argument("--gate", default=str(GATE_CHECK), help="folder of the warm-up gate check's runs")
    args = parser.parse_args(argv)
    runs = grid_runs(collect(args.results))
    print(readme_tables(runs))
    gate = check_runs(args.gate)
    if gate:
        print("\nThe warm-up gate check (`full` with `warmup_beta` = 0.05, after the grid):\n")
        print(gate_table(runs, gate))


if __name__ == "__main__":
    main()
