"""``make train``: train several variants of one profile and print their mIoU side by side.

``python -m semiseg.compare PROFILE --variants supervised full --seeds 0`` writes each run to
``book/results/<dataset>/<ratio>/split<k>/<variant>/seed<k>/`` (summaries are committed, the
checkpoint is not). A run whose ``summary.json`` exists is reused, not retrained. Without the
dataset on disk it falls back, loudly, to the built-in TinyShapes data so the command still
runs end to end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import load_config, one_line_errors
from .data import data_root
from .train import train

RESULTS = Path("book/results")

# Variant name -> overrides. "full" is the paper's method (eq. 1 with all four terms).
VARIANTS = {
    "full": {},
    "supervised": {"lambda_pseudo": 0.0, "lambda_ent": 0.0, "lambda_contr": 0.0},
    "no_contr": {"lambda_contr": 0.0},
    # §4.3.2 demo (profile camvid_da_quick): with the labeled source domain, and without it
    "da_full": {},
    "da_target_only": {"source_dataset": None, "source_sequences": None},
    # issue #4: the same comparison under bf16 autocast + channels_last
    "full_bf16": {"precision": "bf16", "channels_last": True},
    "supervised_bf16": {"lambda_pseudo": 0.0, "lambda_ent": 0.0, "lambda_contr": 0.0, "precision": "bf16",
                        "channels_last": True},
}


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


def run_all(args):
    base = load_config(args.profile, args.overrides)
    overrides = list(args.overrides)
    if base.dataset != "tiny" and not (data_root() / base.dataset).is_dir():
        print(f"*** {data_root() / base.dataset} not found (set SEMISEG_DATA or run data/download_camvid.sh).\n"
              f"*** Falling back to the built-in TinyShapes dataset with the smoke profile: "
              f"these numbers say nothing about the paper. ***")
        args.profile, overrides = "smoke", []
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            cfg = load_config(args.profile, {**VARIANTS[variant], **dict(o.split("=", 1) for o in overrides),
                                             "variant": variant, "seed": seed})
            if cfg.out_dir is None:
                cfg.out_dir = str(run_dir(cfg) if cfg.dataset != "tiny" else Path("runs") / run_dir(cfg).relative_to(RESULTS))
            summary_path = Path(cfg.out_dir) / "summary.json"
            if summary_path.exists() and not args.overwrite:
                print(f"{variant} seed{seed}: finished run found in {cfg.out_dir}, reusing it")
                summary = json.loads(summary_path.read_text())
            else:
                summary = train(cfg, overwrite=args.overwrite)
            rows.append(summary | {"out_dir": cfg.out_dir})
    print(f"\n{base.dataset} {base.ratio} split{base.split}, profile {rows[0]['profile']}, evaluated on val:")
    print(f"{'variant':<12}{'seed':>5}{'mIoU':>8}{'iters':>8}{'minutes':>9}")
    for r in rows:
        print(f"{r['variant']:<12}{r['seed']:>5}{r['miou']:>8.2f}{r['iterations']:>8}{r['seconds'] / 60:>9.1f}")
    first = [r for r in rows if r["seed"] == args.seeds[0]]
    for r in first[1:]:
        label = "the full method over supervised-only" if (first[0]["variant"], r["variant"]) == ("supervised", "full") \
            else f"{r['variant']} over {first[0]['variant']}"
        print(f"gain of {label}: {r['miou'] - first[0]['miou']:+.2f} mIoU")


if __name__ == "__main__":
    main()
