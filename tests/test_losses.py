"""Eq. (3), (7), (8)-(11) and the alpha weights against direct loop transcriptions of the paper."""

import math

import pytest
import torch

from semiseg import losses


def loop_weighted_ce(logits, target, alpha, beta, ignore=255):
    """Eq. (3) written as the paper writes it: -1/N sum_n sum_c y2 log y1 alpha^c beta^n."""
    B, C, H, W = logits.shape
    probs = torch.softmax(logits.double(), 1)
    total, n = 0.0, 0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                t = int(target[b, i, j])
                if t == ignore:
                    continue
                n += 1
                for c in range(C):
                    y2 = 1.0 if c == t else 0.0
                    total += y2 * math.log(float(probs[b, c, i, j])) * float(alpha[c]) * float(beta[b, i, j])
    return -total / n


def test_weighted_cross_entropy_matches_eq3():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    target[0, 0, :2] = 255
    alpha = torch.rand(4, generator=g) + 0.5
    beta = torch.rand(2, 3, 5, generator=g)
    got = losses.weighted_cross_entropy(logits, target, alpha, beta)
    assert got.item() == pytest.approx(loop_weighted_ce(logits, target, alpha, beta), rel=1e-5)


def test_weighted_cross_entropy_divides_by_pixel_count_not_weight_sum():
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    alpha = torch.tensor([2.0, 4.0])
    # every pixel has -log p = log 2; N = 2, so H = log2 * (2 + 4) / 2
    got = losses.weighted_cross_entropy(logits, target, alpha)
    assert got.item() == pytest.approx(math.log(2) * 3)
    torch_version = torch.nn.functional.cross_entropy(logits, target, weight=alpha)
    assert torch_version.item() != pytest.approx(got.item())


def test_class_balance_weights_sqrt_median_over_frequency():
    counts = torch.tensor([10.0, 40.0, 90.0, 0.0])
    alpha = losses.class_balance_weights(counts)
    f = counts[:3] / counts.sum()
    fm = f.median()  # median of the three seen classes
    for c in range(3):
        assert alpha[c].item() == pytest.approx(math.sqrt(fm / f[c]))
    assert alpha[3].item() == 1.0  # unseen class: documented choice


def test_entropy_loss_matches_eq7():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 2, 2, generator=g)  # A*B = 3 views
    probs = torch.softmax(logits, 1)
    total, n = 0.0, 0
    for b in range(3):
        for i in range(2):
            for j in range(2):
                n += 1
                total += sum(float(probs[b, c, i, j]) * math.log(float(probs[b, c, i, j])) for c in range(5))
    assert losses.entropy_loss(logits).item() == pytest.approx(-total / n, rel=1e-5)
    # not divided by log C (the official code does)
    assert losses.entropy_loss(torch.zeros(1, 5, 1, 1)).item() == pytest.approx(math.log(5))


def test_entropy_gradient_is_finite_where_a_probability_underflows():
    """The bf16 CamVid run died at iteration 85: xlogy(p, p) has gradient 0/0 = NaN at p = 0."""
    logits = torch.tensor([0.0, 120.0, -50.0]).reshape(1, 3, 1, 1).requires_grad_()
    assert float(torch.softmax(logits.detach(), 1).min()) == 0.0
    losses.entropy_loss(logits).backward()
    assert torch.isfinite(logits.grad).all()


def loop_contrastive(pred, labels, memory, pred_scores, memory_scores, C, counts):
    """Eq. (8)-(11) literally, with explicit loops over classes and pairs."""
    total = 0.0
    for c in range(C):
        P = [i for i in range(len(labels)) if labels[i] == c]
        Z = list(range(int(counts[c])))
        if not P or not Z:
            continue
        s_p = sum(float(pred_scores[i]) for i in P)
        s_z = sum(float(memory_scores[c, k]) for k in Z)
        acc = 0.0
        for i in P:
            w_p = len(P) / s_p * float(pred_scores[i])  # Eq. (8)
            for k in Z:
                w_z = len(Z) / s_z * float(memory_scores[c, k])  # Eq. (8) for z'
                p, z = pred[i].double(), memory[c, k].double()
                cos = float(p @ z / (p.norm() * z.norm()))  # Eq. (9)
                acc += w_p * w_z * (1 - cos)  # Eq. (10)
        total += acc / (len(P) * len(Z))  # Eq. (11), inner normalisation
    return total / C  # Eq. (11), 1/C


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_loss_matches_loop_transcription(seed):
    g = torch.Generator().manual_seed(seed)
    C, psi, D, N = 4, 6, 8, 30
    pred = torch.randn(N, D, generator=g)
    labels = torch.randint(0, C, (N,), generator=g)
    labels[:3] = 255
    labels[labels == 3] = 2  # class 3: no prediction vectors
    memory = torch.randn(C, psi, D, generator=g)
    counts = torch.tensor([6, 2, 0, 5])  # class 2: empty memory
    pred_scores = torch.rand(N, generator=g)
    memory_scores = torch.rand(C, psi, generator=g)
    got = losses.contrastive_loss(pred, labels, memory, pred_scores, memory_scores, C, memory_count=counts)
    want = loop_contrastive(pred, labels, memory, pred_scores, memory_scores, C, counts)
    assert got.item() == pytest.approx(want, abs=1e-5)


def test_contrastive_loss_weights_matter_on_memory_side():
    """Memory weights are L1-normalised S_c(z'), not all 1 (the official code's bug)."""
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(10, 4, generator=g)
    labels = torch.zeros(10, dtype=torch.long)
    memory = torch.randn(1, 5, 4, generator=g)
    pred_scores = torch.rand(10, generator=g)
    a = losses.contrastive_loss(pred, labels, memory, pred_scores, torch.rand(1, 5, generator=g), 1)
    b = losses.contrastive_loss(pred, labels, memory, pred_scores, torch.ones(1, 5), 1)
    assert a.item() != pytest.approx(b.item())


def test_contrastive_loss_gradients_reach_vectors_and_scores_not_memory():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(12, 4, generator=g, requires_grad=True)
    scores = torch.rand(12, generator=g, requires_grad=True)
    mem_scores = torch.rand(2, 3, generator=g, requires_grad=True)
    memory = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    labels = torch.arange(12) % 2
    loss = losses.contrastive_loss(pred, labels, memory, scores, mem_scores, 2)
    loss.backward()
    assert pred.grad.abs().sum() > 0 and scores.grad.abs().sum() > 0 and mem_scores.grad.abs().sum() > 0
    assert memory.grad is None


def test_contrastive_loss_zero_when_aligned():
    memory = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    pred = torch.tensor([[3.0, 0.0], [0.5, 0.0]])
    loss = losses.contrastive_loss(pred, torch.zeros(2, dtype=torch.long), memory, torch.rand(2), torch.rand(1, 2), 1)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_vectorised_matches_per_class_reference_on_paper_shapes():
    """Issue 4: the exact no-N x psi form agrees with the per-class loop (C=19, psi=256, D=256)."""
    from semiseg.reference import contrastive_loss_loop

    g = torch.Generator().manual_seed(5)
    C, psi, D, N = 19, 256, 256, 4096
    pred = torch.randn(N, D, generator=g, requires_grad=True)
    labels = torch.randint(0, C, (N,), generator=g)
    memory = torch.randn(C, psi, D, generator=g)
    counts = torch.randint(0, psi + 1, (C,), generator=g)
    pred_scores = torch.rand(N, generator=g, requires_grad=True)
    memory_scores = torch.rand(C, psi, generator=g, requires_grad=True)
    fast = losses.contrastive_loss(pred, labels, memory, pred_scores, memory_scores, C, memory_count=counts)
    grads_fast = torch.autograd.grad(fast, (pred, pred_scores, memory_scores))
    slow = contrastive_loss_loop(pred, labels, memory, pred_scores, memory_scores, C, memory_count=counts)
    grads_slow = torch.autograd.grad(slow, (pred, pred_scores, memory_scores))
    assert fast.item() == pytest.approx(slow.item(), abs=1e-5)
    for a, b in zip(grads_fast, grads_slow):
        assert torch.allclose(a, b, atol=1e-5)


def test_weighted_unit_sum_gradient_is_exact():
    """The hand-written backward of the memory-light class sum, against finite differences."""
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(12, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (12,), generator=g)
    assert torch.autograd.gradcheck(lambda p, w: losses._WeightedUnitSum.apply(p, w, labels, 4), (pred, weights))
    expected = torch.zeros(4, 5, dtype=torch.float64).index_add_(0, labels, weights[:, None] * torch.nn.functional.normalize(pred, dim=1))
    assert torch.allclose(losses._WeightedUnitSum.apply(pred, weights, labels, 4), expected)


def test_contrastive_loss_excludes_ignore_label_vectors_as_gathering_them_out_did():
    """Issue #13: the trainer passes every pixel vector, ignore-label (255) ones included with score
    0. The loss and the gradients of the other vectors are those of the gathered valid vectors; the
    ignored vectors get no gradient, whatever their values and scores."""
    g = torch.Generator().manual_seed(6)
    C, psi, D, N = 5, 7, 8, 60
    pred = torch.randn(N, D, generator=g)
    labels = torch.randint(0, C, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = 255
    keep = labels != 255
    memory = torch.randn(C, psi, D, generator=g)
    counts = torch.tensor([7, 3, 0, 5, 1])
    scores = torch.rand(N, generator=g)
    mem_scores = torch.rand(C, psi, generator=g)
    everything = [pred.clone().requires_grad_(), scores.clone().requires_grad_()]
    everything[1].data[~keep] = 5.0  # whatever an ignored vector's score is
    gathered = [pred[keep].clone().requires_grad_(), scores[keep].clone().requires_grad_()]
    a = losses.contrastive_loss(everything[0], labels, memory, everything[1], mem_scores, C, memory_count=counts)
    b = losses.contrastive_loss(gathered[0], labels[keep], memory, gathered[1], mem_scores, C, memory_count=counts)
    assert a.item() == pytest.approx(b.item(), abs=1e-6) and b.item() > 0
    a.backward(), b.backward()
    for full, part in zip(everything, gathered):
        assert torch.allclose(full.grad[keep], part.grad, atol=1e-6)
        assert (full.grad[~keep] == 0).all()
