"""Projection / prediction heads and class-wise attention modules (paper §3.4, §4.2).

* :class:`MLPHead` -- g (projection) and q (prediction), following BYOL [14]:
  ``Linear(256) -> BatchNorm -> ReLU -> Linear(256)``.
* :class:`ClassAttention` -- the C class-specific attention modules S_c:
  ``Linear(256) -> BatchNorm -> LeakyReLU -> Linear(1) -> Sigmoid``; a SegModel
  owns two of them (one for prediction vectors p, one for projection vectors z'),
  i.e. the paper's 2 x N_classes modules. The C modules' weights are stored stacked and
  run as one batched computation (issue #13); :class:`semiseg.reference.ClassAttentionLoop`
  is the per-class loop it replaces, kept as the reference.

Both operate on flat vectors ``[N, dim]`` (pixels already gathered by the caller), and both take
an optional ``valid`` mask ``[N]``: invalid vectors (ignore-label pixels, empty bank slots) are
left out of every BatchNorm statistic, so a caller can pass fixed-size tensors and never gather
with a length read back from the device.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SegmentBatchNorm(torch.autograd.Function):
    """``nn.BatchNorm1d`` applied separately to each segment of the rows of ``h``, with static shapes.

    ``h`` [G, T, F]: rows in G groups of T, each group inside one segment ``seg`` [G] (0..S-1);
    ``valid`` [G, T, 1] float (1: the row counts in the statistics); ``member`` [S, G] float
    (group g is in segment s); ``n`` [S] float: valid rows per segment. ``weight``, ``bias``,
    ``running_mean``, ``running_var`` [S, F]; ``num_batches_tracked`` [S] (or [] for S = 1).

    In training a segment with n >= 2 valid rows is normalised with its (biased) batch statistics
    and updates its running statistics exactly as ``nn.BatchNorm1d`` (unbiased variance,
    ``momentum``); a segment with one valid row is normalised with the running statistics and
    leaves them alone (``F.batch_norm(training=False)``, what C separate modules did); an empty
    one is untouched (with ``count_empty`` its ``num_batches_tracked`` still counts, as
    ``nn.BatchNorm1d`` on an empty batch does). In eval every segment uses the running statistics.
    Invalid rows are normalised like the others but add nothing to a statistic. No host sync.

    The backward is written out (BatchNorm's gradient per segment) so that forward and backward
    are a few operators whatever S is: with ``xhat = (h - mean) / sqrt(var + eps)`` and
    ``scale = weight / sqrt(var + eps)``, ``d bias = sum dy``, ``d weight = sum dy xhat`` over
    the segment's rows, and ``dh = scale (dy - valid (d bias + xhat d weight) / n)`` for a segment
    normalised with batch statistics (``dh = scale dy`` for the others).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, running_mean, running_var, num_batches_tracked, seg, valid, member, n,
                training, momentum=0.1, eps=1e-5, count_empty=False):
        if training:
            batch = n >= 2
            member_n = member / n.clamp(min=1)[:, None]  # segment means as one matmul
            mean = member_n @ (h * valid).sum(1)  # [S, F]
            d = h - mean[seg].unsqueeze(1)
            var = member_n @ (d * d * valid).sum(1)  # biased, two-pass
            # running statistics: momentum for segments of >= 2 rows, 0 (exactly unchanged) for the others
            rate = (batch * momentum).to(mean.dtype)[:, None]
            running_mean.lerp_(mean, rate)
            running_var.lerp_(var * (n / (n - 1).clamp(min=1))[:, None], rate)  # unbiased variance
            counted = (batch | (n == 0)) if count_empty else batch
            num_batches_tracked.add_(counted.reshape(num_batches_tracked.shape).to(num_batches_tracked.dtype))
            keep = batch[:, None]
            mean, var = torch.where(keep, mean, running_mean), torch.where(keep, var, running_var)
            coef = torch.where(keep, 1 / n.clamp(min=1)[:, None], 0.0)  # backward: 1/n where batch statistics
        else:
            mean, var, coef = running_mean, running_var, None
        invstd = torch.rsqrt(var + eps)  # [S, F]
        per_group = torch.stack([mean, invstd, weight, bias], 1)[seg]  # [G, 4, F]
        xhat = (h - per_group[:, 0:1]) * per_group[:, 1:2]
        ctx.save_for_backward(xhat, weight, invstd, seg, valid, member, coef)
        ctx.training = training
        return torch.addcmul(per_group[:, 3:4], xhat, per_group[:, 2:3])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        xhat, weight, invstd, seg, valid, member, coef = ctx.saved_tensors
        d_bias = member @ dy.sum(1)  # [S, F]
        d_weight = member @ (dy * xhat).sum(1)
        scale = weight * invstd
        if ctx.training:  # through the batch mean and variance of the valid rows
            k = torch.stack([scale, d_bias * coef, d_weight * coef], 1)[seg]  # [G, 3, F]
            dh = k[:, 0:1] * (dy - valid * torch.addcmul(k[:, 1:2], xhat, k[:, 2:3]))
        else:
            dh = scale[seg].unsqueeze(1) * dy
        return dh, d_weight, d_bias, *[None] * 11


class PixelLinear(torch.autograd.Function):
    """``Linear`` on every pixel vector of a feature map without the ``[B*h*w, D]`` copy (issue #13).

    ``(feats [B, D, h, w], weight [out, D], bias [out]) -> [B*h*w, out]``, rows in the order of
    :func:`semiseg.train.pixels_to_vectors` (image, row, column): the same values as
    ``F.linear(feats.permute(0, 2, 3, 1).reshape(-1, D), weight, bias)``. That reshape copies the
    map pixel by pixel (a transposition; 100 MB for the paper shape's 3 x 2048 x 64 x 64), and its
    backward transposes the map's gradient back; with the 2048-channel input of g the two took
    0.36 s of a 1.06 s module (paper shape, 2-core CPU, profiled at commit e5969e7). Here each
    image's ``[D, h*w]`` view is read as ``[h*w, D]`` by the matrix product itself (a transposed
    operand), and the map's gradient is written in the map's own layout (contiguous or channels_last). The same values up to rounding
    (on the 2-core CPU the forward and the input gradient came out as the same floats; the weight
    gradient sums the images in another order).
    """

    @staticmethod
    def forward(ctx, feats, weight, bias):
        ctx.save_for_backward(feats, weight)
        return torch.cat([torch.addmm(bias, x.flatten(1).t(), weight.t()) for x in feats.unbind(0)])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        feats, weight = ctx.saved_tensors
        B, D = feats.shape[:2]
        g = grad.view(B, -1, weight.shape[0])  # [B, h*w, out]
        d_feats = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            if feats.is_contiguous():  # [B, D, h*w] = W^T G^T per image, written contiguous
                d_feats = torch.bmm(weight.t().expand(B, -1, -1), g.transpose(1, 2))
            else:  # channels_last: [B, h*w, D] = G W, read back as [B, D, h*w]
                d_feats = torch.matmul(g, weight).transpose(1, 2)
            d_feats = d_feats.view(feats.shape)
        if ctx.needs_input_grad[1]:
            d_weight = g[0].t() @ feats[0].flatten(1).t()
            for b in range(1, B):
                d_weight = d_weight.addmm(g[b].t(), feats[b].flatten(1).t())
        if ctx.needs_input_grad[2]:
            d_bias = grad.sum(0)
        return d_feats, d_weight, d_bias


def pixel_linear(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:class:`PixelLinear`: a Linear on the pixel vectors of ``feats`` [B, D, h, w] -> [B*h*w, out]."""
    if feats.dim() != 4 or feats.shape[1] != weight.shape[1]:
        raise ValueError(f"expected a feature map [B, {weight.shape[1]}, h, w], got {tuple(feats.shape)}")
    if not (feats.is_contiguous() or feats.is_contiguous(memory_format=torch.channels_last)):
        feats = feats.contiguous()
    return PixelLinear.apply(feats, weight, bias)


def segment_member(seg, num_segments, dtype):
    """``member`` [S, G] of :class:`SegmentBatchNorm`: 1 where group g lies in segment s."""
    return (seg[None, :] == torch.arange(num_segments, device=seg.device)[:, None]).to(dtype)


class MLPHead(nn.Module):
    """``Linear(in_dim, dim) -> BatchNorm1d -> ReLU -> Linear(dim, dim)``.

    Input ``[N, in_dim]`` vectors or a feature map ``[B, in_dim, h, w]`` (its B*h*w pixel vectors,
    in :func:`semiseg.train.pixels_to_vectors` order, read in place by :func:`pixel_linear`), output
    ``[N, dim]``. Used as projection head g
    (``in_dim = feat_dim``) and prediction head q (``in_dim = 256``). With ``valid`` [N] bool,
    the BatchNorm statistics (and running-statistics update) come from the valid rows only: the
    same numbers as the head applied to ``x[valid]``, at a fixed size (:class:`SegmentBatchNorm`).
    """

    def __init__(self, in_dim: int, dim: int = 256, hidden: int | None = None):
        super().__init__()
        hidden = dim if hidden is None else hidden
        self.in_dim, self.dim = in_dim, dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        lin, bn, _, lin2 = self.net
        # a feature map [B, in_dim, h, w]: its pixel vectors, without copying the map (PixelLinear)
        h = pixel_linear(x, lin.weight, lin.bias) if x.dim() == 4 else lin(x)
        if valid is not None:
            if valid.shape != h.shape[:1]:
                raise ValueError(f"valid must be a [{h.shape[0]}] mask, got shape {tuple(valid.shape)}")
            rows = valid.to(h.dtype).view(1, -1, 1)  # one segment: one group of N rows
            seg, member = torch.zeros(1, dtype=torch.long, device=x.device), h.new_ones(1, 1)
            h = SegmentBatchNorm.apply(h[None], bn.weight[None], bn.bias[None], bn.running_mean[None],
                                       bn.running_var[None], bn.num_batches_tracked, seg, rows, member,
                                       rows.sum((1, 2)), bn.training, bn.momentum, bn.eps, True)
            return lin2(F.relu(h[0]))
        if h.shape[0] == 1 and self.training:
            # BatchNorm1d cannot compute batch statistics from one sample: use running stats
            h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                             training=False, eps=bn.eps)
            return lin2(F.relu(h))
        return lin2(F.relu(bn(h)))


_GROUPED_MM = {}


def grouped_mm_available(device, dtype) -> bool:
    """Whether :class:`ClassAttention` uses ``torch._grouped_mm`` (one matrix product per contiguous row
    group, with its autograd) on ``device`` in ``dtype``: on the CPU where this torch runs it (torch
    2.14 does in fp32; probed once per dtype on a tiny input). Not on CUDA yet: torch's CUDA kernel
    takes bf16 only in some versions, and its fallback reads the group offsets on the host (a sync
    per group), which no GPU run here has measured; CUDA keeps the per-tile weights."""
    key = (torch.device(device).type, dtype)
    if key not in _GROUPED_MM:
        ok = hasattr(torch, "_grouped_mm") and key[0] == "cpu"
        if ok:
            try:
                a = torch.zeros(4, 8, device=device, dtype=dtype, requires_grad=True)
                b = torch.zeros(2, 8, 8, device=device, dtype=dtype, requires_grad=True)
                out = torch._grouped_mm(a, b, offs=torch.tensor([2, 4], device=device, dtype=torch.int32))
                torch.autograd.grad(out, [a, b], torch.ones_like(out))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM[key] = ok
    return _GROUPED_MM[key]


# per-class parameter / buffer names of the C separate modules of old checkpoints (and of
# semiseg.reference.ClassAttentionLoop) -> (stacked name, per-class tensor -> its stacked row)
PER_CLASS_KEYS = {
    "fc1.weight": ("weight1", lambda t: t.T),       # [hidden, dim] -> [dim, hidden]
    "fc1.bias": ("bias1", lambda t: t),
    "bn.weight": ("bn_weight", lambda t: t),
    "bn.bias": ("bn_bias", lambda t: t),
    "bn.running_mean": ("running_mean", lambda t: t),
    "bn.running_var": ("running_var", lambda t: t),
    "bn.num_batches_tracked": ("num_batches_tracked", lambda t: t),
    "fc2.weight": ("weight2", lambda t: t[0]),      # [1, hidden] -> [hidden]
    "fc2.bias": ("bias2", lambda t: t[0]),          # [1] -> []
}


class ClassAttention(nn.Module):
    """C class-specific attention modules S_c (§3.4, §4.2) in one batched computation (issue #13).

    ``forward(vectors [N, dim], labels [N], valid [N] bool = None) -> scores [N]`` in [0, 1]: each
    vector goes through its own class's ``Linear(dim, hidden) -> BatchNorm1d -> LeakyReLU ->
    Linear(hidden, 1) -> Sigmoid``; invalid vectors (labels then arbitrary) score 0.

    The C modules are stored stacked: ``weight1`` [C, dim, hidden], ``bias1``, ``bn_weight``,
    ``bn_bias`` [C, hidden], ``weight2`` [C, hidden], ``bias2`` [C], buffers ``running_mean``,
    ``running_var`` [C, hidden] and ``num_batches_tracked`` [C]. Old checkpoints with per-class
    modules (``modules_per_class.{c}.fc1.weight`` ...) are converted on load.

    The computation has static shapes, a number of operators that does not depend on C, and no
    host synchronisation: a stable sort by label; each class's segment placed at an offset that
    is a multiple of the tile size T (offsets from an on-device cumsum), in a buffer of
    (ceil(N/T) + C) tiles; the first Linear as one ``torch._grouped_mm`` over the tiles (each
    class's rows by its own weight matrix) where this torch has it for the device and dtype
    (:func:`grouped_mm_available`) and :attr:`grouped_mm` is None -- off by default: on the CPU a
    resumed run was then not bit-identical to an uninterrupted one --, else one weight matrix gathered per tile
    and ``torch.bmm``; BatchNorm per class (:class:`SegmentBatchNorm`: batch statistics per class segment
    in training, the running ones for a one-vector class and in eval, exactly as C separate
    ``nn.BatchNorm1d`` called on their own segments); the second Linear as a per-tile ``bmm``.
    Every vector is computed once, by its own class's weights -- no C x arithmetic; the padding
    adds at most (C + 1) T rows, and T (16 to 128) is chosen from N / C to keep it to about a
    quarter of N or less. Without ``_grouped_mm`` the gathered per-tile weights take
    G x dim x hidden floats (about 80 MB at N = 38K, D = 256). Invalid vectors are never read (padding rows
    repeat a valid vector of their class). Labels of valid vectors outside [0, C) fail a device-side
    check (``RuntimeError`` on the CPU; a CUDA device assert), not a host check, which would wait.
    Empty input returns an empty tensor. Vectors already grouped by class (the bank's C x psi slots)
    take :meth:`per_class`, which needs none of this plan.

    Optimiser semantics: with separate modules, the module of a class absent from a step had no
    gradient, so SGD left its weights and momentum alone. Stacked, that class's rows get a zero
    gradient instead, which weight decay and momentum would still move: :func:`freeze_absent_classes`
    around ``optimizer.step()`` keeps the old behaviour, using :attr:`used` (the classes this
    module saw with gradients since the last step).
    """

    tile_max = 128
    grouped_mm = False  # False: per-tile weights and bmm (default: resumed runs were not bit-identical with _grouped_mm); None: _grouped_mm where available

    def __init__(self, num_classes: int, dim: int = 256, hidden: int = 256):
        super().__init__()
        self.num_classes, self.dim, self.hidden = num_classes, dim, hidden
        # initialised class by class exactly as C separate modules (same random draws, same order)
        w1, b1, w2, b2 = [], [], [], []
        for _ in range(num_classes):
            fc1, bn, fc2 = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 1)
            w1.append(fc1.weight.detach().T)
            b1.append(fc1.bias.detach())
            w2.append(fc2.weight.detach()[0])
            b2.append(fc2.bias.detach()[0])
        self.weight1 = nn.Parameter(torch.stack(w1).contiguous())
        self.bias1 = nn.Parameter(torch.stack(b1))
        self.bn_weight = nn.Parameter(torch.ones(num_classes, hidden))
        self.bn_bias = nn.Parameter(torch.zeros(num_classes, hidden))
        self.weight2 = nn.Parameter(torch.stack(w2))
        self.bias2 = nn.Parameter(torch.stack(b2))
        self.register_buffer("running_mean", torch.zeros(num_classes, hidden))
        self.register_buffer("running_var", torch.ones(num_classes, hidden))
        self.register_buffer("num_batches_tracked", torch.zeros(num_classes, dtype=torch.long))
        self.momentum, self.eps = 0.1, 1e-5
        self.used = None  # [C] bool: classes seen with autograd on since the last optimiser step

    def __len__(self) -> int:
        return self.num_classes

    def tile_size(self, n: int) -> int:
        """T: a power of two between 16 and ``tile_max``, about N / (4 C) (padding <= ~N / 4)."""
        return int(min(self.tile_max, max(16, 2 ** math.floor(math.log2(max(1, n // (4 * self.num_classes)))))))

    def forward(self, vectors: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if vectors.dim() != 2 or labels.dim() != 1 or vectors.shape[0] != labels.shape[0]:
            raise ValueError(f"expected vectors [N, dim] and labels [N], got "
                             f"{tuple(vectors.shape)} and {tuple(labels.shape)}")
        if valid is not None and valid.shape != labels.shape:
            raise ValueError(f"valid must be a [{labels.shape[0]}] mask, got shape {tuple(valid.shape)}")
        N, C = vectors.shape[0], self.num_classes
        if N == 0:
            return vectors.new_zeros(0)
        T = self.tile_size(N)
        G = -(-N // T) + C  # static: sum_c ceil(n_c / T) <= ceil(N / T) + C - 1
        dev, dtype = vectors.device, self.weight1.dtype
        with torch.no_grad():  # the plan: integer bookkeeping, on the device
            key = labels.long() if valid is None else torch.where(valid, labels.long(), C)  # C: invalid, sorted last
            # labels of valid vectors must be in [0, C): checked on the device (a host check would wait for it)
            top = C - 1 if valid is None else C
            torch._assert_async((key.clamp(0, top) == key).all(), f"ClassAttention: labels must be in [0, {C})")
            order = torch.argsort(key, stable=True)  # sorted position -> vector
            sorted_key = key[order]
            bounds = torch.searchsorted(sorted_key, torch.arange(C + 1, device=dev))  # class c: [bounds[c], bounds[c+1])
            n = bounds[1:] - bounds[:-1]
            tiles = torch.div(n + (T - 1), T, rounding_mode="floor")  # class c owns ceil(n_c / T) tiles of T rows
            tile_end = torch.cumsum(tiles, 0)
            base = bounds[:-1] - (tile_end - tiles) * T  # row r of a class-c tile holds sorted position base[c] + r
            tile_class = torch.searchsorted(tile_end, torch.arange(G, device=dev), right=True).clamp_(max=C - 1)
            pos = base[tile_class].unsqueeze(1) + torch.arange(G * T, device=dev).view(G, T)  # [G, T] sorted position
            last = (bounds[1:] - 1)[tile_class].unsqueeze(1)  # sorted position of the class's last vector
            real = pos <= last  # [G, T]: rows holding a vector; the others are padding
            src = order[torch.minimum(pos, last).clamp_(min=0)]  # padding repeats a valid vector: invalid ones are never read
            dest = torch.where(real, src, N).view(-1)  # where each row's score goes; N: nowhere
            rows = real.unsqueeze(2).to(dtype)  # [G, T, 1]
            member = segment_member(tile_class, C, dtype)
        grouped = self.grouped_mm if self.grouped_mm is not None else grouped_mm_available(dev, dtype)
        if grouped:  # class c's tiles end at row tile_end[c] T; the spare tiles at the end go with class C - 1
            with torch.no_grad():
                offs = torch.cat([tile_end[:-1] * T, tile_end.new_full((1,), G * T)]).to(torch.int32)
            s = self._tiles(vectors.to(dtype)[src], tile_class, rows, member, n, offs=offs)
        else:  # Linear(dim, hidden) as one bmm, each tile with its class's weights
            s = self._tiles(vectors.to(dtype)[src], tile_class, rows, member, n, self.weight1[tile_class],
                            self.bias1[tile_class], self.weight2[tile_class], self.bias2[tile_class])
        # each row's score to its vector; invalid vectors keep 0, padding rows go to the extra slot N
        return s.new_zeros(N + 1).scatter(0, dest, s.view(G * T))[:N]

    def per_class(self, vectors: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of vectors already grouped by class, ``vectors`` [C, M, dim] (row c: class c), e.g.
        the memory bank's C x psi slots: ``[C, M]``, 0 where ``valid`` [C, M] is False.

        The same numbers as :meth:`forward` on the flattened vectors with class-major labels, in a
        handful of operators: the rows are already the tiles, so there is no plan, padding or weight
        gather. Invalid rows are computed (they must be finite, as a bank's empty slots are) and
        left out of the BatchNorm statistics.
        """
        C, M = vectors.shape[:2] if vectors.dim() == 3 else (None, None)
        if C != self.num_classes or vectors.shape[2] != self.dim or (valid is not None and valid.shape != (C, M)):
            raise ValueError(f"expected vectors [{self.num_classes}, M, {self.dim}] and valid [C, M], got "
                             f"{tuple(vectors.shape)} and {None if valid is None else tuple(valid.shape)}")
        dtype = self.weight1.dtype
        with torch.no_grad():
            rows = vectors.new_ones(C, M, 1, dtype=dtype) if valid is None else valid.unsqueeze(2).to(dtype)
            n = rows.sum((1, 2)).long()
            classes = torch.arange(C, device=vectors.device)
            member = torch.eye(C, device=vectors.device, dtype=dtype)
        s = self._tiles(vectors.to(dtype), classes, rows, member, n, self.weight1, self.bias1, self.weight2,
                        self.bias2)
        return s.squeeze(2) if valid is None else s.squeeze(2) * valid

    def _tiles(self, x, tile_class, rows, member, n, weight1=None, bias1=None, weight2=None, bias2=None, offs=None):
        """S_c on tiles ``x`` [G, T, dim] (tile g of class ``tile_class[g]``): ``Linear -> BatchNorm (per
        class, SegmentBatchNorm) -> LeakyReLU -> Linear -> Sigmoid``, ``[G, T, 1]``. ``n`` [C]: valid rows
        per class. The first Linear uses either the weights gathered per tile (``weight1`` [G, dim, hidden]),
        or, with ``offs`` [C] (int32, where each class's rows end), ``torch._grouped_mm`` on the stacked
        ones; the second (to one output, which ``_grouped_mm``'s 16-byte strides exclude) is a per-tile
        ``bmm`` with ``weight2`` [G, hidden] gathered per tile (given, or gathered here)."""
        if torch.is_grad_enabled():  # for freeze_absent_classes
            self.used = (n > 0) if self.used is None else self.used | (n > 0)
        G, T = x.shape[:2]
        if offs is None:
            h = torch.baddbmm(bias1.unsqueeze(1), x, weight1)  # [G, T, hidden]
        else:
            h = torch._grouped_mm(x.reshape(G * T, -1), self.weight1, offs=offs).view(G, T, -1)
            h = h + self.bias1[tile_class].unsqueeze(1)
        h = SegmentBatchNorm.apply(h, self.bn_weight, self.bn_bias, self.running_mean, self.running_var,
                                   self.num_batches_tracked, tile_class, rows, member, n.to(x.dtype),
                                   self.training, self.momentum, self.eps, False)
        if weight2 is None:  # [G, hidden]: small, gathered per tile in both cases
            weight2, bias2 = self.weight2[tile_class], self.bias2[tile_class]
        return torch.sigmoid(torch.baddbmm(bias2.view(G, 1, 1), F.leaky_relu(h), weight2.unsqueeze(2)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Old checkpoints: ``modules_per_class.{c}.<name>`` keys (C separate modules) -> the stacked tensors."""
        old = prefix + "modules_per_class."
        found = {}
        for key in [k for k in state_dict if k.startswith(old)]:
            c, _, name = key[len(old):].partition(".")
            if c.isdigit() and name in PER_CLASS_KEYS:
                found.setdefault(name, {})[int(c)] = key
        for name, keys in found.items():
            stacked, to_row = PER_CLASS_KEYS[name]
            if sorted(keys) == list(range(len(keys))) and prefix + stacked not in state_dict:
                state_dict[prefix + stacked] = torch.stack([to_row(state_dict.pop(keys[c])) for c in range(len(keys))])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


@contextlib.contextmanager
def freeze_absent_classes(model, optimizer, reduce=None):
    """Around ``optimizer.step()``: the rows of a :class:`ClassAttention`'s stacked weights (and
    their momentum) whose class the module did not see since the last step stay as they were.

    That is what C separate modules gave: an absent class's module had no gradient, so SGD skipped
    it (no weight decay, no momentum step). ``reduce`` (e.g. a sum over processes) merges the
    classes seen by several processes, as DDP merges gradients. Fixed shapes, no host sync.
    """
    modules = [m for m in model.modules() if isinstance(m, ClassAttention) and m.used is not None]
    if not modules:
        yield
        return
    used = torch.stack([m.used for m in modules]).float()
    if reduce is not None:
        used = reduce(used)
    saved = []
    for m, seen in zip(modules, used > 0):
        for p in m.parameters():
            if p.grad is not None:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                saved.append((p, seen.view(-1, *[1] * (p.dim() - 1)), p.detach().clone(),
                              None if buf is None else buf.clone()))
    yield
    with torch.no_grad():
        for p, seen, value, buf in saved:
            p.copy_(torch.where(seen, p, value))
            new = optimizer.state.get(p, {}).get("momentum_buffer")
            if new is not None:  # a buffer made by this step is, for an absent class, "no buffer yet": 0
                new.copy_(torch.where(seen, new, 0.0 if buf is None else buf))
    for m in modules:
        m.used = None
