"""Run folders that never lose work (issue #11): weights before evaluation, the lock, overwrite,
the resume check, signals, a full disk, strict JSON, file modes and one-line OS errors."""

import errno
import json
import multiprocessing
import os
import random
import signal
import stat
import time

import numpy as np
import pytest
import torch
from PIL import Image

import semiseg.train as train_module
from semiseg import checkpoint, compare, predict, run_dir
from semiseg.config import load_config
from semiseg.train import main as train_main
from semiseg.train import train
from test_errors import cli_error

SMOKE = ["iterations=4", "checkpoint_every=1", "deterministic=true", "fqf=false", "log_every=1"]


def _cfg(out, *extra):
    return load_config("smoke", [*SMOKE, f"out_dir={out}", *extra])


# ----------------------------------------------------------------------------- data loss
def test_failed_evaluation_keeps_the_weights_and_resume_only_evaluates(tmp_path, monkeypatch, capsys):
    real = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad val image")))
    with pytest.raises(ValueError, match="bad val image"):
        train(_cfg(tmp_path), progress=False)
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "summary.json").exists()
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    monkeypatch.setattr(train_module, "evaluate", real)
    calls = []
    monkeypatch.setattr(train_module.Trainer, "step", lambda *a: calls.append(1))
    summary = train(_cfg(tmp_path), progress=False, resume=True)
    assert not calls and summary["iterations"] == 4  # no iteration was trained again
    assert "from checkpoint.pt (iteration 4)" in capsys.readouterr().out
    again = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(trained["student"][k], again["student"][k]) for k in trained["student"])


def test_second_process_on_one_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    other = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(30,))
    other.start()
    try:
        (tmp_path / "lock").write_text(f"{other.pid}\n")
        message = cli_error(train_main, ["smoke", *SMOKE, f"out_dir={tmp_path}", "--no-progress"])
        assert f"{tmp_path} is in use by process {other.pid}" in message
    finally:
        other.kill()
        other.join()
    train(_cfg(tmp_path), progress=False)  # the holder is dead now: its lock is stale
    assert f"taking over the stale lock of {tmp_path} (process {other.pid} is gone)" in capsys.readouterr().out
    assert not (tmp_path / "lock").exists()  # released at the end


def test_temp_files_have_unique_names(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(os.path.basename(a)), real(a, b)))
    checkpoint.save_checkpoint(tmp_path, {"iteration": 2}, keep=2)
    checkpoint.save_checkpoint(tmp_path, {"iteration": 2}, keep=2)
    assert len(seen) == 2 and seen[0] != seen[1] and all(s.startswith(".iter0000002.pt.") for s in seen)


def test_overwrite_removes_the_old_runs_files_first(tmp_path):
    train(_cfg(tmp_path), progress=False)
    assert (tmp_path / "checkpoints").is_dir()
    cfg = _cfg(tmp_path, "seed=9", "iterations=2", "checkpoint_every=0")
    seen = {}
    real = train_module.setup

    def spy(*args, **kwargs):
        seen["files"] = sorted(p.name for p in tmp_path.iterdir())
        return real(*args, **kwargs)

    train_module.setup, saved = spy, train_module.setup
    try:
        train(cfg, progress=False, overwrite=True)
    finally:
        train_module.setup = saved
    assert seen["files"] == ["lock"]  # nothing of the old run was left when the new one started
    assert not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["seed"] == 9


def test_predict_outputs_never_overwrite_each_other(tmp_path):
    cfg = _cfg(tmp_path / "run", "iterations=1")
    train(cfg, progress=False)
    for folder, value in (("A", 40), ("B", 200)):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((24, 32, 3), value, np.uint8)).save(tmp_path / folder / "x.png")
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    predict.main([ckpt, str(tmp_path / "A" / "x.png"), str(tmp_path / "B" / "x.png"), "--out", str(tmp_path / "o")])
    outputs = sorted(str(p.relative_to(tmp_path / "o")) for p in (tmp_path / "o").rglob("*.png"))
    assert outputs == ["A/x_mask.png", "A/x_overlay.png", "B/x_mask.png", "B/x_overlay.png"]
    (tmp_path / "file").write_text("")
    assert "is a file" in cli_error(predict.main, [ckpt, str(tmp_path / "A"), "--out", str(tmp_path / "file")])
    (tmp_path / "empty").mkdir()
    assert str(tmp_path / "empty") in cli_error(predict.main, [ckpt, str(tmp_path / "empty"), "--out", str(tmp_path / "o")])


# ----------------------------------------------------------------------------- silently wrong
def test_resume_refuses_a_changed_config_but_allows_threads(tmp_path):
    cfg = _cfg(tmp_path, "iterations=4")

    class Stop(Exception):
        pass

    real_step = train_module.Trainer.step

    def step(self, *a):
        if self.iteration == 3:
            raise Stop
        return real_step(self, *a)

    train_module.Trainer.step = step
    try:
        with pytest.raises(Stop):
            train(cfg, progress=False)
    finally:
        train_module.Trainer.step = real_step
    base = ["smoke", *SMOKE, f"out_dir={tmp_path}", "--resume", "--no-progress"]
    message = cli_error(train_main, [*base, "lr=0.5", "seed=3"])
    assert "config key 'lr' is 0.5, but the run" in message and "was started with 0.01" in message
    message = cli_error(train_main, [*base, "iterations=3"])
    assert "config key 'iterations' is 3" in message and "started with 4" in message
    assert "'psi' is 32" in cli_error(train_main, [*base, "psi=32"])
    train(_cfg(tmp_path, "threads=1", "log_every=2"), progress=False, resume=True)  # allowed
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "finished"


def test_empty_validation_set_is_an_error_at_setup_and_json_has_no_nan(tmp_path, monkeypatch):
    real = train_module.build_eval_dataset
    monkeypatch.setattr(train_module, "build_eval_dataset", lambda cfg, split="val": real(cfg, split).subset([]))
    with pytest.raises(ValueError, match="the val split of tiny has no images"):
        train(_cfg(tmp_path), progress=False)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "crashed" and status["stage"] == "setup"
    run_dir.write_json(tmp_path / "x.json", {"miou": float("nan"), "a": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"miou": None, "a": [None, 1.0]}


# ----------------------------------------------------------------------------- disks and modes
def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    message = cli_error(train_main, ["smoke", *SMOKE, f"out_dir={tmp_path}", "--no-progress"])
    assert message == f"error: disk full while writing {tmp_path / 'checkpoints' / 'iter0000003.pt'}; the previous file is kept"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["iter0000001.pt", "iter0000002.pt"]  # no temp file, the previous ones intact
    assert checkpoint.read_checkpoint(tmp_path / "checkpoints" / "iter0000002.pt")["iteration"] == 2
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "crashed" and "disk full" in status["error"]


def test_run_files_get_the_umasks_normal_mode(tmp_path):
    old = os.umask(0o022)
    try:
        train(_cfg(tmp_path, "iterations=1"), progress=False)
    finally:
        os.umask(old)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "status.json", "checkpoint.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


# ----------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("override, message", [
    ("batch_labeled=0", "'batch_labeled' = 0: must be >= 1"),
    ("batch_unlabeled=0", "'batch_unlabeled' = 0: must be >= 1"),
    ("log_every=0", "'log_every' = 0: must be >= 1"),
    ("ratio=1/0", "'ratio' = '1/0': must be 1/N"),
    ("crop_size=[12]", "'crop_size' = [12]: must be [W, H]"),
    ("crop_size=[0,0]", "'crop_size' = [0, 0]: must be [W, H]"),
])
def test_config_values_are_checked_at_load(override, message, tmp_path):
    assert message in cli_error(train_main, ["smoke", override, f"out_dir={tmp_path}"])


def test_config_parsing_errors_name_the_place(tmp_path):
    assert load_config("smoke", ["lr=1e-4"]).lr == 1e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\npsi: [1, 2\n")
    message = cli_error(train_main, [str(bad)])
    assert str(bad) in message and "line 3" in message
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert "'base:' makes a loop" in cli_error(train_main, [str(tmp_path / "a.yaml")])


def test_os_errors_are_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    assert "is a file" in cli_error(train_main, ["smoke", f"out_dir={tmp_path / 'file'}"])
    assert "a parent of it is a file" in cli_error(train_main, ["smoke", f"out_dir={tmp_path / 'file' / 'run'}"])
    from semiseg import evaluate

    assert "is a folder, not a checkpoint file" in cli_error(evaluate.main, [str(tmp_path)])
    broken = tmp_path / "runs" / "full" / "seed0"
    broken.mkdir(parents=True)
    (broken / "summary.json").write_text("{not json")
    message = cli_error(compare.main, ["smoke", f"out_dir={tmp_path / 'runs'}", "--variants", "full"])
    assert f"{broken / 'summary.json'}: not a readable run summary" in message


# ----------------------------------------------------------------------------- signals
def _run(out, iterations):
    train_main(["smoke", f"iterations={iterations}", "checkpoint_every=1", "deterministic=true", "fqf=false",
                "log_every=1", "threads=1", f"out_dir={out}", "--no-progress", "--resume"])


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["semiseg.train"])  # children start without importing torch again
    return ctx


def _same_weights(a, b):
    sa = torch.load(a / "checkpoint.pt", weights_only=False)
    sb = torch.load(b / "checkpoint.pt", weights_only=False)
    for part in ("student", "teacher"):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), part
    assert torch.equal(sa["bank"]["memory"], sb["bank"]["memory"])


def _records(out):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_checkpoint_and_resume_exactly(sig, forkserver, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    forkserver.Process(target=_run, args=(ref, 5)).start()
    proc = forkserver.Process(target=_run, args=(out, 5))
    proc.start()
    while not list((out / "checkpoints").glob("iter*.pt")):
        time.sleep(0.01)
    os.kill(proc.pid, sig)
    proc.join()
    assert proc.exitcode == 128 + sig
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == signal.Signals(sig).name
    assert checkpoint.list_checkpoints(out)[0].stem == f"iter{status['iteration']:07d}"
    assert not (out / "lock").exists()
    forkserver.Process(target=_run, args=(out, 5)).start()
    while not ((ref / "summary.json").exists() and (out / "summary.json").exists()):
        time.sleep(0.05)
    _same_weights(ref, out)
    assert _records(ref) == _records(out)


def test_soak_20_random_kills_then_the_uninterrupted_weights(forkserver, tmp_path):
    """SIGKILL, SIGTERM and SIGINT at random points, resuming after each, 20 times."""
    # long enough that 20 interruptions 0.3-1.5 s apart land before the end on a fast machine too
    # (24 iterations finished after 9 on the quiet 2-core machine)
    ref, out, iterations = tmp_path / "ref", tmp_path / "out", 80
    reference = forkserver.Process(target=_run, args=(ref, iterations))
    reference.start()
    rng = random.Random()
    kinds = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT] * 7
    rng.shuffle(kinds)
    kills = 0
    for sig in kinds[:20]:
        proc = forkserver.Process(target=_run, args=(out, iterations))
        proc.start()
        proc.join(timeout=rng.uniform(0.3, 1.5))
        if proc.exitcode is None:
            os.kill(proc.pid, sig)
            kills += 1
        proc.join()
        if (out / "summary.json").exists():
            break
    print(f"{kills} kills")
    proc = forkserver.Process(target=_run, args=(out, iterations))
    proc.start()
    proc.join()
    reference.join()
    assert kills >= 15 and (out / "summary.json").exists()
    _same_weights(ref, out)
    assert _records(ref) == _records(out)
