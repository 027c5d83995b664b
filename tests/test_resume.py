"""Exact resume after SIGKILL, corrupt checkpoints, the NaN guard and the crash marker (issue 5)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from semiseg import losses
from semiseg.checkpoint import list_checkpoints, read_checkpoint, save_checkpoint
from semiseg.config import load_config
from semiseg.train import train

COMMON = ["smoke", "iterations=14", "checkpoint_every=1", "keep_checkpoints=3", "deterministic=true", "fqf=false",
          "log_every=1"]


def _train_cli(out, *extra, wait=True):
    cmd = [sys.executable, "-m", "semiseg.train", *COMMON, f"out_dir={out}", "--no-progress", *extra]
    if wait:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _final_state(out):
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)


def _metrics(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _assert_same_run(a, b):
    sa, sb = _final_state(a), _final_state(b)
    for part in ("student", "teacher"):
        for key in sa[part]:
            assert torch.equal(sa[part][key], sb[part][key]), (part, key)
    assert torch.equal(sa["bank"]["memory"], sb["bank"]["memory"])
    assert torch.equal(sa["class_counts"], sb["class_counts"])
    assert _metrics(a) == _metrics(b)
    assert json.loads((a / "summary.json").read_text())["miou"] == json.loads((b / "summary.json").read_text())["miou"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _train_cli(out)
    return out


def test_sigkill_at_random_iteration_then_resume_is_exact(uninterrupted, tmp_path):
    kill_after = random.Random().randint(2, 10)
    print(f"killing after the checkpoint of iteration {kill_after}")
    proc = _train_cli(tmp_path, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [int(p.stem[4:]) for p in list_checkpoints(tmp_path)]
        if done and max(done) >= kill_after:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "summary.json").exists()
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "running"  # killed: never finished
    result = _train_cli(tmp_path, "--resume")
    assert "resuming" in result.stdout
    _assert_same_run(uninterrupted, tmp_path)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "finished"


def test_corrupt_newest_checkpoint_falls_back_to_previous(uninterrupted, tmp_path):
    proc = _train_cli(tmp_path, wait=False)
    while len(list_checkpoints(tmp_path)) < 3 or int(list_checkpoints(tmp_path)[0].stem[4:]) < 6:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    newest, previous = list_checkpoints(tmp_path)[:2]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    result = _train_cli(tmp_path, "--resume")
    assert f"checkpoint {newest} is unreadable" in result.stderr
    assert f"from {previous.name}" in result.stdout
    _assert_same_run(uninterrupted, tmp_path)


def test_keep_last_k(tmp_path):
    for it in range(1, 6):
        save_checkpoint(tmp_path, {"iteration": it}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter0000005.pt", "iter0000004.pt"]
    assert not list(tmp_path.glob("checkpoints/.*tmp"))


def test_nan_loss_stops_with_iteration_and_term_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    cfg = load_config(COMMON[0], [*COMMON[1:], f"out_dir={tmp_path}"])
    calls = {"n": 0}
    real = losses.entropy_loss

    def flaky(logits):
        calls["n"] += 1
        return real(logits) * (float("nan") if calls["n"] == 5 else 1.0)

    monkeypatch.setattr(losses, "entropy_loss", flaky)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at iteration 4: term\(s\) \['ent'\]"):
        train(cfg, progress=False)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "crashed" and "iteration 4" in status["error"]
    last = read_checkpoint(list_checkpoints(tmp_path)[0])
    assert last["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in last["student"].values() if v.is_floating_point())
