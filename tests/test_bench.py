"""``python -m semiseg.bench`` at toy sizes: it runs, writes its JSON, and its meters measure."""

import json

import pytest
import torch

from semiseg import bench


def test_peak_memory_counts_new_tensors_not_inputs():
    x = torch.randn(256, 256, requires_grad=True)  # 256 KiB, allocated before: not counted
    with bench.PeakMemory() as peak:
        y = (x * 2).exp()  # 256 KiB each; x * 2 dies after exp, y is saved for backward
        y.sum().backward()  # in backward: y, the gradient of y and x.grad alive at once
    assert 3 * 256 * 1024 <= peak.peak <= 3 * 256 * 1024 + 64  # + a few scalars


def test_bench_runs_at_toy_sizes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--parts", "share", "loss", "syncs", "--settings", "paper", "--paper-arch", "effnet_lite0_dlv3p",
                "--paper-size", "64", "--loss-n", "500", "--reps", "1", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    share, loss, syncs = result["parts"]
    assert share["part"] == "share" and 0 < share["flop_share"] < 1 and share["time_share"] > 0
    assert share["flops"]["step"] > share["flops"]["step_module_off"] > 0
    assert loss["abs_difference"] < 1e-5 and loss["loop"]["seconds"] > 0
    assert syncs["method_syncs"] == 1  # the loss values of the step (issue #13: none for S_c)
    printed = capsys.readouterr().out
    for key in ("time_share / flop_share", "full step / module-off step", "loop / vectorised (cpu)"):
        assert key in printed and key in json.dumps(result)


def test_attention_part_counts_operators_constant_in_the_class_count(tmp_path, capsys):
    """Issue #13: with the batched S_c the contrastive module runs the same operators for any C,
    fewer than with C modules in a loop, whose count grows with C."""
    out = tmp_path / "bench.json"
    bench.main(["--parts", "attention", "--attention-classes", "11", "19", "--attention-size", "48",
                "--attention-psi", "8", "--device", "cpu", "--out", str(out)])
    (part,) = json.loads(out.read_text())["parts"]
    counts = part["counts"]
    assert part["batched_constant_in_C"]
    assert counts["11"]["batched"]["module"]["ops"] == counts["19"]["batched"]["module"]["ops"] > 0
    assert counts["19"]["loop"]["module"]["ops"] > counts["11"]["loop"]["module"]["ops"]
    for C in ("11", "19"):
        assert counts[C]["batched"]["module"]["ops"] < counts[C]["loop"]["module"]["ops"]
        assert 0 < counts[C]["batched"]["attention_ops"] < counts[C]["loop"]["attention_ops"]
    assert "batched / loop operators (C=19)" in capsys.readouterr().out


def test_attention_losses_in_float64_restores_the_default_dtype():
    """Issue #13's loss comparison in float64: both paths run in float64, one step from the same
    state agrees to float64 rounding, and the default dtype is float32 again afterwards."""
    part = bench.attention_losses_part(torch.device("cpu"), iterations=2, dtype="float64")
    assert part["dtype"] == "float64" and torch.get_default_dtype() == torch.float32
    assert part["max_abs_loss_difference_one_step"] < 1e-12
    assert part["max_rel_weight_difference_one_step"] < 1e-12


def test_flops_count_grouped_mm_like_the_per_tile_bmm(monkeypatch):
    """The bench's FLOP count of S_c is the same whether its first Linear runs as torch._grouped_mm
    (no formula in torch.utils.flop_counter: bench.grouped_mm_flops) or as per-tile bmm."""
    from semiseg.models.heads import ClassAttention, grouped_mm_available

    if not grouped_mm_available("cpu", torch.float32):
        pytest.skip("this torch has no torch._grouped_mm on the CPU")
    torch.manual_seed(0)
    att = ClassAttention(5, 32, 32).train()
    x, labels = torch.randn(300, 32, requires_grad=True), torch.randint(0, 5, (300,))
    counted = {}
    for grouped in (True, False):
        monkeypatch.setattr(ClassAttention, "grouped_mm", grouped)
        counted[grouped] = bench.flops(lambda: att(x, labels).sum().backward())
    assert counted[True] == counted[False] > 3 * 2 * 300 * 32 * 32
