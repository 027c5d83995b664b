"""Every notebook runs end to end with its `smoke` parameter (papermill, the venv's kernel)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def test_first_code_cell_is_a_literal_parameters_cell():
    import ast

    import jupytext

    for path in NOTEBOOKS:
        nb = jupytext.read(path)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and "parameters" in code[0].metadata.get("tags", []), path.name
        for node in ast.parse(code[0].source).body:
            assert isinstance(node, ast.Assign), (path.name, ast.dump(node))
            ast.literal_eval(node.value)  # raises unless the value is a literal


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    import jupytext
    import papermill

    source = tmp_path / f"{path.stem}.ipynb"
    jupytext.write(jupytext.read(path), source)
    out = papermill.execute_notebook(str(source), str(tmp_path / f"{path.stem}.out.ipynb"),
                                     parameters={"smoke": True}, kernel_name="python3", cwd=str(ROOT),
                                     progress_bar=False, stdout_file=sys.stdout, stderr_file=sys.stderr)
    # a warning in an output is shown to the site's readers (the browser test fails on it too,
    # but only after the whole book is built)
    warned = [line for cell in out.cells for o in cell.get("outputs", [])
              if o.get("output_type") == "stream" and o.get("name") == "stderr"
              for line in o.get("text", "").splitlines() if "Warning" in line]
    assert not warned, f"{path.name}: warnings in outputs:\n" + "\n".join(warned)


def test_notebook_code_lines_fit_the_page():
    """The book's code column shows about 90 characters: code lines stay within 88."""
    import jupytext

    limit = 88
    too_long = []
    for path in NOTEBOOKS:
        for index, cell in enumerate(jupytext.read(path).cells):
            if cell.cell_type != "code":
                continue
            for number, line in enumerate(cell.source.splitlines(), 1):
                if len(line) > limit:
                    too_long.append(f"{path.name}, cell {index}, line {number} "
                                    f"({len(line)} > {limit}): {line}")
    assert not too_long, f"{len(too_long)} code lines too long:\n" + "\n".join(too_long)
