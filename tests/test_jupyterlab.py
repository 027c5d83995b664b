"""JupyterLab opens the jupytext `.py` notebooks as notebooks: the Jupyter server (with the
jupytext extension, installed by the `book` extra) serves them through the contents API as
notebook models, which is what JupyterLab's "Open With → Notebook" asks for."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_serves_py_notebooks_as_notebooks(tmp_path):
    port, token = _free_port(), "semiseg-test"
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "server", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", "--ServerApp.allow_root=True", f"--ServerApp.root_dir={ROOT}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"))
    url = f"http://127.0.0.1:{port}/api/contents/notebooks/06_contrastive_loss.py?type=notebook&content=1&token={token}"
    try:
        for _ in range(120):
            try:
                model = json.load(urllib.request.urlopen(url, timeout=5))
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError((tmp_path / "server.log").read_text()[-2000:])
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert model["type"] == "notebook"
    cells = model["content"]["cells"]
    assert len(cells) > 10 and "parameters" in next(c for c in cells if c["cell_type"] == "code")["metadata"]["tags"]
