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
                "--attention-psi", "8", "--attention-impls", "loop", "batched", "--device", "cpu", "--out", str(out)])
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


def test_attention_losses_reach_the_attention_and_run_a_control():
    """The comparison exercises S_c (L_contr runs from the second step: the bank is filled without
    FQF) and runs its rounding control, the loop path against itself on another thread count,
    with one loss difference per iteration for both."""
    threads = torch.get_num_threads()
    part = bench.attention_losses_part(torch.device("cpu"), iterations=3)
    assert torch.get_num_threads() == threads  # the control's thread count is undone
    assert part["iterations_with_contr"] == 2 and part["max_contr"] > 0 and part["bank_vectors_at_end"] > 0
    assert len(part["free_differences"]) == len(part["control"]["differences"]) == 3
    assert part["max_abs_loss_difference_free"] == max(part["free_differences"])
    assert f"instead of {threads}" in part["control"]["what"]
    assert part["max_abs_loss_difference_one_step"] < 1e-3


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


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_flops_of_a_convolution_backward_respect_groups(groups):
    """Forward + backward of a convolution (input and weight gradients) is 3 x its forward FLOPs, for
    grouped and depthwise convolutions too (torch's own formula counts the weight gradient as if
    ungrouped: 16x too much at groups = 16)."""
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, stride=2, groups=groups)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    forward = 2 * 2 * 6 * 6 * 16 * (16 // groups) * 9
    assert bench.flops(lambda: conv(x)) == forward
    assert bench.flops(lambda: conv(x).sum().backward()) == 3 * forward
    x.requires_grad_(False)  # only the weight gradient
    assert bench.flops(lambda: conv(x).sum().backward()) == 2 * forward


def test_compile_contrastive_gives_the_same_numbers_in_fused_kernels():
    """Issue #13: ``compile_contrastive`` (torch.compile of eq. (8)-(11) and the bank update) gives
    eager's gradients, BatchNorm statistics and bank, and the bench counts inductor's fused kernels
    among its operators: fewer than eager's."""
    from semiseg.config import load_config
    from semiseg.train import Trainer

    with pytest.raises(ValueError, match="compile_contrastive"):
        load_config("smoke", {"compile_contrastive": True, "attention_impl": "loop"})
    bench.kernel_profile()
    trainers = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = load_config("smoke", {"psi": 8, "compile_contrastive": compiled, "warmup_frac": 0.0, "warmup_beta": 0.0})
        trainers[compiled] = trainer = Trainer(cfg, 4, 12, "cpu")
        bench.fill_bank(trainer, torch.Generator().manual_seed(1))
    tensors = bench.attention_tensors(trainers[False], 32, torch.Generator().manual_seed(2))
    for trainer in trainers.values():
        bench.module_work(trainer, tensors)
    eager, compiled = trainers[False], trainers[True]
    grads = [(p.grad, q.grad) for p, q in zip(eager.student.parameters(), compiled.student.parameters())]
    assert sum(a is not None for a, _ in grads) > 10
    for a, b in grads:
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))
    for key, value in eager.student.state_dict().items():  # BatchNorm statistics of g, q and S_c
        assert torch.allclose(value.double(), compiled.student.state_dict()[key].double(), atol=1e-6), key
    assert torch.equal(eager.bank.count, compiled.bank.count) and torch.allclose(eager.bank.memory, compiled.bank.memory)
    counts = {name: bench.operator_counts(lambda: bench.module_work(t, tensors)) for name, t in trainers.items()}
    assert counts[True]["fused_kernels"] > 0 == counts[False]["fused_kernels"]
    assert counts[True]["ops"] < counts[False]["ops"] / 2
