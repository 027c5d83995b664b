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


def trained_checkpoint(variant="full", smoke=False, short_iterations=400):
    """A checkpoint for the qualitative pages: the committed CamVid quick run's if it is on disk
    (checkpoints are not committed), else a short run trained here (said clearly), else — with
    ``smoke`` or without CamVid — the seconds-long smoke profile on TinyShapes."""
    from .config import load_config
    from .data import data_root
    from .train import train

    committed = BOOK / "results" / "camvid" / "1-8" / "split0" / variant / "seed0" / "checkpoint.pt"
    if committed.exists() and not smoke:
        return committed
    if smoke or not (data_root() / "camvid").is_dir():
        # FQF off: a few smoke iterations never reach phi, and the bank would stay empty
        cfg = load_config("smoke", {"fqf": False, "out_dir": str(BOOK.parent / "runs" / "book" / f"smoke_{variant}")})
    else:
        cfg = load_config("camvid_quick", {"iterations": short_iterations, "checkpoint_every": 0,
                                           "out_dir": str(BOOK.parent / "runs" / "book" / f"short_{variant}_{short_iterations}")})
    path = cfg.run_dir() / "checkpoint.pt"
    if not path.exists():
        print(f"no trained checkpoint found: training a short {cfg.profile} run ({cfg.iterations} iterations) into {cfg.run_dir()}")
        train(cfg, progress=False, overwrite=True)
    return path
