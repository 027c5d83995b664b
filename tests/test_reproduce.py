"""The reproduction runner: papermill runs of the train notebook, skip finished, survive a failure."""

import json

import pytest

from semiseg import reproduce


def test_grid_plans_match_the_paper_tables():
    assert len(reproduce.GRIDS["table5"]) == 8 and len(reproduce.GRIDS["table6"]) == 7
    assert [v for v, _ in reproduce.GRIDS["table7"]] == ["psi=32", "psi=64", "psi=128", "psi=256", "psi=512"]
    runs = reproduce.plan("headline", "quick", [0, 1, 2], [0])
    assert len(runs) == 6 and runs[0]["out_dir"].endswith("book/results/camvid/1-8/split0/supervised/seed0")


def test_smoke_grid_runs_skips_and_survives_a_failing_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEMISEG_SMOKE_RUNS", str(tmp_path))
    monkeypatch.setitem(reproduce.GRIDS, "test", [("full", ""), ("supervised", "psi=0"), ("psi=8", "lambda_contr=1")])
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["test", "--profile", "smoke"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1
    assert "2 ran, 0 skipped, 1 failed" in out
    failed = tmp_path / "tiny" / "1-4" / "split0" / "supervised" / "seed0" / "train.failed.ipynb"
    assert f"failed: {failed}: cell" in out and "'psi' = 0: must be >= 1" in out
    for variant in ("full", "psi=8"):
        run = tmp_path / "tiny" / "1-4" / "split0" / variant / "seed0"
        assert json.loads((run / "summary.json").read_text())["variant"] == variant
        assert (run / "train.ipynb").exists() and not list(run.glob(".*tmp*"))
    monkeypatch.setitem(reproduce.GRIDS, "test", [("full", ""), ("psi=8", "lambda_contr=1")])
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["test", "--profile", "smoke"])
    assert exit_info.value.code == 0 and "0 ran, 2 skipped, 0 failed" in capsys.readouterr().out


def test_camvid_grid_is_the_21_runs_of_issue_9(tmp_path):
    runs = reproduce.plan("camvid", "quick", [0], [0, 1, 2], results=tmp_path, extra="threads=1")
    assert len(runs) == 21
    assert all(r["seed"] == r["split"] for r in runs)  # seed = split
    cells = {(r["ratio"], r["variant"]) for r in runs}
    assert cells == {(ratio, v) for ratio in ("1/16", "1/8") for v in ("supervised", "no_contr", "full")} | {
        ("1/1", "supervised")}
    assert all(r["out_dir"].startswith(str(tmp_path)) and "threads=1" in r["overrides"] for r in runs)
    assert runs[-1]["out_dir"].endswith("camvid/1-1/split2/supervised/seed2")


def test_ratios_and_variants_pick_runs_and_results_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the notebook runs in --code's checkout: a relative folder would land there
    runs = reproduce.plan("camvid", "quick", [0], [0], results="pilot", ratios=["1/16", "1/1"],
                          variants=["supervised"])
    assert [(r["ratio"], r["variant"]) for r in runs] == [("1/16", "supervised"), ("1/1", "supervised")]
    assert all(r["out_dir"].startswith(str(tmp_path / "pilot")) for r in runs)
    with pytest.raises(SystemExit):
        reproduce.main(["camvid", "--ratios", "1/3"])


def test_commit_run_commits_only_the_runs_small_files(tmp_path):
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "other.txt").write_text("staged elsewhere\n")
    git("add", "other.txt")
    run = tmp_path / "camvid" / "1-16" / "split0" / "full" / "seed0"
    run.mkdir(parents=True)
    for name in ("summary.json", "metrics.jsonl", "config.yaml", "status.json"):
        (run / name).write_text("{}\n")
    (run / "checkpoint.pt").write_bytes(b"x")
    (run / "train.ipynb").write_text("{}")
    assert reproduce.commit_run(run, "[1/21] 1/16 full seed0 split0")
    committed = git("show", "--name-only", "--format=", "HEAD").split()
    assert sorted(committed) == sorted(f"camvid/1-16/split0/full/seed0/{n}" for n in
                                       ("summary.json", "metrics.jsonl", "config.yaml", "status.json"))
    assert "other.txt" in git("diff", "--cached", "--name-only")  # still staged, not committed
