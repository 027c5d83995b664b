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
