"""The built site in headless Chromium (Playwright, Debian's chromium): every page loads with no
failed or outside request, every image loads, equations are typeset, no traceback in outputs.
Screenshots of the pages go to test-artifacts/book/ for a person to look at."""

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "book" / "_build" / "html"
ARTIFACTS = ROOT / "test-artifacts" / "book"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-quic"]


@pytest.fixture(scope="module")
def site():
    """Build the book (notebook executions are cached), serve it on 127.0.0.1."""
    subprocess.run([sys.executable, str(ROOT / "book" / "build.py")], check=True, cwd=ROOT)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def pages():
    toc = (ROOT / "book" / "_toc.yml").read_text()
    return ["intro.html"] + [line.split("file:")[1].strip() + ".html" for line in toc.splitlines() if "file:" in line]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "Debian's chromium is not installed (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.mark.parametrize("page_path", pages())
def test_page(site, browser, page_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("requestfailed", lambda r: problems.append(f"failed request {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status} {r.url}"))
    page.on("request", lambda r: r.url.startswith(site) or r.url.startswith("data:")
            or problems.append(f"request leaves the machine: {r.url}"))
    page.goto(f"{site}/{page_path}", wait_until="networkidle")
    broken = page.eval_on_selector_all("img", "imgs => imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
    problems += [f"image did not load: {src}" for src in broken]
    text = page.inner_text("main") if page.query_selector("main") else page.inner_text("body")
    if "Traceback (most recent call last)" in text or "Error Traceback" in text:
        problems.append("a Python traceback in an output")
    if "semiseg source hash" in text:
        problems.append("the execution-cache key is shown to readers")
    warnings = page.eval_on_selector_all(
        ".output.stderr, .cell_output .stderr",
        "blocks => blocks.map(b => b.innerText).filter(t => /Warning/.test(t))")
    problems += [f"a warning block: {w.strip().splitlines()[0][:160]}" for w in warnings]
    has_math = page.evaluate("document.querySelectorAll('.math, div.math, span.math').length") > 0
    if has_math:
        page.wait_for_selector("mjx-container", timeout=20000)
        raw = page.evaluate("document.querySelectorAll('.math:not(:has(mjx-container))').length")
        if raw:
            problems.append(f"{raw} equations not typeset")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / (page_path.replace("/", "_") + ".png")), full_page=False)
    page.close()
    assert not problems, problems


@pytest.mark.parametrize("page_path", ["notebooks/09_results.html", "notebooks/12_performance.html",
                                       "notebooks/13_reproduction.html"])
def test_result_tables_are_tables_with_rows(site, browser, page_path):
    """The results and performance pages print their tables as Markdown outputs: they must render
    as HTML tables (not as lines of pipes) and hold the committed numbers."""
    page = browser.new_page()
    page.goto(f"{site}/{page_path}", wait_until="networkidle")
    rows = page.eval_on_selector_all("main table tbody tr", "rows => rows.length")
    text = page.inner_text("main")
    page.close()
    assert rows >= 3 and "|---|" not in text
    if "performance" in page_path:
        assert "cpu.json" in text and "cuda.json" in text and "met" in text
        if (ROOT / "book" / "results" / "bench" / "cpu_share_pixel_linear.json").exists():  # the before / after table
            assert "cpu_share_paper_before_pixel_linear.json" in text and "PixelLinear" in text
        if (ROOT / "book" / "results" / "bench" / "cpu_attention_losses_control.json").exists():  # the rounding control
            assert "control" in text and "steps; max |Δ loss| batched vs loop" in text
    if "reproduction" in page_path:
        assert "full − supervised" in text
        if (ROOT / "book" / "results" / "checks" / "warmup_gate_1500").exists():
            assert "full, gated warm-up" in text


def load_build():
    import importlib.util

    spec = importlib.util.spec_from_file_location("book_build", ROOT / "book" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def test_execution_cache_key_follows_the_package(tmp_path, monkeypatch):
    """The copied notebooks carry a hash of semiseg/: a package change changes their code, so
    Jupyter Book's cache (keyed on code cells) re-executes them."""
    build = load_build()
    (tmp_path / "semiseg").mkdir()
    (tmp_path / "semiseg" / "losses.py").write_text("x = 1\n")
    monkeypatch.setattr(build, "ROOT", tmp_path)
    before = build.package_hash()
    (tmp_path / "semiseg" / "losses.py").write_text("x = 2\n")
    assert build.package_hash() != before
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_x.py").write_text('# %% tags=["parameters"]\nsmoke = False\n')
    monkeypatch.setattr(build, "BOOK", tmp_path / "book")
    (tmp_path / "book").mkdir()
    build.copy_notebooks()
    import jupytext

    cells = jupytext.read(tmp_path / "book" / "notebooks" / "01_x.py").cells
    assert cells[0].metadata.get("tags") == ["parameters"]  # papermill's cell stays first
    assert build.package_hash() in cells[-1].source and cells[-1].metadata["tags"] == ["remove-cell"]


def test_parallel_execution_fills_jupyter_books_cache(tmp_path, monkeypatch, capsys):
    """build.execute_notebooks runs the pages two at a time into the cache that Jupyter Book reads
    (matched on the notebook as Jupyter Book reads it); a failing page stays out of the cache
    (Jupyter Book then runs it and reports the error), and a second call executes nothing."""
    from jupyter_cache import get_cache

    build = load_build()
    monkeypatch.setattr(build, "BOOK", tmp_path)
    monkeypatch.setattr(build, "CACHE", tmp_path / "_build" / ".jupyter_cache")
    (tmp_path / "notebooks").mkdir()
    head = "# ---\n# jupyter:\n#   kernelspec: {display_name: Python 3, language: python, name: python3}\n# ---\n\n"
    for name, code in [("01_a", "print(6 * 7)"), ("02_b", "raise ValueError('bad page')"),
                       ("08_train", "print('not executed')"), ("09_results", "print('r')")]:
        (tmp_path / "notebooks" / f"{name}.py").write_text(head + "# %%\n" + code + "\n")
    build.execute_notebooks(2)
    out = capsys.readouterr().out
    assert "02_b.py: failed (" in out and "bad page" in out and "08_train" not in out
    cache = get_cache(str(build.CACHE))
    hit = cache.match_cache_notebook(build.read_notebook(tmp_path / "notebooks" / "01_a.py"))
    assert cache.get_cache_bundle(hit.pk).nb.cells[0].outputs[0]["text"] == "42\n"
    with pytest.raises(KeyError):
        cache.match_cache_notebook(build.read_notebook(tmp_path / "notebooks" / "02_b.py"))
    build.execute_notebooks(2)
    assert "executing 1 notebooks" in capsys.readouterr().out  # only the failed page again
