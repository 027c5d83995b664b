"""Checkpoints that hold everything a run needs to continue exactly where it stopped.

A checkpoint holds student, teacher, optimizer (momentum buffers), the iteration (which fixes
the poly LR position, the tau schedule, the data order and the augmentation randomness, see
``semiseg.data.sampling``), the memory bank, the class-frequency counts, the global RNG states
and the config. Files are written atomically (temp file + rename) to
``<run_dir>/checkpoints/iter<NNNNNNN>.pt``; only the newest ``keep`` are kept. A truncated or
corrupt file is reported and skipped in favour of the previous one.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import torch

from .config import load_config
from .models import build_model
from .run_dir import atomic_write

REQUIRED = ("config", "num_classes", "student", "teacher", "optimizer", "bank", "class_counts", "iteration")


def atomic_torch_save(obj, path):
    """``torch.save`` to a uniquely named temp file in the same folder, then rename: never a
    half-written file; a full disk is one line naming the file (:func:`semiseg.run_dir.atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def checkpoint_dir(run_dir):
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir):
    """Checkpoint files of a run, newest first."""
    return sorted(checkpoint_dir(run_dir).glob("iter*.pt"), reverse=True)


def save_checkpoint(run_dir, state, keep):
    """Write ``state`` as the checkpoint of its iteration and delete all but the newest ``keep``."""
    path = checkpoint_dir(run_dir) / f"iter{state['iteration']:07d}.pt"
    atomic_torch_save(state, path)
    for old in list_checkpoints(run_dir)[max(1, keep):]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path):
    """Load a checkpoint and check that it is complete; raises ValueError naming the file otherwise."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, pickle garbage, ...
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return state


def newest_valid_checkpoint(run_dir):
    """(state, path) of the newest readable checkpoint of a run, or (None, None); skipped files are reported."""
    for path in list_checkpoints(run_dir):
        try:
            return read_checkpoint(path), path
        except ValueError as err:
            warnings.warn(f"{err}; using the previous checkpoint", stacklevel=2)
    return None, None


def check_compatible(state, arch, num_classes, path):
    """A checkpoint from another architecture or class count is refused with one line."""
    saved_arch = state["config"].get("arch")
    if saved_arch != arch:
        raise ValueError(f"checkpoint {path} is for arch {saved_arch!r}, but the config asks for {arch!r}")
    if state["num_classes"] != num_classes:
        raise ValueError(f"checkpoint {path} has {state['num_classes']} classes, but the dataset has {num_classes}")


# the per-class parameters of one attention module, in the order C separate modules registered them
_OLD_ATTENTION_PARAMS = ("fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias")


def upgrade_optimizer_state(saved, student_state, optimizer, model, path):
    """The optimizer state of a checkpoint, for ``optimizer`` (of ``model``); one-line error if it cannot fit.

    A checkpoint from before issue #13 holds, for each ``ClassAttention``, C separate modules:
    6 x C parameters (class by class: fc1.weight, fc1.bias, bn.weight, bn.bias, fc2.weight,
    fc2.bias) where the model now has 6 stacked ones. Their momentum buffers are stacked the
    same way as the weights (:data:`semiseg.models.heads.PER_CLASS_KEYS`); a class whose module
    never had a gradient had no buffer, which is a zero row (SGD without dampening starts its
    buffer at the first gradient, the same as from 0). Any other mismatch is an error naming the
    file: evaluate or predict from it, or restart the run.
    """
    from .models.heads import PER_CLASS_KEYS, ClassAttention

    def mismatch(why):
        return ValueError(f"checkpoint {path}: its optimizer state does not fit this model ({why}); evaluate or predict "
                          f"from it (python -m semiseg.evaluate / semiseg.predict), or restart the run without --resume")

    blocks = {id(m.weight1): m for m in model.modules() if isinstance(m, ClassAttention)}
    if not blocks or not any(".modules_per_class." in k for k in student_state):
        return saved
    groups, state = saved["param_groups"], saved["state"]
    if len(groups) != len(optimizer.param_groups):
        raise mismatch(f"{len(groups)} parameter groups, {len(optimizer.param_groups)} expected")
    new_groups, new_state, new_id = [], {}, 0
    for old_group, group in zip(groups, optimizer.param_groups):
        old_ids, pos, ids, params, i = list(old_group["params"]), 0, [], group["params"], 0
        while i < len(params):
            module = blocks.get(id(params[i]))
            stacked = list(module.parameters()) if module is not None else params[i:i + 1]
            if module is not None and [id(p) for p in params[i:i + len(stacked)]] != [id(p) for p in stacked]:
                raise mismatch("an attention module's parameters are split between groups")
            width = len(_OLD_ATTENTION_PARAMS) * module.num_classes if module is not None else 1
            if pos + width > len(old_ids):
                raise mismatch(f"group {group.get('name', len(new_groups))!r} has {len(old_ids)} saved parameters")
            old = old_ids[pos:pos + width]
            for j, p in enumerate(stacked):
                if module is None:
                    entry = state.get(old[0])
                else:
                    to_row = PER_CLASS_KEYS[_OLD_ATTENTION_PARAMS[j]][1]
                    rows = [state.get(old[c * len(stacked) + j], {}) for c in range(module.num_classes)]
                    keys = set().union(*rows)
                    if any(not torch.is_tensor(r[k]) for r in rows for k in r):
                        raise mismatch("non-tensor state of an attention parameter")
                    entry = {}
                    for k in keys:
                        zero = torch.zeros_like(to_row(next(r[k] for r in rows if k in r)))
                        entry[k] = torch.stack([to_row(r[k]) if k in r else zero for r in rows])
                    entry = entry or None
                if entry is not None:
                    new_state[new_id] = entry
                ids.append(new_id)
                new_id += 1
            pos += width
            i += len(stacked)
        if pos != len(old_ids):
            raise mismatch(f"group {group.get('name', len(new_groups))!r} has {len(old_ids)} saved parameters")
        new_groups.append({**old_group, "params": ids})
    return {"state": new_state, "param_groups": new_groups}


def resolve_device(cfg):
    """The torch device of a config; asking for CUDA or bf16 where they are missing is a one-line error."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config key 'device' = 'cuda' but no CUDA device is available (use device=cpu)")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    if cfg.precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"config key 'precision' = 'bf16' but {torch.cuda.get_device_name()} has no bfloat16 support (use precision=fp32)")
    return device


def load_checkpoint_model(path, teacher=False):
    """(config, model in eval mode, device) from a checkpoint written by :func:`train`."""
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = read_checkpoint(path)
    cfg = load_config(overrides=state["config"])
    device = resolve_device(cfg)
    model = build_model(cfg.arch, state["num_classes"], pretrained=False)
    model.load_state_dict(state["teacher" if teacher else "student"])
    return cfg, model.to(device).eval(), device
