"""§3.1–3.4: the four terms of eq. (1) — weighted cross-entropy (eq. 3), used by L_sup (eq. 4)
and L_pseudo (eq. 6); entropy minimisation (eq. 7); and the class-wise contrastive loss (eq. 8–11).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fp32_or_wider(t):
    """``t`` in fp32, or as it is when wider (fp64): losses are computed in fp32 under bf16 autocast,
    and a float64 run (a numerics check, ``semiseg.bench --parts attention_losses``) stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def class_histogram(labels, num_bins):
    """Counts of each value 0..num_bins-1 in ``labels`` (int64), computed on the labels' device.

    Same result as ``torch.bincount(labels, minlength=num_bins)`` for values in range, but
    ``torch.bincount`` on CUDA reads the input's maximum back to the host to size its output (a
    synchronisation every call); ``index_add_`` into a fixed-size vector does not.
    """
    labels = labels.reshape(-1).long()
    counts = torch.zeros(num_bins, dtype=torch.long, device=labels.device)
    return counts.index_add_(0, labels, torch.ones_like(labels))


def weighted_cross_entropy(logits, target, class_weights=None, pixel_weights=None, ignore_index=255):
    """Eq. (3): ``H(y1, y2) = -1/N sum_n sum_c y2[n,c] log y1[n,c] alpha[c] beta[n]``.

    ``logits`` [B, C, H, W]; ``target`` [B, H, W] class indices (one-hot y2); ``class_weights``
    alpha [C]; ``pixel_weights`` beta [B, H, W]. N is the number of non-ignored pixels — not the
    sum of the weights, which is what ``F.cross_entropy(weight=...)`` would divide by.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    log_probs = F.log_softmax(fp32_or_wider(logits), dim=1)
    nll = -log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)  # [B, H, W]
    weights = valid.to(nll.dtype)
    if class_weights is not None:
        weights = weights * class_weights.to(nll)[safe_target]
    if pixel_weights is not None:
        weights = weights * pixel_weights.to(nll)
    # Eq. (3)
    return (nll * weights).sum() / valid.sum().clamp(min=1)


def class_balance_weights(counts):
    """§4.2: ``alpha_c = sqrt(f_m / f_c)``, f_c the frequency of class c, f_m the median frequency.

    *Choice* (the paper is silent): classes never seen yet (count 0) get alpha = 1, and the
    median is taken over the classes that have been seen.
    """
    counts = counts.float()
    seen = counts > 0
    freqs = counts / counts.sum().clamp(min=1)
    median = torch.where(seen, freqs, torch.full_like(freqs, float("nan"))).nanmedian()
    alpha = torch.sqrt(median / freqs.clamp(min=1e-12))
    return torch.where(seen, alpha, torch.ones_like(alpha))


def entropy_loss(logits):
    """Eq. (7): ``-1/N sum_n sum_c p log p`` (natural log), mean over all pixels, ``p = softmax(logits)``
    for ``logits`` [B, C, H, W].

    Stacking the A strong views along B gives the 1/A average of eq. (7).
    The official code divides by log C as well; the paper does not.
    ``log p`` is taken as ``log_softmax(logits)``, not as the log of the probabilities: where a
    probability underflows to 0 (a logit gap above ~100, which bf16 training reached on CamVid at
    iteration 85), ``p log p`` has the finite gradient it should instead of 0 * inf = NaN.
    """
    logits = fp32_or_wider(logits)
    # Eq. (7)
    return -(F.softmax(logits, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _l1_normalised(scores, labels, num_classes):
    """Eq. (8): ``w = N_Pc / sum_{i in Pc} S_c(p_i) * S_c(p)`` for each vector's class c; mean 1 per class."""
    counts = class_histogram(labels, num_classes).to(scores.dtype)
    sums = torch.zeros(num_classes, dtype=scores.dtype, device=scores.device).index_add_(0, labels, scores)
    # Eq. (8)
    return scores * (counts / sums.clamp(min=1e-12))[labels]


class _WeightedUnitSum(torch.autograd.Function):
    """``out[c] = sum_{n: labels[n] = c} weights[n] * pred[n] / |pred[n]|`` without an N x D temporary.

    The sum is one matmul with a [bins, N] matrix holding ``weights / |pred|`` (bins = C + 1 << D),
    and the backward writes the gradient of ``pred`` into a single N x D buffer, in place. Autograd
    through ``F.normalize`` and ``index_add_`` would keep two more N x D tensors alive: at the
    paper's shape (N ~ 38K, D = psi = 256) each is as large as the N x psi matrix we avoid.
    """

    @staticmethod
    def forward(ctx, pred, weights, labels, bins):
        inv_norm = pred.norm(dim=1).clamp(min=1e-12).reciprocal()
        rows = torch.zeros(bins, pred.shape[0], dtype=pred.dtype, device=pred.device)
        rows[labels, torch.arange(pred.shape[0], device=pred.device)] = weights * inv_norm
        ctx.save_for_backward(pred, weights, labels, inv_norm, rows)
        return rows @ pred

    @staticmethod
    def backward(ctx, grad_out):
        pred, weights, labels, inv_norm, rows = ctx.saved_tensors
        n = torch.arange(pred.shape[0], device=pred.device)
        dot = (pred @ grad_out.T)[n, labels]  # p_n . g_c(n), via an N x bins matrix
        grad_pred = rows.T @ grad_out  # (w_n / |p_n|) g_c(n)
        # d(p/|p|)/dp = (I - u u^T) / |p|: subtract w_n (p_n . g) / |p_n|^3 * p_n, in place
        grad_pred.addcmul_(pred, (weights * dot * inv_norm ** 3)[:, None], value=-1)
        return grad_pred, dot * inv_norm, None, None


def contrastive_loss(pred, labels, memory, pred_scores, memory_scores, num_classes, memory_count=None, ignore_index=255):
    """Eq. (8)–(11): positive-only, class-wise contrastive loss against the memory bank.

    ``pred`` [N, D] student prediction vectors p; ``labels`` [N] their (pseudo-)labels;
    ``memory`` [C, psi, D] teacher projection vectors z' (newest first); ``pred_scores`` [N] =
    S_c(p) for each vector's own class; ``memory_scores`` [C, psi] = S_c(z'); ``memory_count`` [C]
    valid entries per class (default: all psi).

    Because eq. (10) is linear in the cosine and the weights of eq. (8) sum to N_Pc (and N_Z'c),

        1/(N_Pc N_Z'c) sum_p sum_z w_p w_z (1 - cos(p, z))  =  1 - <pbar_c, zbar_c>,

    with ``pbar_c = 1/N_Pc sum_p w_p p/|p|`` and ``zbar_c = 1/N_Z'c sum_z w_z z/|z|``: the loss is
    exact without ever building the N x psi similarity matrix. Classes with no vectors on either
    side add nothing; the sum is divided by C = ``num_classes`` exactly as eq. (11) is written.
    The memory side is never differentiated (it holds teacher vectors); its weights are.
    Computed in fp32 whatever the autocast state (bf16 runs included).
    """
    with torch.autocast(pred.device.type, enabled=False):
        return _contrastive_loss(pred, labels, memory, pred_scores, memory_scores, num_classes, memory_count,
                                 ignore_index)


def _contrastive_loss(pred, labels, memory, pred_scores, memory_scores, num_classes, memory_count, ignore_index):
    C, psi, _ = memory.shape
    if memory_count is None:
        memory_count = torch.full((C,), psi, dtype=torch.long, device=memory.device)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    labels = torch.where(valid, labels, torch.full_like(labels, num_classes))  # extra bin C = dropped
    pred_scores = pred_scores * valid

    # Eq. (8), prediction side (per-class L1 normalisation, mean weight 1)
    w_pred = _l1_normalised(pred_scores, labels, num_classes + 1)
    # Eq. (8), memory side, over the memory_count[c] valid slots of each class
    slot_valid = torch.arange(psi, device=memory.device)[None, :] < memory_count[:, None]  # [C, psi]
    mem_scores = memory_scores * slot_valid
    n_mem = memory_count.to(mem_scores.dtype)
    w_mem = mem_scores * (n_mem / mem_scores.sum(1).clamp(min=1e-12))[:, None]

    # Eq. (9) cosine = dot product of unit vectors; weighted class means of eq. (10)-(11)
    pred = fp32_or_wider(pred)
    pred_sum = _WeightedUnitSum.apply(pred, w_pred.to(pred.dtype), labels, num_classes + 1)
    n_pred = class_histogram(labels, num_classes + 1)[:num_classes].to(pred_sum.dtype)
    pred_mean = pred_sum[:num_classes] / n_pred.clamp(min=1)[:, None]
    # memory side as a batched matmul [C, 1, psi] @ [C, psi, D]: no C x psi x D temporary
    memory = fp32_or_wider(memory.detach())
    mem_coef = w_mem / memory.norm(dim=2).clamp(min=1e-12)
    mem_mean = torch.bmm(mem_coef.unsqueeze(1), memory).squeeze(1) / n_mem.clamp(min=1)[:, None]
    present = (n_pred > 0) & (n_mem > 0)
    # Eq. (10)-(11): mean weighted distance per class, summed over classes, divided by C
    per_class = (1.0 - (pred_mean * mem_mean).sum(1)) * present
    return per_class.sum() / num_classes
