"""``python -m semiseg.bench``: what the contrastive module costs (issue #4). A benchmark, not a test.

Parts, each measured side by side in one process, FLOPs from ``torch.utils.flop_counter``:

* ``share`` -- the contrastive module's share of a training step's time against its share of the
  step's FLOPs, on the CamVid CPU profile and on the paper's shape (DeepLabv2-R101, 512 x 512,
  one labeled + one unlabeled image, C = 19, psi = 256, synthetic images). *The module* is what
  the paper's FLOP count (§4.4: 35.07 of 1151.19 GFLOPs) holds: heads g and q, the class-wise
  attention, eq. (8)-(11) forward and backward, and the bank update (FQF, ranking, FIFO). The
  teacher's forward pass over the labeled images that produces the bank's features is not in the
  paper's count (its 1151.19 = 3 x 372.04 + 35.07); we time it and report it on its own line.
* ``loss`` -- vectorised eq. (8)-(11) against the per-class loop of ``semiseg.reference``,
  forward + backward, on paper-shaped tensors, with each one's peak memory.
* ``precision`` -- bf16 autocast + channels_last against fp32 on the CamVid CPU profile.
* ``eval`` -- evaluation throughput (images/s) on CamVid val.
* ``syncs`` -- host synchronisations in one paper-shape training step, by ``semiseg.syncs`` (any
  device) and, on CUDA, by ``torch.cuda.set_sync_debug_mode``.
* ``attention`` -- issue #13: the operators the contrastive module runs per training step
  (``torch.profiler`` events on the CPU, :func:`operator_counts`) with the class-wise attention as
  C modules in a loop (``attention_impl: loop``) and as one batched computation, for C = 11, 19
  and 21; and the same without S_c (``attention: false``), whose difference is S_c's own share.
* ``attention_losses`` -- issue #13: the training losses of both attention implementations on the
  CamVid profile (tiny crops), run side by side from the same seed, and each step from one state.

The JSON written to ``--out`` (default ``book/results/bench/<device>.json``) is what the book's
performance page shows; each ratio is printed beside its target from the issue.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import platform
import re
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from . import losses, reference
from .config import atomic_write_text, load_config, source_commit
from .data.sampling import Batches
from .models.heads import ClassAttention
from .train import Trainer

TARGETS = {  # issue #4
    "time_share / flop_share": ("<=", 1.25),
    "full step / module-off step": ("<=", 1.05),
    "loop / vectorised (cpu)": (">=", 2.0),
    "loop / vectorised (cuda)": (">=", 10.0),
    "fp32 / bf16+channels_last step": (">=", 1.5),
    "batched / loop operators (C=19)": ("<=", 0.2),  # issue #13
    "compiled / loop operators (C=19)": ("<=", 0.2),  # issue #13, compile_contrastive
}


# ----------------------------------------------------------------------------- measuring
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps, warmup=1):
    """Median wall time of ``fn()`` over ``reps`` runs after ``warmup`` runs (device synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grouped_mm_flops(a_shape, b_shape, *args, **kwargs):
    """FLOPs of ``torch._grouped_mm`` (``torch.utils.flop_counter`` has no formula for it): every row
    of ``a`` meets one group's matrix. [M, K] x [G, K, N] (forward, grad of a): 2 M K N;
    [K, M] x [M, N] (grad of the group matrices, M split in groups): 2 K M N; [G, M, K] x [G, K, N]: 2 G M K N."""
    if len(a_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[-1]


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs):
    """FLOPs of ``aten.convolution_backward`` that respect groups. Each multiply-add of the forward
    convolution appears once in the input gradient and once in the weight gradient, so each
    requested gradient costs the forward's FLOPs (``w_shape`` already holds ``in / groups``).
    ``torch.utils.flop_counter``'s own formula computes the weight gradient as an ungrouped
    convolution: for a depthwise 3x3 layer with 256 channels it counts 256x too much, which made
    EfficientNet-Lite0's step (depthwise everywhere) count 314 GFLOP instead of 56 at the CamVid profile."""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


# Recorded in every JSON: JSONs without it counted a grouped convolution's weight gradient as an
# ungrouped one (torch's formula), which overstates EfficientNet-Lite0's step FLOPs about 5.6x.
FLOP_COUNTER = "torch.utils.flop_counter, convolution backward with groups (conv_backward_flops)"


def flops(fn):
    """FLOPs of ``fn()`` as ``torch.utils.flop_counter`` counts them (matmuls and convolutions), with
    :func:`grouped_mm_flops` for ``torch._grouped_mm`` (the class-wise attention's first Linear on the
    CPU) and :func:`conv_backward_flops` for the convolution backward (grouped convolutions)."""
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
    if hasattr(torch.ops.aten, "_grouped_mm"):
        mapping[torch.ops.aten._grouped_mm] = grouped_mm_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def kernel_launches(fn):
    """CUDA kernels launched by ``fn()`` and their GPU time, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                        "cuLaunchKernelEx"))
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # kernels, not the ops above them
    gpu_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in kernels)
    return {"launches": launches, "cuda_seconds": gpu_us / 1e6}


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensors allocated inside the block, on any device (storages tracked
    through the dispatcher and freed through weak references); memory held before it (inputs, and
    views of them) is not counted."""

    def __init__(self):
        super().__init__()
        self.live, self.outside, self.current, self.peak = {}, set(), 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.live and storage._cdata not in self.outside:
                    self.outside.add(storage._cdata)
                    weakref.finalize(storage, self.outside.discard, storage._cdata)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.live and storage._cdata not in self.outside:
                    self.live[storage._cdata] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, storage._cdata)
        return out


def machine(device):
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ----------------------------------------------------------------------------- settings
def camvid_setting(device, precision="fp32", channels_last=False, overrides=None):
    """The CamVid CPU profile (``camvid_quick``) with its real batches, or TinyShapes at its shapes."""
    from .data.tiny import camvid_or_tiny

    train_set, tiny = camvid_or_tiny("train")
    cfg = load_config("camvid_quick", {**tiny, "device": str(device), "precision": precision,
                                       "channels_last": channels_last, "warmup_frac": 0.0, "warmup_beta": 0.0, "threads": 0,
                                       **(overrides or {})})
    n_lab = max(1, len(train_set) // 8)
    trainer = Trainer(cfg, train_set.num_classes, n_lab, device)
    labeled = Batches(train_set.subset(train_set.names[:n_lab]), cfg.batch_labeled, cfg.base_size, cfg.crop_size, 1)
    unlabeled = Batches(train_set.subset(train_set.names[n_lab:]), cfg.batch_unlabeled, cfg.base_size, cfg.crop_size, 2)
    name = f"camvid_quick, {cfg.arch}" + (" (TinyShapes: CamVid not found)" if tiny else "")
    return name, trainer, lambda it: (labeled(it), unlabeled(it))


def blocky_labels(batch, size, num_classes, block, generator):
    """Synthetic labels: one class per ``block`` x ``block`` square (segments like a real scene's)."""
    cells = torch.randint(0, num_classes, (batch, size // block, size // block), generator=generator)
    return cells.repeat_interleave(block, 1).repeat_interleave(block, 2)


def paper_setting(device, precision="fp32", channels_last=False, size=512, arch="deeplabv2_r101", num_classes=19,
                  overrides=None):
    """§4.4's shape: DeepLabv2-R101 at 512 x 512, one labeled + one unlabeled image, psi = 256.

    Random weights on random images can diverge within a few steps (the NaN guard then stops the
    bench), so the learning rate is 0: the optimizer still does all of its arithmetic."""
    cfg = load_config("paper_cityscapes_dlv2", {"device": str(device), "precision": precision, "arch": arch,
                                                "channels_last": channels_last, "pretrained": False,
                                                "batch_labeled": 1, "batch_unlabeled": 1, "warmup_frac": 0.0, "warmup_beta": 0.0,
                                                "crop_size": [size, size], "iterations": 1000, "lr": 0.0,
                                                **(overrides or {})})
    trainer = Trainer(cfg, num_classes, 100, device)
    g = torch.Generator().manual_seed(0)

    def batch(it):
        x_l, x_u = torch.rand(1, 3, size, size, generator=g), torch.rand(1, 3, size, size, generator=g)
        y_l = blocky_labels(1, size, num_classes, max(size // 8, 1), g)
        return (x_l, y_l, torch.tensor([it % 100])), (x_u,)

    return f"paper shape: {arch}, {size}x{size}, 1 labeled + 1 unlabeled", trainer, batch


def fill_bank(trainer, generator):
    """A full bank (psi vectors per class) so that the attention over the memory runs at its full size."""
    bank = trainer.bank
    bank.memory = F.normalize(torch.randn(bank.memory.shape, generator=generator), dim=2).to(bank.memory.device)
    bank.count.fill_(bank.size)


# ----------------------------------------------------------------------------- parts
def forget_used_classes(trainer):
    """``ClassAttention.used`` back to None, as after an optimiser step (freeze_absent_classes): every
    measured call then starts from the state a training step starts from (and, with
    ``compile_contrastive``, runs the same compiled graph instead of recompiling for the other state)."""
    for m in trainer.student.modules():
        if isinstance(m, ClassAttention):
            m.used = None


def module_work(trainer, inputs):
    """The contrastive module alone on a step's tensors: eq. (8)-(11) forward + backward and the bank
    update without its teacher forward (bank features from the given ``feats``)."""
    feats, targets, x_la, y_la, ids = inputs
    forget_used_classes(trainer)
    feats = feats.detach().requires_grad_()
    trainer.contrastive(feats, targets).backward()
    bank_from = trainer.cfg.bank_from
    trainer.cfg.bank_from = "student"  # same FQF / ranking / FIFO work, no extra forward pass
    try:
        trainer.update_bank(x_la, y_la, ids, feats[: x_la.shape[0]].detach())
    finally:
        trainer.cfg.bank_from = bank_from


def step_tensors(trainer, batch):
    """The tensors the module sees in a step: student features of the labeled weak views and of A
    strong unlabeled views, their (pseudo-)labels, and the labeled images for the bank."""
    (x_l, y_l, ids), (x_u, *_) = batch
    dev = trainer.device
    x_l, y_l, x_u = x_l.to(dev), y_l.to(dev), x_u.to(dev)
    pseudo, _ = trainer.pseudo_labels(x_u)
    inputs = torch.cat([x_l] + [x_u] * trainer.cfg.num_views)
    targets = torch.cat([y_l] + [pseudo] * trainer.cfg.num_views)
    with torch.no_grad():
        _, feats = trainer.forward(trainer.student, inputs)
    return feats, targets, x_l, y_l, ids.to(dev)


def share_part(name, trainer, batch, reps):
    """Time and FLOP shares of the module in one training step, and the step with the module off."""
    dev, cfg = trainer.device, trainer.cfg
    fill_bank(trainer, torch.Generator().manual_seed(1))
    b = batch(0)
    lambda_contr = cfg.lambda_contr

    def step(on):
        cfg.lambda_contr = lambda_contr if on else 0.0
        bank = (trainer.bank.memory.clone(), trainer.bank.count.clone())
        trainer.step(*b)
        trainer.bank.memory, trainer.bank.count = bank  # every timed step sees the same full bank
        cfg.lambda_contr = lambda_contr

    tensors = step_tensors(trainer, b)
    x_la = tensors[2]

    def teacher_forward():
        with torch.no_grad():
            trainer.forward(trainer.teacher, x_la)

    out = {"setting": name, "device": str(dev), "precision": cfg.precision, "channels_last": cfg.channels_last,
           "reps": reps}
    # FLOPs counted on the eager code (the same arithmetic; the counter does not see inside compiled code)
    with eager():
        out["flops"] = {"step": flops(lambda: step(True)), "step_module_off": flops(lambda: step(False)),
                        "module": flops(lambda: module_work(trainer, tensors)), "bank_teacher_forward": flops(teacher_forward)}
    forget_used_classes(trainer)  # module_work above left it set; a step starts without it
    step(True), step(False)  # warm-up (with compile_contrastive: the compilation)
    out["seconds"] = {"step": timed(lambda: step(True), dev, reps, warmup=0),
                      "step_module_off": timed(lambda: step(False), dev, reps, warmup=0),
                      "module": timed(lambda: module_work(trainer, tensors), dev, max(reps, 3)),
                      "bank_teacher_forward": timed(teacher_forward, dev, reps)}
    if dev.type == "cuda":
        out["module_kernels"] = kernel_launches(lambda: module_work(trainer, tensors))
    f, s = out["flops"], out["seconds"]
    out["flop_share"] = f["module"] / f["step"]
    out["time_share"] = s["module"] / s["step"]
    out["ratios"] = {
        "time_share / flop_share": out["time_share"] / out["flop_share"],
        "full step / module-off step": (s["step"] - s["bank_teacher_forward"]) / s["step_module_off"],
        "full step / module-off step, bank teacher forward included": s["step"] / s["step_module_off"],
    }
    out["paper_flop_share"] = 35.07 / 1151.19
    return out


def paper_loss_inputs(device, n, num_classes=19, psi=256, dim=256, ignore=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore] = 255
    pred = torch.randn(n, dim, generator=g)
    pred_scores = torch.rand(n, generator=g)
    memory = torch.randn(num_classes, psi, dim, generator=g)
    memory_scores = torch.rand(num_classes, psi, generator=g)
    tensors = [t.to(device) for t in (pred, labels, memory, pred_scores, memory_scores)]
    return tensors, torch.full((num_classes,), psi, device=device)


def loss_part(device, reps, n=38000, num_classes=19, psi=256, dim=256, precision="fp32"):
    """Vectorised vs per-class loop, forward + backward, with peak memory of each."""
    (pred, labels, memory, pred_scores, memory_scores), count = paper_loss_inputs(device, n, num_classes, psi, dim)
    keep = labels != 255  # the loop reference takes only valid labels
    out = {"device": str(device), "precision": precision, "N": n, "C": num_classes, "psi": psi, "D": dim,
           "n_x_psi_matrix_bytes": n * psi * 4}

    def run(fn, p, s, lab, ms):
        p = p.detach().requires_grad_()
        s = s.detach().requires_grad_()
        ms = ms.detach().requires_grad_()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = fn(p, lab, memory, s, ms, num_classes, memory_count=count)
        loss.backward()
        return loss.detach(), p.grad

    vec = lambda: run(losses.contrastive_loss, pred, pred_scores, labels, memory_scores)  # noqa: E731
    loop = lambda: run(reference.contrastive_loss_loop, pred[keep], pred_scores[keep], labels[keep], memory_scores)  # noqa: E731
    for name, fn in (("vectorised", vec), ("loop", loop)):
        seconds = timed(fn, device, reps)
        with PeakMemory() as peak:
            _, grad = fn()
        entry = {"seconds": seconds, "peak_bytes": peak.peak, "grad_bytes": grad.numel() * grad.element_size()}
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            entry["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        entry["peak_without_input_grad_bytes"] = entry["peak_bytes"] - entry["grad_bytes"]
        out[name] = entry
    (a, _), (b, _) = vec(), loop()
    out["abs_difference"] = float((a.float() - b.float()).abs())
    kind = torch.device(device).type
    out["ratios"] = {f"loop / vectorised ({kind})": out["loop"]["seconds"] / out["vectorised"]["seconds"],
                     "vectorised peak (without input grad) / N x psi matrix":
                         out["vectorised"]["peak_without_input_grad_bytes"] / out["n_x_psi_matrix_bytes"]}
    return out


def precision_part(device, reps, overrides=None):
    """bf16 autocast + channels_last vs fp32: whole step and student forward+backward alone."""
    out = {"device": str(device)}
    for key, precision, cl in (("fp32", "fp32", False), ("bf16_channels_last", "bf16", True)):
        name, trainer, batch = camvid_setting(device, precision, cl, overrides)
        fill_bank(trainer, torch.Generator().manual_seed(1))
        steps = iter(range(10 ** 6))
        step_seconds = timed(lambda: trainer.step(*batch(next(steps))), device, reps)
        (x_l, *_), (x_u, *_) = batch(0)
        x = torch.cat([x_l] + [x_u] * trainer.cfg.num_views).to(trainer.device)

        def model_only():
            logits, feats = trainer.forward(trainer.student, x)
            (logits.mean() + feats.mean()).backward()

        out[key] = {"step_seconds": step_seconds, "model_fwd_bwd_seconds": timed(model_only, device, reps),
                    "batch": list(x.shape)}
        out["setting"] = name
    out["ratios"] = {"fp32 / bf16+channels_last step": out["fp32"]["step_seconds"] / out["bf16_channels_last"]["step_seconds"],
                     "fp32 / bf16+channels_last model fwd+bwd":
                         out["fp32"]["model_fwd_bwd_seconds"] / out["bf16_channels_last"]["model_fwd_bwd_seconds"]}
    return out


def eval_part(device, limit=None):
    """Images per second of ``semiseg.evaluate.evaluate`` on CamVid val (loading + network + confusion)."""
    from .data.tiny import camvid_or_tiny
    from .evaluate import evaluate
    from .models import build_model

    val, tiny = camvid_or_tiny("val")
    if limit:
        val = val.subset(val.names[:limit])
    cfg = load_config("camvid_quick", tiny)
    model = build_model(cfg.arch, val.num_classes, pretrained=False).to(device)
    evaluate(model, val.subset(val.names[:2]), cfg.eval_size, device)  # warm-up
    sync(device)
    start = time.perf_counter()
    evaluate(model, val, cfg.eval_size, device)
    sync(device)
    seconds = time.perf_counter() - start
    return {"device": str(device), "images": len(val), "eval_size": cfg.eval_size, "arch": cfg.arch,
            "seconds": seconds, "images_per_second": len(val) / seconds,
            "data": "camvid val" if not tiny else "TinyShapes val (CamVid not found)"}


def syncs_part(device, size=512, arch="deeplabv2_r101"):
    """Host syncs of one training step with a full bank, by site; data loading and augmentation apart."""
    import warnings

    from .syncs import HostSyncs

    name, trainer, batch = paper_setting(device, size=size, arch=arch)
    fill_bank(trainer, torch.Generator().manual_seed(1))
    trainer.step(*batch(0))
    b = batch(1)
    with HostSyncs() as syncs:
        trainer.step(*b)
    out = {"setting": name, "device": str(device), "by_site": syncs.by_site()}
    data = ("semiseg/data/augment.py", "semiseg/data/sampling.py")
    out["method_syncs"] = sum(syncs.by_site(exclude=data).values())
    if torch.device(device).type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.step(*b)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        sites = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        out["cuda_sync_debug"] = dict(collections.Counter(sites))
    return out


# operators that only make views or read metadata: no kernel on a GPU
VIEW_OPS = {"view", "reshape", "unsqueeze", "squeeze", "slice", "select", "transpose", "t", "permute", "expand",
            "expand_as", "view_as", "detach", "alias", "as_strided", "narrow", "unbind", "split", "split_with_sizes",
            "chunk", "numpy_T", "_reshape_alias", "_unsafe_view", "to", "contiguous", "lift_fresh", "result_type",
            "resolve_conj", "resolve_neg", "size", "stride", "is_nonzero"}


def operator_counts(fn):
    """Operators ``fn()`` runs, from ``torch.profiler`` CPU events: ``ops`` counts the ``aten::`` calls made
    from Python or by autograd (not the ones an operator makes inside itself), leaving out those
    that only make a view or read metadata (``VIEW_OPS``; a ``to`` / ``reshape`` / ``contiguous``
    that copies is counted): about the kernels a GPU would launch. ``all`` counts every
    ``aten::`` event, nested ones included. Autograd's backward is included. Code compiled by
    ``torch.compile`` adds its fused kernels (``fused_kernels``, counted in both; they are profiler
    events only with :func:`kernel_profile` on while compiling) to its ``aten::`` calls (its matmuls,
    sorts)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    fused = sum(bool(FUSED_KERNEL.match(e.name)) for e in prof.events())

    def outermost(e):
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    def works(e):
        name = e.name[len("aten::"):]
        if name in ("to", "reshape", "contiguous"):  # a copy when they have a copying child
            return any(c.name in ("aten::_to_copy", "aten::clone", "aten::_reshape_copy", "aten::copy_")
                       for c in e.cpu_children)
        return name not in VIEW_OPS

    top = [e for e in events if outermost(e)]
    return {"ops": sum(works(e) for e in top) + fused, "fused_kernels": fused, "all": len(events) + fused}


def eager():
    """Code wrapped by ``torch.compile`` runs eagerly inside this block (torch >= 2.6; before, as compiled)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


FUSED_KERNEL = re.compile(r"^(graph_\d+_)?(cpp|triton)_\w*fused")  # inductor's kernels (CPU C++, GPU Triton)


def kernel_profile():
    """Inductor's generated CPU kernels as profiler events (``cpp_fused_*``), so :func:`operator_counts`
    sees them; set before the code is compiled."""
    import torch._inductor.config as inductor

    inductor.cpp.enable_kernel_profile = True


def attention_tensors(trainer, size, generator):
    """Step tensors of :func:`module_work` with every class present in every image: random student
    features of 1 labeled + ``num_views`` unlabeled images and blocky labels."""
    C, dev = trainer.C, trainer.device
    n = 1 + trainer.cfg.num_views
    h = size // 8
    cells = torch.stack([torch.randperm(h * h, generator=generator) % C for _ in range(n)]).view(n, h, h)
    targets = cells.repeat_interleave(8, 1).repeat_interleave(8, 2).to(dev)
    feats = torch.randn(n, trainer.student.feat_dim, h, h, generator=generator).to(dev)
    x_la = torch.rand(1, 3, size, size, generator=generator).to(dev)
    return feats, targets, x_la, targets[:1], torch.tensor([0], device=dev)


def attention_part(device, classes=(11, 19, 21), size=64, psi=256, arch="effnet_lite0_dlv3p",
                   impls=("loop", "batched", "compiled")):
    """Issue #13: operators of the contrastive module (:func:`module_work`: heads, S_c, eq. (8)-(11)
    forward and backward, bank update) per training step, attention as a per-class loop (``loop``),
    ``batched``, and (``compiled``) batched under ``torch.compile`` (``compile_contrastive``: inductor's fused
    kernels counted as operators; S_c's own share is not split out there).

    The batched count should not depend on C, and be at most 1/5 of the loop's (target)."""
    kernel_profile()
    out = {"device": str(device), "setting": f"{arch}, {size}x{size}, 1 labeled + 2 views, psi = {psi}, full bank",
           "classes": list(classes), "counts": {}}
    for C in classes:
        out["counts"][str(C)] = {}
        for impl in impls:
            counts = {}
            for attention in (True, False) if impl != "compiled" else (True,):  # without S_c: heads, loss, bank
                torch.manual_seed(0)
                cfg = load_config("smoke", {"arch": arch, "pretrained": False, "psi": psi, "device": str(device),
                                            "attention_impl": "loop" if impl == "loop" else "batched",
                                            "compile_contrastive": impl == "compiled", "attention": attention,
                                            "warmup_frac": 0.0, "warmup_beta": 0.0})
                trainer = Trainer(cfg, C, 100, device)
                trainer.generator = torch.Generator().manual_seed(0)  # the bank's random ranking without S_c
                fill_bank(trainer, torch.Generator().manual_seed(1))
                tensors = attention_tensors(trainer, size, torch.Generator().manual_seed(2))
                module_work(trainer, tensors)  # warm-up
                fill_bank(trainer, torch.Generator().manual_seed(1))
                counts["module" if attention else "without_attention"] = operator_counts(lambda: module_work(trainer, tensors))
            if "without_attention" in counts:
                counts["attention_ops"] = counts["module"]["ops"] - counts["without_attention"]["ops"]
            out["counts"][str(C)][impl] = counts
    per_c = [out["counts"][str(C)] for C in classes]
    for impl in impls[1:]:
        out[f"{impl}_constant_in_C"] = len({c[impl]["module"]["ops"] for c in per_c}) == 1
    out["ratios"] = {}
    for C, c in zip(classes, per_c):
        for impl in impls[1:] if impls[0] == "loop" else ():
            out["ratios"][f"{impl} / loop operators (C={C})"] = c[impl]["module"]["ops"] / c["loop"]["module"]["ops"]
            if "attention_ops" in c[impl]:
                out["ratios"][f"{impl} / loop attention operators (C={C})"] = c[impl]["attention_ops"] / c["loop"]["attention_ops"]
    return out


def attention_losses_part(device, iterations=100, overrides=None, dtype="float32"):
    """Issue #13: the loss terms of ``attention_impl`` batched and loop on the CamVid profile.

    ``free``: two runs from the same seed, side by side for ``iterations`` steps; their difference
    grows from float rounding through the training dynamics (short high-rate schedules on tiny
    crops are chaotic: on the smoke profile a 1e-7 relative change of one weight tensor moved the
    loss by 7e-4 two steps later). ``control``: the same for the loop path against itself, its
    second run stepped with another thread count (1 instead of 2, or 2 instead of 1): the same
    code with other rounding (the CPU kernels split their sums by thread). Where the control grows
    as fast as ``free``, the implementations differ by rounding only, and a threshold on
    free-running losses measures the training dynamics, not the implementations.
    ``one_step``: at every iteration the batched trainer takes one step from the loop
    trainer's state (checkpoint format conversion included), the same RNG state and batch: the
    implementations' own difference, in the loss terms and in the weights after the step.
    ``dtype="float64"`` runs both in float64 (weights, images, bank, losses): rounding then starts
    about 1e-9 times smaller, so a free-running difference that stays small is rounding, not a
    difference of the computations.

    The bank's FQF is off (``fqf: false``, a choice of this bench): every labeled vector enters
    the bank at the first step, so L_contr and both S_c run from the second iteration on. With FQF
    an untrained classifier passes almost nothing (at commit e5969e7 the bank stayed empty for all
    100 iterations, and the comparison never reached the attention). ``iterations_with_contr``
    says how many steps ran L_contr; none prints a warning.
    """
    import copy

    settings = {"crop_size": [64, 64], "batch_labeled": 2, "batch_unlabeled": 2, "psi": 64, "fqf": False,
                "warmup_frac": 0.0, "warmup_beta": 0.0, "channels_last": False, "iterations": max(iterations, 2),
                **(overrides or {})}
    default, threads = torch.get_default_dtype(), torch.get_num_threads()
    control_threads = 1 if threads > 1 else 2
    torch.set_default_dtype(getattr(torch, dtype))  # the trainers' weights and bank
    try:
        def trainers(impls=("loop", "batched")):
            made = []
            for impl in impls:
                torch.manual_seed(0)
                name, trainer, batch = camvid_setting(device, overrides={**settings, "attention_impl": impl})
                made.append(trainer)

            def typed(it):  # the images in the run's dtype
                (x_l, *rest_l), (x_u, *rest_u) = batch(it)
                return (x_l.to(torch.get_default_dtype()), *rest_l), (x_u.to(torch.get_default_dtype()), *rest_u)
            return name, made[0], made[1], typed

        def both(first, second, batch, it, before_second, second_threads=threads):
            """One step of each trainer on batch ``it``; ``before_second()`` sets the second trainer's
            start (RNG state, weights); the first trainer's RNG stream continues afterwards."""
            a = first.step(*batch(it))
            after = torch.get_rng_state()
            before_second()
            torch.set_num_threads(second_threads)
            try:
                b = second.step(*batch(it))
            finally:
                torch.set_num_threads(threads)
            torch.set_rng_state(after)
            return a, b

        def free_run(impls, second_threads=threads):
            """Per-iteration max |difference| of the loss terms of two trainers run side by side."""
            name, first, second, batch = trainers(impls)
            diffs, contr = [], []
            torch.manual_seed(0)
            for it in range(iterations):
                rng = torch.get_rng_state()
                a, b = both(first, second, batch, it, lambda: torch.set_rng_state(rng), second_threads)  # noqa: B023
                diffs.append(max(abs(a[k] - b[k]) for k in a))
                contr.append(a.get("contr", 0.0))
            return name, diffs, contr, int(first.bank.count.sum())

        name, free, contr, bank = free_run(("loop", "batched"))
        _, control, _, _ = free_run(("loop", "loop"), control_threads)
        # each step from the same state
        name, loop, batched, batch = trainers()
        one_step, weights = 0.0, 0.0  # weights: max |difference| of a weight or running statistic after the step, relative to its largest entry
        for it in range(iterations):
            state = copy.deepcopy(loop.state_dict())  # RNG state included
            a, b = both(loop, batched, batch, it, lambda: batched.load_state_dict(state))  # noqa: B023 (called at once)
            one_step = max([one_step] + [abs(a[k] - b[k]) for k in a])
            with torch.random.fork_rng(devices=[]):
                same = copy.deepcopy(batched.student)
            same.load_state_dict(loop.student.state_dict())  # per-class attention keys converted
            mine = batched.student.state_dict()
            for n, p in same.state_dict().items():  # parameters and BatchNorm running statistics
                if p.is_floating_point():
                    weights = max(weights, float((mine[n] - p).abs().max() / p.abs().max().clamp(min=1e-12)))
    finally:
        torch.set_default_dtype(default)
    with_contr = sum(c > 0 for c in contr)
    if not with_contr:
        print(f"WARNING: attention_losses: L_contr never ran in {iterations} iterations (bank empty): "
              "the comparison did not reach the attention", file=sys.stderr)

    def first_over(diffs, limit=1e-4):
        return next((i for i, d in enumerate(diffs) if d > limit), None)

    return {"device": str(device), "setting": name, "iterations": iterations, "dtype": dtype, "overrides": settings,
            "max_contr": max(contr), "iterations_with_contr": with_contr, "bank_vectors_at_end": bank,
            "max_abs_loss_difference_free": max(free), "free_differences": free,
            "first_iteration_over_1e-4": first_over(free),
            "control": {"what": f"loop vs loop, the second run on {control_threads} thread(s) instead of {threads}",
                        "max_abs_loss_difference": max(control), "differences": control,
                        "first_iteration_over_1e-4": first_over(control)},
            "max_abs_loss_difference_one_step": one_step, "max_rel_weight_difference_one_step": weights}


# ----------------------------------------------------------------------------- report
def verdict(key, value):
    if key not in TARGETS:
        return ""
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return f"target {op} {target:g}: {'met' if ok else 'MISSED'}"


def report(result):
    lines = [f"semiseg.bench  {result['date']}  commit {result['commit']}  {result['machine']}"]
    for part in result["parts"]:
        lines.append(f"\n[{part['part']}] {part.get('setting', '')} ({part['device']}"
                     f"{', ' + part['precision'] if 'precision' in part else ''})")
        if part["part"] == "share":
            f, s = part["flops"], part["seconds"]
            lines.append(f"  step {f['step'] / 1e9:.2f} GFLOP in {s['step']:.3f} s; module off {f['step_module_off'] / 1e9:.2f} GFLOP "
                         f"in {s['step_module_off']:.3f} s")
            lines.append(f"  module {f['module'] / 1e9:.3f} GFLOP in {s['module']:.4f} s; bank teacher forward "
                         f"{f['bank_teacher_forward'] / 1e9:.2f} GFLOP in {s['bank_teacher_forward']:.3f} s")
            lines.append(f"  module FLOP share {part['flop_share']:.2%} (paper: {part['paper_flop_share']:.2%}), "
                         f"time share {part['time_share']:.2%}")
        if part["part"] == "loss":
            for k in ("vectorised", "loop"):
                e = part[k]
                lines.append(f"  {k:<10} {e['seconds'] * 1e3:9.1f} ms  peak {e['peak_bytes'] / 2**20:8.1f} MiB "
                             f"({e['peak_without_input_grad_bytes'] / 2**20:.1f} MiB without the input gradient)")
            lines.append(f"  one N x psi matrix: {part['n_x_psi_matrix_bytes'] / 2**20:.1f} MiB; "
                         f"|vectorised - loop| = {part['abs_difference']:.2e}")
        if part["part"] == "precision":
            for k in ("fp32", "bf16_channels_last"):
                e = part[k]
                lines.append(f"  {k:<20} step {e['step_seconds']:.3f} s, model fwd+bwd {e['model_fwd_bwd_seconds']:.3f} s")
        if part["part"] == "syncs":
            lines.append(f"  by site (semiseg.syncs): {part['by_site']}")
            lines.append(f"  syncs outside data loading and augmentation: {part['method_syncs']}")
            if "cuda_sync_debug" in part:
                lines.append(f"  torch.cuda.set_sync_debug_mode warnings by line: {part['cuda_sync_debug']}")
        if part["part"] == "attention":
            for C, counts in part["counts"].items():
                cells = [f"{impl} {c['module']['ops']:5d}" + (f" (S_c: {c['attention_ops']:5d})" if "attention_ops" in c else "")
                         + (f" ({c['module']['fused_kernels']} fused kernels)" if c["module"].get("fused_kernels") else "")
                         for impl, c in counts.items()]
                lines.append(f"  C = {C:>3}: operators " + ", ".join(cells))
            same = [f"{k[:-len('_constant_in_C')]}: {v}" for k, v in part.items() if k.endswith("_constant_in_C")]
            lines.append(f"  count the same for every C: {', '.join(same)}")
        if part["part"] == "attention_losses":
            lines.append(f"  {part['iterations']} iterations in {part.get('dtype', 'float32')}, loss terms batched vs loop: max |difference| "
                         f"{part['max_abs_loss_difference_free']:.2e} side by side from one seed, "
                         f"{part['max_abs_loss_difference_one_step']:.2e} for one step from the same state (weights and "
                         f"BatchNorm statistics after it: max |difference| / max |value| "
                         f"{part['max_rel_weight_difference_one_step']:.1e})")
            lines.append(f"  (L_contr up to {part['max_contr']:.4f} in {part.get('iterations_with_contr', '?')} iterations; "
                         f"{part['bank_vectors_at_end']} vectors in the bank at the end)")
            if "control" in part:
                c = part["control"]
                lines.append(f"  control, {c['what']}: max |difference| {c['max_abs_loss_difference']:.2e}; first over 1e-4 at "
                             f"iteration {c['first_iteration_over_1e-4']} (batched vs loop: {part['first_iteration_over_1e-4']})")
        if part["part"] == "eval":
            lines.append(f"  {part['images']} images at {part['eval_size']} in {part['seconds']:.1f} s: "
                         f"{part['images_per_second']:.2f} images/s ({part['data']})")
        if part["part"] == "throughput":
            for row in part["rows"]:
                lines.append(f"  {row['option']:<20} {row['iterations_per_hour']:>7} iterations/hour  "
                             f"x{row['speedup']:.2f}  (seconds per {row['iterations']} iterations: {row['seconds']})")
        for key, value in part.get("ratios", {}).items():
            lines.append(f"  {key} = {value:.3f}  {verdict(key, value)}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m semiseg.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["share", "loss", "precision", "eval"],
                        choices=["share", "loss", "precision", "eval", "syncs", "throughput", "attention",
                                 "attention_losses"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="for the share and loss parts")
    parser.add_argument("--settings", nargs="+", default=["camvid", "paper"], choices=["camvid", "paper"],
                        help="for the share part")
    parser.add_argument("--compile-contrastive", action="store_true",
                        help="share part: the module under torch.compile (config key compile_contrastive)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median); paper shape on CPU uses 1")
    parser.add_argument("--loss-n", type=int, default=38000, help="vectors in the loss part")
    parser.add_argument("--paper-size", type=int, default=512, help="crop size of the paper-shape setting")
    parser.add_argument("--paper-arch", default="deeplabv2_r101")
    parser.add_argument("--precision-arch", default=None,
                        help="network of the precision part (default: the CamVid profile's; random weights otherwise)")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N val images")
    parser.add_argument("--throughput-iterations", type=int, default=30, help="timed iterations per throughput option")
    parser.add_argument("--throughput-options", nargs="+", default=None, help="throughput options (default: all)")
    parser.add_argument("--attention-classes", type=int, nargs="+", default=[11, 19, 21], help="C of the attention part")
    parser.add_argument("--attention-size", type=int, default=64, help="crop size of the attention part")
    parser.add_argument("--attention-impls", nargs="+", default=["loop", "batched", "compiled"],
                        choices=["loop", "batched", "compiled"], help="implementations of the attention part (loop first)")
    parser.add_argument("--attention-psi", type=int, default=256, help="bank size per class of the attention part")
    parser.add_argument("--loss-iterations", type=int, default=100, help="iterations of the attention_losses part")
    parser.add_argument("--loss-dtype", default="float32", choices=["float32", "float64"],
                        help="dtype of the attention_losses part's two runs")
    parser.add_argument("--out", default=None, help="JSON output (default book/results/bench/<device>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    result = {"date": datetime.date.today().isoformat(), "commit": source_commit(), "command": " ".join(sys.argv),
              "machine": machine(device), "targets": {k: f"{op} {v:g}" for k, (op, v) in TARGETS.items()},
              "flop_counter": FLOP_COUNTER, "parts": []}
    cpu = device.type == "cpu"
    for part in args.parts:
        if part == "share":
            overrides = {"compile_contrastive": True} if args.compile_contrastive else None
            for precision in args.precisions:
                for setting in args.settings:
                    if setting == "camvid":
                        name, trainer, batch = camvid_setting(device, precision, precision == "bf16", overrides)
                        reps = args.reps
                    else:
                        name, trainer, batch = paper_setting(device, precision, precision == "bf16", args.paper_size,
                                                             args.paper_arch, overrides=overrides)
                        reps = 1 if cpu else args.reps
                    name += ", compile_contrastive" if overrides else ""
                    result["parts"].append({"part": "share", **share_part(name, trainer, batch, reps)})
                    del trainer
        elif part == "loss":
            for precision in args.precisions:
                result["parts"].append({"part": "loss", **loss_part(device, max(1, args.reps // 2) if cpu else args.reps,
                                                                     n=args.loss_n, precision=precision)})
        elif part == "precision":
            arch = {"arch": args.precision_arch, "pretrained": False} if args.precision_arch else None
            result["parts"].append({"part": "precision", **precision_part(device, args.reps, arch)})
        elif part == "eval":
            result["parts"].append({"part": "eval", **eval_part(device, args.eval_limit)})
        elif part == "syncs":
            result["parts"].append({"part": "syncs", **syncs_part(device, args.paper_size, args.paper_arch)})
        elif part == "attention":
            result["parts"].append({"part": "attention", **attention_part(device, args.attention_classes, args.attention_size,
                                                                           args.attention_psi, impls=args.attention_impls)})
        elif part == "attention_losses":
            result["parts"].append({"part": "attention_losses", **attention_losses_part(device, args.loss_iterations,
                                                                                         dtype=args.loss_dtype)})
        elif part == "throughput":
            from .throughput import throughput_part

            result["parts"].append({"part": "throughput", "device": "cpu",
                                    **throughput_part(args.throughput_iterations, options=args.throughput_options)})
        print(report({**result, "parts": result["parts"][-1:]}).split("\n", 1)[1], flush=True)
    out = Path(args.out or f"book/results/bench/{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"\n{report(result)}\n\nwritten to {out}")


if __name__ == "__main__":
    main()
