"""Issue #13: the class-wise attention S_c (§3.4, §4.2) as one batched computation, against the
per-class loop it replaced (``semiseg.reference.ClassAttentionLoop``); masked BatchNorm; old checkpoints."""

import copy

import pytest
import torch

from semiseg.models import MLPHead, build_model
from semiseg.models.heads import (ClassAttention, SegmentBatchNorm, freeze_absent_classes, grouped_mm_available,
                                  pixel_linear)
from semiseg.reference import ClassAttentionLoop, use_loop_attention

from conftest import randomised_attention


def _pair(C, D, hidden=None, seed=0):
    return randomised_attention(C, D, hidden, seed)


def _stacked_grads(loop, C):
    """The per-class parameter gradients of the reference, stacked as ClassAttention's (0: no gradient)."""
    def g(c, name):
        p = dict(loop.modules_per_class[c].named_parameters())[name]
        return torch.zeros_like(p) if p.grad is None else p.grad
    return {"weight1": torch.stack([g(c, "fc1.weight").T for c in range(C)]),
            "bias1": torch.stack([g(c, "fc1.bias") for c in range(C)]),
            "bn_weight": torch.stack([g(c, "bn.weight") for c in range(C)]),
            "bn_bias": torch.stack([g(c, "bn.bias") for c in range(C)]),
            "weight2": torch.stack([g(c, "fc2.weight")[0] for c in range(C)]),
            "bias2": torch.stack([g(c, "fc2.bias")[0] for c in range(C)])}


def _close(got, want, tol=1e-5, what=""):
    """|got - want| <= tol x max(1, max |want|): 1e-5 relative to the tensor's scale (a gradient summed
    over thousands of vectors carries rounding of that order times its largest entry)."""
    got, want = got.detach(), want.detach()
    bound = tol * max(1.0, float(want.abs().max())) if want.numel() else tol
    err = float((got.float() - want.float()).abs().max()) if want.numel() else 0.0
    assert got.shape == want.shape and err <= bound, f"{what}: max |difference| {err:.2e} > {bound:.2e}"


def _labels(N, C, seed):
    """Labels of N vectors in C classes: class C-2 holds a single vector, class C-1 none."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C - 2, (N,), generator=g)
    labels[N // 3] = C - 2
    return labels


def _compare(C, N, D, training, seed=0, invalid=0.0):
    att, loop = _pair(C, D, seed=seed)
    att.train(training), loop.train(training)
    g = torch.Generator().manual_seed(seed + 1)
    labels = _labels(N, C, seed)
    vectors = torch.randn(N, D, generator=g)
    valid = torch.rand(N, generator=g) >= invalid
    valid[N // 3] = True  # the lone vector of class C-2 stays
    labels = torch.where(valid, labels, 255)  # invalid vectors carry the ignore label
    x = vectors.clone().requires_grad_()
    scores = att(x, labels, valid)
    weights = torch.randn(N, generator=g)
    (scores * weights).sum().backward()
    xr = vectors[valid].clone().requires_grad_()
    ref = loop(xr, labels[valid])
    (ref * weights[valid]).sum().backward()
    _close(scores[valid], ref, what="scores")
    assert (scores[~valid] == 0).all()
    _close(x.grad[valid], xr.grad, what="input gradient")
    assert (x.grad[~valid] == 0).all()
    for name, grad in _stacked_grads(loop, C).items():
        # with batch statistics d bias1 is 0 in exact arithmetic (BatchNorm removes the class mean): both
        # sides are the rounding noise of a sum over ~N / C cancelling terms, so a looser bound
        _close(getattr(att, name).grad, grad, 1e-4 if name == "bias1" and training else 1e-5, f"d {name}")
    converted = ClassAttention(C, D, D)
    converted.load_state_dict(loop.state_dict())  # the reference's statistics after the call
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _close(getattr(att, name), getattr(converted, name), what=name)
    return att, loop


def _linears(monkeypatch, grouped):
    """The Linears of S_c by torch._grouped_mm (skipped where this torch lacks it) or per-tile bmm."""
    if grouped and not grouped_mm_available("cpu", torch.float32):
        pytest.skip("this torch has no torch._grouped_mm on the CPU")
    monkeypatch.setattr(ClassAttention, "grouped_mm", grouped)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "bmm"])
@pytest.mark.parametrize("training", [True, False])
def test_batched_equals_per_class_loop(training, grouped, monkeypatch):
    """Values, input and parameter gradients and updated running statistics at C = 19, D = 256,
    with a one-vector class, an absent class and ignore-label vectors marked invalid; the Linears
    by torch._grouped_mm and by per-tile weights."""
    _linears(monkeypatch, grouped)
    att, _ = _compare(19, 6000, 256, training, invalid=0.1)
    if training:  # the lone vector used the running statistics and left them; the absent class is untouched
        assert att.num_batches_tracked.tolist() == [1] * 17 + [0, 0]
        assert torch.equal(att.running_var[17:], _pair(19, 256)[0].running_var[17:])


def test_batched_equals_per_class_loop_at_paper_size():
    """N = 38K vectors (a 512 x 512 pair of images at stride 8 with two strong views), D = 256, C = 19."""
    _compare(19, 38_000, 256, True, seed=3)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "bmm"])
def test_invalid_vectors_are_never_read(grouped, monkeypatch):
    """Invalid vectors may hold anything (here NaN): scores 0, gradient 0, statistics unchanged."""
    _linears(monkeypatch, grouped)
    att, loop = _pair(5, 16, seed=4)
    att.train(), loop.train()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 16, generator=g)
    labels = torch.randint(0, 5, (70,), generator=g)
    valid = torch.rand(70, generator=g) > 0.3
    x[~valid] = float("nan")
    x.requires_grad_()
    out = att(x, labels, valid)
    out.sum().backward()
    assert torch.isfinite(out).all() and (out[~valid] == 0).all()
    assert torch.isfinite(x.grad).all() and (x.grad[~valid] == 0).all()
    torch.testing.assert_close(out[valid], loop(x.detach()[valid], labels[valid]), atol=1e-6, rtol=1e-5)
    assert torch.isfinite(att.running_mean).all()
    everything_invalid = att(torch.randn(9, 16), torch.zeros(9, dtype=torch.long), torch.zeros(9, dtype=torch.bool))
    assert torch.equal(everything_invalid, torch.zeros(9))


@pytest.mark.parametrize("training", [True, False])
def test_per_class_layout_equals_the_flat_call(training):
    """``per_class`` on [C, M, dim] (the bank's slots, some empty) gives the scores, gradients and
    running statistics of ``forward`` on the same vectors flattened with class-major labels, and 0
    for the empty slots; a class with one valid slot and a class with none included."""
    C, M, D = 7, 12, 16
    att, _ = _pair(C, D, seed=3)
    att.train(training)
    flat = copy.deepcopy(att)
    torch.manual_seed(4)
    vectors = torch.randn(C, M, D, requires_grad=True)
    valid = torch.rand(C, M) < 0.7
    valid[2] = False
    valid[3] = False
    valid[3, 5] = True
    got = att.per_class(vectors, valid)
    labels = torch.arange(C).repeat_interleave(M)
    want = flat(vectors.reshape(-1, D), labels, valid.reshape(-1)).view(C, M)
    _close(got, want, what="scores")
    assert (got[~valid] == 0).all()
    weights = torch.randn(C, M)
    grad_got = torch.autograd.grad((got * weights).sum(), [vectors, *att.parameters()])
    grad_want = torch.autograd.grad((want * weights).sum(), [vectors, *flat.parameters()])
    for (name, _), a, b in zip([("vectors", None), *att.named_parameters()], grad_got, grad_want):
        _close(a, b, what=name)
    for name, buf in att.named_buffers():
        _close(buf.float(), dict(flat.named_buffers())[name].float(), what=name)
    assert torch.equal(att.used, valid.any(1)) and torch.equal(flat.used, valid.any(1))
    with pytest.raises(ValueError, match=r"expected vectors \[7, M, 16\]"):
        att.per_class(vectors[:5], valid[:5])


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "bmm"])
def test_batched_operators_do_not_depend_on_the_class_count(grouped, monkeypatch):
    """The same sequence of operators called from Python and autograd for C = 3 and C = 11 (the
    loop's grows with C). With per-tile weights even the operators they call inside are the same;
    the CPU's ``_grouped_mm`` runs one ``mm`` per class inside itself."""
    from torch.profiler import ProfilerActivity, profile

    _linears(monkeypatch, grouped)

    def outermost(e):
        while (e := e.cpu_parent) is not None:
            if e.name.startswith("aten::"):
                return False
        return True

    def names(C, nested):
        att = ClassAttention(C, 8, 8).train()
        x, labels = torch.randn(200, 8), torch.arange(200) % C
        att(x, labels).sum().backward()  # once first: the grouped_mm probe
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            att(x, labels).sum().backward()
        return [e.name for e in prof.events() if e.name.startswith("aten::") and (nested or outermost(e))]

    assert names(3, False) == names(11, False)
    if not grouped:
        assert names(3, True) == names(11, True)


def test_same_initial_weights_as_separate_modules():
    """A seed draws the same S_c weights as C separate modules did before issue #13."""
    torch.manual_seed(7)
    loop = ClassAttentionLoop(6, 16, 8)
    torch.manual_seed(7)
    att = ClassAttention(6, 16, 8)
    converted = ClassAttention(6, 16, 8)
    converted.load_state_dict(loop.state_dict())
    for name, value in att.state_dict().items():
        assert torch.equal(value, converted.state_dict()[name]), name
    back = ClassAttentionLoop.from_stacked(att)
    for name, value in loop.state_dict().items():
        assert torch.equal(value, back.state_dict()[name]), name


def test_old_checkpoint_of_a_model_loads_with_the_same_scores():
    """A SegModel state dict with per-class keys (``attention_pred.modules_per_class.{c}.fc1.weight``
    ...) loads into the stacked model, which then scores like the per-class reference."""
    torch.manual_seed(0)
    old = use_loop_attention(build_model("effnet_lite0_dlv3p", 4, pretrained=False))
    with torch.no_grad():
        for mod in [*old.attention_pred.modules_per_class, *old.attention_proj.modules_per_class]:
            mod.bn.running_mean.uniform_(-1, 1)
            mod.fc2.bias.uniform_(-1, 1)
    state = old.state_dict()
    assert "attention_pred.modules_per_class.3.bn.num_batches_tracked" in state
    new = build_model("effnet_lite0_dlv3p", 4, pretrained=False)
    new.load_state_dict(state)
    assert not any("modules_per_class" in k for k in new.state_dict())
    x, labels = torch.randn(50, 256), torch.randint(0, 4, (50,))
    old.eval(), new.eval()
    with torch.no_grad():
        for name in ("attention_pred", "attention_proj"):
            torch.testing.assert_close(getattr(new, name)(x, labels), getattr(old, name)(x, labels), atol=1e-6, rtol=0)
    del state["attention_proj.modules_per_class.2.fc1.bias"]  # an incomplete old state dict is refused
    with pytest.raises(RuntimeError, match="modules_per_class"):
        build_model("effnet_lite0_dlv3p", 4, pretrained=False).load_state_dict(state)


def test_attention_is_in_the_new_layers_group():
    m = build_model("effnet_lite0_dlv3p", 4, pretrained=False)
    new = {id(p) for p in m.param_groups(0.01, 10)[1]["params"]}
    for att in (m.attention_pred, m.attention_proj):
        assert [n for n, _ in att.named_parameters()] == ["weight1", "bias1", "bn_weight", "bn_bias", "weight2", "bias2"]
        assert {id(p) for p in att.parameters()} <= new


def test_sgd_leaves_absent_classes_alone_like_separate_modules():
    """Weight decay and momentum do not move the S_c of a class absent from a step (as with C
    separate modules, which had no gradient then)."""
    att, loop = _pair(4, 8, seed=2)
    att.train(), loop.train()
    opt = torch.optim.SGD(att.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    opt_loop = torch.optim.SGD(loop.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    for present in ([0, 1, 2], [0, 1], [0, 3], [1, 2, 3]):
        labels = torch.tensor(present).repeat(6)
        x = torch.randn(len(labels), 8, generator=g)
        for module, optimizer in ((att, opt), (loop, opt_loop)):
            optimizer.zero_grad(set_to_none=True)
            module(x, labels).pow(2).sum().backward()
            with freeze_absent_classes(module, optimizer):
                optimizer.step()
    converted = ClassAttention(4, 8, 8)
    converted.load_state_dict(loop.state_dict())
    for name, value in converted.state_dict().items():
        torch.testing.assert_close(att.state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert att.used is None  # reset for the next step


@pytest.mark.parametrize("training", [True, False])
def test_segment_batch_norm_gradient_is_exact(training):
    """The hand-written backward against finite differences: a segment of one row, an empty one
    and invalid rows included."""
    g = torch.Generator().manual_seed(0)
    G, T, F, S = 5, 3, 4, 4
    h = torch.randn(G, T, F, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(S, F, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(S, F, generator=g, dtype=torch.float64, requires_grad=True)
    seg = torch.tensor([0, 0, 1, 2, 2])
    valid = torch.ones(G, T, 1, dtype=torch.float64)
    valid[1, 2] = 0
    valid[2, 1:] = 0  # segment 1: one valid row
    valid[4] = 0
    member = (seg[None] == torch.arange(S)[:, None]).double()
    n = member @ valid.sum((1, 2))  # segment 3: empty

    def bn(h, w, b):
        stats = (torch.zeros(S, F, dtype=torch.float64), torch.ones(S, F, dtype=torch.float64),
                 torch.zeros(S, dtype=torch.long))
        return SegmentBatchNorm.apply(h, w, b, *stats, seg, valid, member, n, training)

    assert torch.autograd.gradcheck(bn, (h, w, b))


def test_mlp_head_with_valid_mask_equals_the_head_on_the_valid_rows():
    """g and q on all pixel vectors with ignore-label ones invalid: the same numbers (values,
    gradients, running statistics) as on the gathered valid vectors, including 1 and 0 valid rows."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    for n_valid in (40, 1, 0):
        head = MLPHead(16, 8).train()
        ref = copy.deepcopy(head)
        x = torch.randn(60, 16, generator=g, requires_grad=True)
        valid = torch.zeros(60, dtype=torch.bool)
        valid[torch.randperm(60, generator=g)[:n_valid]] = True
        out = head(x, valid)
        xr = x.detach()[valid].requires_grad_()
        want = ref(xr)
        torch.testing.assert_close(out[valid], want, atol=1e-5, rtol=1e-5)
        weights = torch.randn(60, 8, generator=g) * valid[:, None]
        (out * weights).sum().backward()
        (want * weights[valid]).sum().backward()
        torch.testing.assert_close(x.grad[valid], xr.grad, atol=1e-5, rtol=1e-5)
        assert (x.grad[~valid] == 0).all()
        for (name, p), q in zip(head.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{n_valid} {name}: {m}")
        for (name, b), c in zip(head.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b, c, atol=1e-6, rtol=1e-5, msg=lambda m: f"{n_valid} {name}: {m}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("batch", [1, 3])
def test_pixel_linear_equals_a_linear_on_the_pixel_vectors(layout, batch):
    """g's first Linear read on the map in place: the values and gradients of ``F.linear`` on
    ``pixels_to_vectors``' copy, and the map's gradient in the map's own layout (no transposition
    left for the backbone's backward)."""
    from semiseg.train import pixels_to_vectors

    g = torch.Generator().manual_seed(batch)
    feats = torch.randn(batch, 24, 5, 7 if layout != "strided" else 14, generator=g)
    if layout == "channels_last":
        feats = feats.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        feats = feats[..., ::2]  # neither layout: read through a contiguous copy
    feats.requires_grad_()
    weight = torch.randn(10, 24, generator=g, requires_grad=True)
    bias = torch.randn(10, generator=g, requires_grad=True)
    out = pixel_linear(feats, weight, bias)
    ref_feats, ref_weight, ref_bias = (t.detach().clone().requires_grad_() for t in (feats, weight, bias))
    vectors, _, _ = pixels_to_vectors(ref_feats, torch.zeros(batch, 5, 7, dtype=torch.long))
    want = torch.nn.functional.linear(vectors, ref_weight, ref_bias)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    up = torch.randn(out.shape, generator=g)
    # autograd.grad returns the gradients as computed (a leaf's .grad is re-laid out like the leaf)
    grads = torch.autograd.grad(out, (feats, weight, bias), up)
    wants = torch.autograd.grad(want, (ref_feats, ref_weight, ref_bias), up)
    for got, ref in zip(grads, wants):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if layout == "channels_last":
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
    elif layout == "contiguous":
        assert grads[0].is_contiguous()
    with pytest.raises(ValueError, match=r"\[B, 24, h, w\]"):
        pixel_linear(feats.detach()[:, :20], weight, bias)


def test_mlp_head_on_a_feature_map_equals_the_head_on_its_pixel_vectors():
    """g on [B, D, h, w] (what the trainer passes) and on the copied [B*h*w, D] vectors, with a
    valid mask and without: the same outputs, gradients and running statistics."""
    from semiseg.train import pixels_to_vectors

    torch.manual_seed(0)
    for masked in (True, False):
        head = MLPHead(16, 8).train()
        ref = copy.deepcopy(head)
        feats = torch.randn(2, 16, 3, 4, requires_grad=True)
        vectors, _, _ = pixels_to_vectors(feats, torch.zeros(2, 3, 4, dtype=torch.long))
        valid = (torch.arange(24) % 5 != 0) if masked else None
        out, want = head(feats, valid), ref(vectors, valid)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        out.square().sum().backward()
        grad = feats.grad.clone()
        feats.grad = None
        want.square().sum().backward()
        torch.testing.assert_close(grad, feats.grad, atol=1e-5, rtol=1e-5)
        for p, q in zip(head.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)
        for b, c in zip(head.buffers(), ref.buffers()):
            torch.testing.assert_close(b, c)
    with pytest.raises(ValueError, match=r"valid must be a \[24\] mask"):
        head(feats, torch.ones(23, dtype=torch.bool))


# ----------------------------------------------------------------------------- the trainer's two paths
def _smoke_trainer(impl):
    from semiseg.config import load_config
    from semiseg.data.sampling import Batches
    from semiseg.train import Trainer, build_train_data, seed_everything

    cfg = load_config("smoke", {"fqf": False, "warmup_frac": 0.0, "warmup_beta": 0.0, "attention_impl": impl})
    seed_everything(cfg.seed)
    labeled, unlabeled, _ = build_train_data(cfg)
    trainer = Trainer(cfg, labeled.num_classes, len(labeled), "cpu")
    lab = Batches(labeled, 2, cfg.base_size, cfg.crop_size, 1)
    unl = Batches(unlabeled, 2, cfg.base_size, cfg.crop_size, 2)
    return trainer, lambda it: (lab(it), unl(it))


def test_training_steps_give_the_same_losses_with_both_attention_paths():
    """``attention_impl: batched`` (fixed shapes, valid masks) and ``loop`` (gathered vectors, C
    modules; the code before issue #13) from one seed: the same loss terms. Three steps: the bank
    fills at the first, L_contr runs with S_c on pixels and bank slots at the next two. (Later
    steps of this tiny untrained network amplify rounding: a 1e-7 change of one weight tensor
    moves the loss by 1e-3 two steps on.)"""
    losses = {}
    for impl in ("loop", "batched"):
        trainer, batch = _smoke_trainer(impl)
        assert isinstance(trainer.student.attention_pred, ClassAttentionLoop if impl == "loop" else ClassAttention)
        losses[impl] = [trainer.step(*batch(it)) for it in range(3)]
    assert losses["batched"][2]["contr"] > 0
    for a, b in zip(losses["loop"], losses["batched"]):
        assert a.keys() == b.keys()
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-4, (k, a[k], b[k])


def test_resume_from_an_old_format_checkpoint_converts_the_optimizer_state(tmp_path):
    """A checkpoint written with C separate modules per S_c (the loop path writes the old format):
    weights and SGD momentum are converted, and the next step equals the old code's step."""
    loop, batch = _smoke_trainer("loop")
    for it in range(3):
        loop.step(*batch(it))
    state = copy.deepcopy(loop.state_dict())
    assert any(".modules_per_class." in k for k in state["student"])
    batched, _ = _smoke_trainer("batched")
    batched.load_state_dict(copy.deepcopy(state), tmp_path / "iter0000003.pt")
    momentum = {id(p): s["momentum_buffer"] for p, s in batched.optimizer.state.items()}
    att = batched.student.attention_pred
    assert momentum[id(att.weight1)].shape == att.weight1.shape
    ref = loop.student.attention_pred.modules_per_class
    assert torch.equal(momentum[id(att.weight1)][0], loop.optimizer.state[ref[0].fc1.weight]["momentum_buffer"].T)
    rng = torch.get_rng_state()  # the checkpoint's (restored by load_state_dict): dropout draws alike
    a = loop.step(*batch(3))
    torch.set_rng_state(rng)
    b = batched.step(*batch(3))
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-5, (k, a[k], b[k])
    for name, p in batched.student.attention_proj.named_parameters():
        c = 1
        q = dict(loop.student.attention_proj.modules_per_class[c].named_parameters())
        old = {"weight1": q["fc1.weight"].T, "bias1": q["fc1.bias"], "bn_weight": q["bn.weight"],
               "bn_bias": q["bn.bias"], "weight2": q["fc2.weight"][0], "bias2": q["fc2.bias"][0]}[name]
        _close(p[c], old.detach(), 1e-5, name)
    # an optimizer state that does not fit is one line naming the file
    state["optimizer"]["param_groups"][1]["params"] = state["optimizer"]["param_groups"][1]["params"][:-3]
    fresh, _ = _smoke_trainer("batched")
    with pytest.raises(ValueError, match=r"iter0000003\.pt: .*evaluate or predict from it.*or restart") as err:
        fresh.load_state_dict(state, tmp_path / "iter0000003.pt")
    assert "\n" not in str(err.value)
