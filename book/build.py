"""Build the book offline: copy the notebooks (tagged with a hash of semiseg/ so that a package
change re-executes them), put a local MathJax under _static/, run `jupyter-book build`."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
MATHJAX = BOOK / "_build" / ".mathjax" / "node_modules" / "mathjax" / "es5"


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


def main():
    copy_notebooks()
    local_mathjax()
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(BOOK), "--keep-going"]
    subprocess.run(cmd, check=True)
    print(f"book built: {BOOK / '_build' / 'html' / 'index.html'}")


if __name__ == "__main__":
    main()
