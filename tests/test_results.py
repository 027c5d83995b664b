"""Results tables come from summary files and the transcribed paper tables, never typed."""

import json

import pytest

from semiseg.results import aggregate, collect, paper_table


def test_collect_and_aggregate(tmp_path):
    for seed, miou in [(0, 50.0), (1, 54.0)]:
        d = tmp_path / "camvid" / "1-8" / "split0" / "full" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"miou": miou, "profile": "quick"}))
    rows = collect(tmp_path)
    assert [(r["variant"], r["seed"], r["ratio"]) for r in rows] == [("full", 0, "1/8"), ("full", 1, "1/8")]
    (agg,) = aggregate(rows)
    assert agg["miou_mean"] == 52.0 and agg["miou_std"] == pytest.approx(2.8284271, rel=1e-6) and agg["runs"] == 2


def test_paper_tables_transcribed():
    t5 = paper_table(5)
    assert len(t5) == 8 and {r["setting"]: r["miou"] for r in t5}["sup+pseudo+ent+contr"] == 59.4
    assert {r["setting"]: r["miou"] for r in paper_table(7)}["psi=256"] == 59.4
    ours = [r for r in paper_table(2) if r["method"] == "Ours" and r["pretraining"] == "ImageNet" and r["architecture"] == "DeepLabv2-R101"]
    assert {r["labels"]: r["miou"] for r in ours} == {"1/30": 58.0, "1/8": 63.0, "1/4": 64.8, "FS": 66.4}


def _grid(tmp_path, table):
    """Summaries in the grid's format for {(ratio, variant): [test mIoU of split 0, 1, 2]}."""
    for (ratio, variant), values in table.items():
        for k, miou in enumerate(values):
            d = tmp_path / "camvid" / ratio.replace("/", "-") / f"split{k}" / variant / f"seed{k}"
            d.mkdir(parents=True)
            scores = {m: {"test": {"miou": miou - (m == "teacher")}, "val": {"miou": miou + 5}}
                      for m in ("student", "teacher")}
            (d / "summary.json").write_text(json.dumps({"miou": miou, "profile": "quick", "scores": scores}))
    return collect(tmp_path)


def test_paired_differences_and_t_interval(tmp_path):
    from semiseg import results

    runs = _grid(tmp_path, {("1/16", "supervised"): [40.0, 42.0, 44.0], ("1/16", "full"): [41.0, 45.0, 44.5],
                            ("1/8", "full"): [50.0], ("1/8", "supervised"): [49.0, 48.0]})
    p = results.paired(runs, "1/16", "full", "supervised")
    assert p["diffs"] == {0: 1.0, 1: 3.0, 2: 0.5} and p["mean"] == pytest.approx(1.5)
    # t(0.975, 2) = 4.3027; std of (1, 3, 0.5) = 1.3229
    assert p["hi"] - p["mean"] == pytest.approx(4.3027 * 1.3229 / 3 ** 0.5, rel=1e-3) and p["includes_zero"]
    assert results.paired(runs, "1/16", "full", "supervised", model="teacher")["diffs"] == p["diffs"]
    one = results.paired(runs, "1/8", "full", "supervised")
    assert one["n"] == 1 and one["lo"] is None
    text = " ".join(results.conclusions(runs))
    assert "At 1/16, the full method over supervised-only adds +1.50 mIoU on test" in text
    assert "the interval includes 0" in text and "from a single split" in text


def test_ceiling_and_relative_numbers(tmp_path):
    from semiseg import results

    runs = _grid(tmp_path, {("1/1", "supervised"): [60.0, 62.0, 64.0], ("1/8", "full"): [31.0, 31.0, 31.0]})
    assert results.ceiling(runs) == 62.0
    assert "full at 1/8 reaches 50.0 % of the fully supervised ceiling" in " ".join(results.conclusions(runs))
    assert results.labeled_count("camvid", "1/16", 0) == 23 and results.labeled_count("camvid", "1/8", 1) == 46
    assert results.labeled_count("camvid", "1/1", 0) == 367


def test_unlabeled_signals_read_from_the_log(tmp_path):
    from semiseg import results

    d = tmp_path / "camvid" / "1-8" / "split0" / "full" / "seed0"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"miou": 40.0, "profile": "quick", "iterations": 100}))
    (d / "config.yaml").write_text("warmup_frac: 0.2\niterations: 100\n")
    logs = [(25, 0.01, [0, 0.5, 0]), (50, 0.04, [0, 0.5, 0]), (75, 0.06, [0.1, 0.5, 0]), (100, 0.03, [0.2, 0.5, 0.3])]
    lines = [{"iteration": i, "loss": 1.0, "pseudo_beta": b, "pseudo_acc": i / 200, "bank_fill_per_class": f}
             for i, b, f in logs]
    lines.insert(2, {"iteration": 50, "val_miou": 30.0})  # an evaluation record: no loss, skipped
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (run,) = collect(tmp_path)
    s = results.unlabeled_signals(run)
    assert s == {"warmup_end": 20, "beta_reached": 75, "bank_two_classes": 75, "pseudo_acc_end": 0.5,
                 "beta_end": 0.03, "bank_classes_end": 3, "classes": 3}
    assert results.unlabeled_signals({**run, "warmup_end": 60})["warmup_end"] == 60  # the gate's, when recorded
    assert results.unlabeled_signals(run, beta_level=0.1)["beta_reached"] is None


def test_grid_runs_leave_out_the_domain_adaptation_demo(tmp_path):
    """The DA demo shares the grid's profile and dataset; its runs never enter the grid's tables."""
    from semiseg import results

    runs = _grid(tmp_path, {("1/16", "full"): [41.0], ("1/4", "da_full"): [43.0], ("1/4", "da_target_only"): [42.0]})
    assert [(r["ratio"], r["variant"]) for r in results.grid_runs(runs)] == [("1/16", "full")]


def test_readme_tables_from_summaries_and_the_readme_shows_the_committed_ones(tmp_path, capsys):
    """``python -m semiseg.results`` prints the README's headline tables from the summaries, and the
    README holds exactly what it prints for the committed runs (it is never typed)."""
    from semiseg import results

    runs = _grid(tmp_path, {("1/16", "supervised"): [40.0, 42.0, 44.0], ("1/16", "full"): [41.0, 45.0, 44.5],
                            ("1/8", "supervised"): [49.0, 48.0], ("1/1", "supervised"): [60.0, 62.0]})
    text = results.readme_tables(runs)
    assert "| 1/16 | 1 | 42.00 (47.00) | not yet | 45.00 (50.00) |" in text
    assert "| 1/16 | mean ± std | **42.00** ± 2.00 (69 %) | – | **43.50** ± 2.18 (71 %) |" in text
    assert "| 1/1 (ceiling) | seeds 0, 1 | 60.00 (65.00), 62.00 (67.00); mean **61.00** | | |" in text
    assert "| 1/16 | +1.50 [" in text and "| no finished pair | no finished pair |" in text
    results.main(["--results", str(tmp_path), "--gate", str(tmp_path / "no_gate_runs")])
    assert capsys.readouterr().out.strip() == text
    readme = (results.BOOK.parent / "README.md").read_text()
    committed = results.grid_runs(results.collect())
    assert results.readme_tables(committed) in readme
    gate = results.check_runs()
    assert not gate or results.gate_table(committed, gate) in readme


def test_gate_check_runs_are_paired_with_the_grid_by_ratio_and_split(tmp_path):
    """A check folder's runs (named by ratio, split and seed; the cell comes from the summary) sit
    beside the grid's full and supervised runs of the same cell, with paired differences."""
    from semiseg import results

    runs = _grid(tmp_path / "grid", {("1/8", "supervised"): [44.0, 43.0], ("1/8", "full"): [42.0, 44.0]})
    for k, miou in [(0, 45.0), (1, 44.5)]:
        d = tmp_path / "gate" / f"1-8_split{k}_full_seed{k}"
        d.mkdir(parents=True)
        scores = {m: {"test": {"miou": miou}, "val": {"miou": miou + 5}} for m in ("student", "teacher")}
        (d / "summary.json").write_text(json.dumps({"miou": miou, "ratio": "1/8", "split": k, "seed": k,
                                                    "commit": "abc1234", "scores": scores}))
    gate = results.check_runs(tmp_path / "gate")
    assert [(r["variant"], r["ratio"], r["split"]) for r in gate] == [("full_gate", "1/8", 0), ("full_gate", "1/8", 1)]
    text = results.gate_table(runs, gate)
    assert "| 1/8 | 0 | 45.00 (50.00) | 42.00 (47.00) | 44.00 (49.00) | abc1234 |" in text
    # full_gate - full = (3.0, 0.5), full_gate - supervised = (1.0, 1.5)
    assert "| 1/8 | +1.75 [" in text and "+1.25 [" in text and "1/16" not in text
