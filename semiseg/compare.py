"""``make train``: train several variants of one profile and print their mIoU side by side.

``python -m semiseg.compare PROFILE --variants supervised full --seeds 0`` writes each run to
``book/results/<dataset>/<ratio>/split<k>/<variant>/seed<k>/`` (summaries are committed, the
checkpoint is not); with ``out_dir=DIR`` to ``DIR/<variant>/seed<k>/``. A run whose
``summary.json`` exists is reused, not retrained. Without the dataset on disk it falls back,
loudly, to the built-in TinyShapes data so the command still runs end to end. Variants are the
named override sets of :data:`semiseg.config.VARIANTS`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import VARIANTS, load_config, one_line_errors
from .data import build_dataset
from .train import train

RESULTS = Path("book/results")


def run_dir(cfg):
    return RESULTS / cfg.dataset / cfg.ratio.replace("/", "-") / f"split{cfg.split}" / cfg.variant / f"seed{cfg.seed}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m semiseg.compare", description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--variants", nargs="+", default=["supervised", "full"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    with one_line_errors():
        run_all(args)


def dataset_present(cfg):
    """Whether the training set of ``cfg`` (its ``dataset`` under its ``data_root``) can be listed."""
    try:
        build_dataset(cfg.dataset, "train", cfg.data_root)
    except FileNotFoundError:
        return False
    return True


def read_summary(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable run summary ({err})") from None


def run_all(args):
    if len(set(args.variants)) < len(args.variants):
        raise ValueError(f"--variants names a variant twice: {' '.join(args.variants)}")
    overrides = dict(o.split("=", 1) for o in args.overrides)
    base = load_config(args.profile, overrides)
    profile = args.profile
    if not dataset_present(base):
        print(f"*** {base.dataset} not found under {base.data_root or 'SEMISEG_DATA'} (set SEMISEG_DATA or run "
              f"data/download_camvid.sh).\n*** Falling back to the built-in TinyShapes dataset with the smoke "
              f"profile: these numbers say nothing about the paper. ***")
        profile = "smoke"
        overrides = {k: v for k, v in overrides.items() if k == "out_dir"}
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            settings = {**overrides, "variant": variant, "seed": seed}
            cfg = load_config(profile, {k: v for k, v in settings.items() if k != "out_dir"})
            if "out_dir" in overrides:  # one sub-folder per variant and seed: runs never share a folder
                cfg.out_dir = str(Path(overrides["out_dir"]) / variant / f"seed{seed}")
            else:
                cfg.out_dir = str(run_dir(cfg) if cfg.dataset != "tiny" else Path("runs") / run_dir(cfg).relative_to(RESULTS))
            summary_path = Path(cfg.out_dir) / "summary.json"
            if summary_path.exists() and not args.overwrite:
                print(f"{variant} seed{seed}: finished run found in {cfg.out_dir}, reusing it")
                summary = read_summary(summary_path)
            else:
                summary = train(cfg, overwrite=args.overwrite)
            rows.append(summary | {"out_dir": cfg.out_dir})
    print(table(rows, base))


def table(rows, base):
    """The side-by-side table and each variant's gain over the first, for the first seed."""
    scored = rows[0].get("scored_on", "val")
    lines = [f"\n{rows[0]['dataset']} {rows[0]['ratio']} split{base.split}, profile {rows[0]['profile']}, "
             f"student scored on {scored} (val beside it):",
             f"{'variant':<14}{'seed':>5}{scored:>8}{'val':>8}{'iters':>8}{'minutes':>9}"]
    for r in rows:
        val = r.get("val_miou", r["miou"] if scored == "val" else float("nan"))
        lines.append(f"{r['variant']:<14}{r['seed']:>5}{r['miou']:>8.2f}{val:>8.2f}{r['iterations']:>8}"
                     f"{r['seconds'] / 60:>9.1f}")
    first = [r for r in rows if r["seed"] == rows[0]["seed"]]
    for r in first[1:]:
        label = "the full method over supervised-only" if (first[0]["variant"], r["variant"]) == ("supervised", "full") \
            else f"{r['variant']} over {first[0]['variant']}"
        lines.append(f"gain of {label} on {scored}: {r['miou'] - first[0]['miou']:+.2f} mIoU")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
