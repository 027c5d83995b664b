"""Reproduction runs: execute the train notebook with papermill for every run of a grid.

``python -m semiseg.reproduce GRID --profile {smoke,quick,paper} --seeds 0 1 2 [--splits 0]``

``python -m semiseg.reproduce camvid --splits 0 1 2 --jobs 2`` is the reproduction grid of issue #9:
CamVid 1/16 and 1/8 x {supervised, no_contr, full} on splits 0-2 with seed = split, plus the
fully supervised ceiling (ratio 1/1) with seeds 0-2: 21 runs. ``--jobs 2`` trains two runs side by
side with one thread each (the fastest use of 2 cores, ``python -m semiseg.bench --parts
throughput``); ``--results DIR`` writes the runs under DIR instead of ``book/results`` (a grid run
from a ``git worktree`` of one commit writes into the main checkout); ``--set key=value`` adds an
override to every run. Unfinished runs resume from their newest checkpoint. ``--code DIR``
trains with the notebook and package of another checkout (a ``git worktree`` of the grid's
commit), so every run of a grid comes from one commit while this checkout changes;
``--commit`` commits each finished run's small files (summary, metrics, config, status,
embeddings) to the git repository that holds its folder as soon as it lands.

Each run is ``notebooks/08_train.py`` executed with its parameters; the executed notebook
(``train.ipynb``, not committed) and the run's ``summary.json`` land in
``book/results/<dataset>/<ratio>/split<k>/<variant>/seed<k>/`` (the ``smoke`` profile writes
under ``runs/smoke/`` instead, so CI never touches committed results). Runs that already
finished are skipped; a failing run is reported with its notebook and cell, and the others
still run. Executed notebooks are written to a temp file and renamed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import time
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "08_train.py"

# Grid name -> list of (variant name, extra overrides[, ratio]). Variant names are those of
# semiseg.config.VARIANTS (or key=value), whose overrides load_config applies.
_LOSSES = ["sup", "sup+pseudo", "sup+ent", "sup+contr", "sup+pseudo+ent", "sup+pseudo+contr", "sup+ent+contr",
           "sup+pseudo+ent+contr"]
_COMPONENTS = ["base", "base+teacher", "base+attention", "base+fqf", "all"]
GRIDS = {
    "headline": [("supervised", ""), ("full", "")],
    "table5": [(v, "") for v in _LOSSES],
    "table6": [(f"lambda_contr={v}", "") for v in ("1e4", "1e2", "1e1", "1e0", "1e-1", "1e-2", "1e-4")],
    "table7": [(f"psi={v}", "") for v in (32, 64, 128, 256, 512)],
    "table8": [(v, "") for v in _COMPONENTS],
    "da": [("da_target_only", ""), ("da_full", "")],
    # issue #9: does the memory bank help? two label ratios, three variants, and the ceiling
    "camvid": [(v, "", r) for r in ("1/16", "1/8") for v in ("supervised", "no_contr", "full")]
    + [("supervised", "", "1/1")],
}
SEED_IS_SPLIT = {"camvid"}  # the paper averages three splits: seed k trains split k
PROFILES = {  # (--profile, grid) -> config profile
    "smoke": "smoke", "quick": "camvid_quick", "paper": "paper_cityscapes_dlv2",
}
DA_PROFILES = {"smoke": "smoke", "quick": "camvid_da_quick", "paper": "paper_gta5_cityscapes_dlv2"}


def plan(grid, profile, seeds, splits, results=None, extra="", ratios=None, variants=None):
    """The runs of a grid: dicts of notebook parameters, each with its output folder (absolute:
    the notebook runs in the ``--code`` checkout). ``ratios`` / ``variants`` keep only those runs."""
    from .config import load_config

    config = (DA_PROFILES if grid == "da" else PROFILES)[profile]
    runs = []
    pairs = [(k, k) for k in splits] if grid in SEED_IS_SPLIT else [(split, seed) for split in splits for seed in seeds]
    for split, seed in pairs:
        for variant, overrides, *ratio in GRIDS[grid]:
            if (variants and variant not in variants) or (ratios and ratio and ratio[0] not in ratios):
                continue
            settings = {"split": split, "seed": seed, "variant": variant, **({"ratio": ratio[0]} if ratio else {})}
            if profile == "smoke":
                settings.update({"dataset": "tiny", "ratio": "1/1" if ratio and ratio[0] == "1/1" else "1/4"})
            cfg = load_config(config, settings)
            overrides = " ".join(o for o in (overrides, extra) if o)
            if profile == "smoke":
                base = Path(os.environ.get("SEMISEG_SMOKE_RUNS", ROOT / "runs" / "smoke"))
            else:
                base = Path(results).resolve() if results else ROOT / "book" / "results"
            out = base / cfg.dataset / cfg.ratio.replace("/", "-") / f"split{split}" / variant / f"seed{seed}"
            runs.append({"profile": config, "dataset": cfg.dataset, "ratio": cfg.ratio, "split": split,
                         "variant": variant, "seed": seed, "overrides": overrides, "out_dir": str(out),
                         "smoke": profile == "smoke", "resume": True})
    return runs


def execute(params, kernel="python3", code=ROOT):
    """Run the train notebook of checkout ``code`` for one run; returns None, or a one-line failure
    naming notebook and cell."""
    import jupytext
    import papermill

    out = Path(params["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    source = out / ".train.source.ipynb"
    jupytext.write(jupytext.read(Path(code) / "notebooks" / "08_train.py"), source)
    final, tmp = out / "train.ipynb", out / ".train.tmp.ipynb"
    try:
        papermill.execute_notebook(str(source), str(tmp), parameters=params, kernel_name=kernel, cwd=str(code),
                                   progress_bar=False)
        return None
    except papermill.PapermillExecutionError as err:
        final = out / "train.failed.ipynb"
        return f"{final}: cell {err.exec_count} raised {err.ename}: {' '.join(str(err.evalue).split())[:200]}"
    finally:
        if tmp.exists():
            os.replace(tmp, final)
        source.unlink(missing_ok=True)


SMALL_FILES = ("summary.json", "metrics.jsonl", "config.yaml", "status.json", "embeddings.npz")


def commit_run(out, name, tries=20):
    """Commit a finished run's small files to the git repository holding ``out`` (only those paths:
    whatever else is staged there stays staged). Retries while another git process holds the index."""
    if not (out / "embeddings.npz").exists() and (out / "checkpoint.pt").exists():
        from .embeddings import export  # runs trained by older code did not write it

        try:
            export(out)
        except Exception as err:  # noqa: BLE001 -- the run is finished; commit what there is
            print(f"{name}: embeddings.npz not written ({type(err).__name__}: {err})", flush=True)
    files = [str(out / f) for f in SMALL_FILES if (out / f).exists()]
    for _ in range(tries):
        add = subprocess.run(["git", "add", "-f", *files], cwd=out, capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", f"Reproduction run {name.split('] ', 1)[-1]}: {out.name} of "
             f"{out.parent.name} ({out.parent.parent.parent.name}, {out.parent.parent.name})", "--", *files],
            cwd=out, capture_output=True, text=True).returncode == 0
        if done:
            print(f"{name}: committed {len(files)} files", flush=True)
            return True
        time.sleep(3)
    print(f"{name}: could not commit {out} (git busy?); commit it by hand", flush=True)
    return False


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m semiseg.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("grid", choices=sorted(GRIDS))
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--splits", nargs="+", type=int, default=[0])
    parser.add_argument("--ratios", nargs="+", default=None, help="only the runs at these ratios (e.g. 1/16 1/1)")
    parser.add_argument("--variants", nargs="+", default=None, help="only these variants of the grid")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side (threads = cores / jobs each)")
    parser.add_argument("--results", default=None, help="folder for the runs (default book/results)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose notebook and package train the runs")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run's small files")
    args = parser.parse_args(argv)
    code = Path(args.code).resolve()
    if code != ROOT:  # the kernel imports semiseg from that checkout
        os.environ["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    extra = list(args.set)
    if args.jobs > 1 and not any(o.startswith("threads=") for o in extra):
        extra.append(f"threads={max(1, (os.cpu_count() or 1) // args.jobs)}")
    runs = plan(args.grid, args.profile, args.seeds, args.splits, args.results, " ".join(extra), args.ratios,
                args.variants)
    if not runs:
        parser.error(f"no run of grid {args.grid} has ratio in {args.ratios} and variant in {args.variants}")
    failures, skipped, lock = [], 0, threading.Lock()
    todo = []
    for i, params in enumerate(runs, 1):
        name = f"[{i}/{len(runs)}] {params['ratio']} {params['variant']} seed{params['seed']} split{params['split']}"
        if (Path(params["out_dir"]) / "summary.json").exists():
            print(f"{name}: finished before, skipped")
            skipped += 1
        else:
            todo.append((name, params))

    def one(item):
        name, params = item
        print(f"{name}: running -> {params['out_dir']}", flush=True)
        failure = execute(params, code=code)
        with lock:
            if failure:
                print(f"{name}: FAILED {failure}", flush=True)
                failures.append(failure)
            else:
                print(f"{name}: finished", flush=True)
                if args.commit:
                    commit_run(Path(params["out_dir"]), name)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, todo))
    print(f"{len(runs) - skipped - len(failures)} ran, {skipped} skipped, {len(failures)} failed")
    for failure in failures:
        print(f"failed: {failure}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
