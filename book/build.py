"""Build the book offline: copy the notebooks (tagged with a hash of semiseg/ so that a package
change re-executes them), put a local MathJax under _static/, execute the notebooks missing from
Jupyter Book's execution cache two at a time, run `jupyter-book build`."""

import hashlib
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
MATHJAX = BOOK / "_build" / ".mathjax" / "node_modules" / "mathjax" / "es5"
CACHE = BOOK / "_build" / ".jupyter_cache"  # Jupyter Book 1.x's execution cache
NOT_EXECUTED = ("08_train",)  # _config.yml's execute.exclude_patterns
# notebooks that may train the same fallback smoke run (semiseg.results.embeddings_path): one
# worker runs them one after the other
TOGETHER = (("09_results", "10_embeddings"),)
# the slowest pages first when no earlier execution time is cached (measured on a fresh clone)
SLOWEST = ("14_own_data", "10_embeddings", "04_segmentation_losses")
TIMEOUT = 1800  # _config.yml's execute.timeout


def package_hash():
    digest = hashlib.sha256()
    for path in sorted((ROOT / "semiseg").rglob("*")):
        if path.is_file() and path.suffix in (".py", ".yaml"):
            digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def copy_notebooks():
    """notebooks/*.py -> book/notebooks/, each with a last code cell holding the package hash: it
    changes the notebook's code when semiseg/ changes (Jupyter Book's cache is keyed on the code),
    and its ``remove-cell`` tag keeps it off the site (build plumbing, not for readers)."""
    out = BOOK / "notebooks"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    tag = f'\n# %% tags=["remove-cell"]\n# semiseg source hash {package_hash()} (invalidates the execution cache)\n'
    for src in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        (out / src.name).write_text(src.read_text().rstrip("\n") + "\n" + tag)


def local_mathjax():
    if not (MATHJAX / "tex-chtml.js").exists():
        MATHJAX.parents[2].mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(MATHJAX.parents[2]),
                        "mathjax@3.2.2"], check=True)
    target = BOOK / "_mathjax" / "mathjax"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(MATHJAX, target)


def read_notebook(path):
    """The notebook as Jupyter Book reads it (_config.yml's nb_custom_formats): the cache matches on it."""
    import jupytext

    return jupytext.reads(path.read_text(), fmt="py:percent")


def _execute(path):
    from jupyter_cache.executors.utils import single_nb_execution

    nb = read_notebook(path)
    result = single_nb_execution(nb, cwd=str(path.parent), timeout=TIMEOUT, allow_errors=False, meta_override=True)
    return nb, result.time, None if result.err is None else f"{type(result.err).__name__}: {result.err}"


def _execute_all(paths):
    return [(path, *_execute(path)) for path in paths]


def execute_notebooks(workers=2):
    """Execute the notebooks that Jupyter Book's cache does not hold yet, ``workers`` at a time
    (longest first), and add them to its cache: `jupyter-book build` then only reads them back.

    On the 2-core machine two kernels at a time (1 thread each) finish the 13 pages sooner than
    Jupyter Book's one at a time. A notebook that fails here is left out of the cache, so
    `jupyter-book build` runs it again and reports its error as usual.
    """
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    cache = get_cache(str(CACHE))
    seconds = {Path(r.uri).stem: (r.data or {}).get("execution_seconds") or 0.0 for r in cache.list_cache_records()}
    todo = []
    for path in sorted((BOOK / "notebooks").glob("*.py")):
        if path.stem.startswith(NOT_EXECUTED):
            continue
        try:
            cache.match_cache_notebook(read_notebook(path))
        except KeyError:
            todo.append(path)
    tasks = [[p] for p in todo if not any(p.stem in group for group in TOGETHER)]
    for group in TOGETHER:
        tasks.append([p for p in todo if p.stem in group])
    tasks = [t for t in tasks if t]
    hint = {stem: 1e6 - i for i, stem in enumerate(SLOWEST)}
    tasks.sort(key=lambda t: -sum(seconds.get(p.stem) or hint.get(p.stem, 0.0) for p in t))
    if not tasks:
        return
    print(f"executing {len(todo)} notebooks, {workers} at a time", flush=True)
    start, threads = time.perf_counter(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))  # the kernels inherit it
    try:
        with ThreadPoolExecutor(workers) as pool:  # the kernels are the processes
            for done in pool.map(_execute_all, tasks):
                for path, nb, took, error in done:
                    if error:
                        print(f"{path.name}: failed ({error}); jupyter-book runs it again", flush=True)
                        continue
                    cache.cache_notebook_bundle(CacheBundleIn(nb, str(path), data={"execution_seconds": took}),
                                                check_validity=False, overwrite=True)
                    print(f"{path.name}: executed in {took:.1f} s", flush=True)
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    print(f"notebooks executed in {time.perf_counter() - start:.0f} s", flush=True)


def main():
    copy_notebooks()
    local_mathjax()
    execute_notebooks(int(os.environ.get("BOOK_WORKERS", "2")))
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(BOOK), "--keep-going"]
    subprocess.run(cmd, check=True)
    print(f"book built: {BOOK / '_build' / 'html' / 'index.html'}")


if __name__ == "__main__":
    main()
