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
