"""Reproduction runs: execute the train notebook with papermill for every run of a grid.

``python -m semiseg.reproduce GRID --profile {smoke,quick,paper} --seeds 0 1 2 [--splits 0]``

Each run is ``notebooks/08_train.py`` executed with its parameters; the executed notebook
(``train.ipynb``, not committed) and the run's ``summary.json`` land in
``book/results/<dataset>/<ratio>/split<k>/<variant>/seed<k>/`` (the ``smoke`` profile writes
under ``runs/smoke/`` instead, so CI never touches committed results). Runs that already
finished are skipped; a failing run is reported with its notebook and cell, and the others
still run. Executed notebooks are written to a temp file and renamed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "08_train.py"

# Grid name -> list of (variant name, overrides) — the paper's ablation tables.
_LOSSES = {"sup": "lambda_pseudo=0 lambda_ent=0 lambda_contr=0", "sup+pseudo": "lambda_ent=0 lambda_contr=0",
           "sup+ent": "lambda_pseudo=0 lambda_contr=0", "sup+contr": "lambda_pseudo=0 lambda_ent=0",
           "sup+pseudo+ent": "lambda_contr=0", "sup+pseudo+contr": "lambda_ent=0", "sup+ent+contr": "lambda_pseudo=0",
           "sup+pseudo+ent+contr": ""}
_COMPONENTS = {"base": "bank_from=student attention=false fqf=false", "base+teacher": "attention=false fqf=false",
               "base+attention": "bank_from=student fqf=false", "base+fqf": "bank_from=student attention=false",
               "all": ""}
GRIDS = {
    "headline": [("supervised", ""), ("full", "")],
    "table5": list(_LOSSES.items()),
    "table6": [(f"lambda_contr={v}", f"lambda_contr={v}") for v in ("1e4", "1e2", "1e1", "1e0", "1e-1", "1e-2", "1e-4")],
    "table7": [(f"psi={v}", f"psi={v}") for v in (32, 64, 128, 256, 512)],
    "table8": list(_COMPONENTS.items()),
    "da": [("da_target_only", ""), ("da_full", "")],
}
PROFILES = {  # (--profile, grid) -> config profile
    "smoke": "smoke", "quick": "camvid_quick", "paper": "paper_cityscapes_dlv2",
}
DA_PROFILES = {"smoke": "smoke", "quick": "camvid_da_quick", "paper": "paper_gta5_cityscapes_dlv2"}


def plan(grid, profile, seeds, splits):
    """The runs of a grid: dicts of notebook parameters, each with its output folder."""
    from .config import load_config

    config = (DA_PROFILES if grid == "da" else PROFILES)[profile]
    runs = []
    for split in splits:
        for seed in seeds:
            for variant, overrides in GRIDS[grid]:
                cfg = load_config(config, {"split": split, "seed": seed})
                ratio = cfg.ratio.replace("/", "-")
                base = Path(os.environ.get("SEMISEG_SMOKE_RUNS", ROOT / "runs" / "smoke")) if profile == "smoke" else ROOT / "book" / "results"
                out = base / cfg.dataset / ratio / f"split{split}" / variant / f"seed{seed}"
                runs.append({"profile": config, "dataset": cfg.dataset, "ratio": cfg.ratio, "split": split,
                             "variant": variant, "seed": seed, "overrides": overrides, "out_dir": str(out),
                             "smoke": profile == "smoke"})
    return runs


def execute(params, kernel="python3"):
    """Run the train notebook for one run; returns None, or a one-line failure naming notebook and cell."""
    import jupytext
    import papermill

    out = Path(params["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    source = out / ".train.source.ipynb"
    jupytext.write(jupytext.read(NOTEBOOK), source)
    final, tmp = out / "train.ipynb", out / ".train.tmp.ipynb"
    try:
        papermill.execute_notebook(str(source), str(tmp), parameters=params, kernel_name=kernel, cwd=str(ROOT),
                                   progress_bar=False)
        return None
    except papermill.PapermillExecutionError as err:
        final = out / "train.failed.ipynb"
        return f"{final}: cell {err.exec_count} raised {err.ename}: {' '.join(str(err.evalue).split())[:200]}"
    finally:
        if tmp.exists():
            os.replace(tmp, final)
        source.unlink(missing_ok=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m semiseg.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("grid", choices=sorted(GRIDS))
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--splits", nargs="+", type=int, default=[0])
    args = parser.parse_args(argv)
    runs = plan(args.grid, args.profile, args.seeds, args.splits)
    failures, skipped = [], 0
    for i, params in enumerate(runs, 1):
        name = f"[{i}/{len(runs)}] {params['variant']} seed{params['seed']} split{params['split']}"
        if (Path(params["out_dir"]) / "summary.json").exists():
            print(f"{name}: finished before, skipped")
            skipped += 1
            continue
        print(f"{name}: running -> {params['out_dir']}", flush=True)
        failure = execute(params)
        if failure:
            print(f"{name}: FAILED {failure}", flush=True)
            failures.append(failure)
    print(f"{len(runs) - skipped - len(failures)} ran, {skipped} skipped, {len(failures)} failed")
    for failure in failures:
        print(f"failed: {failure}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
