"""Count the host synchronisations a piece of code would make on a GPU — on any device (issue #4).

A host sync is a point where Python must wait for the device: reading a value back (``.item()``,
``float(t)``, ``bool(t)``, ``.tolist()``), or an op whose *output shape* depends on tensor values
(boolean-mask indexing, ``nonzero``, ``unique``, ``masked_select``; ``torch.bincount`` on CUDA reads
the input's maximum to size its output; ``repeat_interleave`` with tensor repeats). On the CPU
nothing waits, so timing cannot find them; this counter records the ops themselves through a
``TorchDispatchMode`` (autograd's backward ops included) and, for each, the innermost frame of
``semiseg`` that asked for it. ``torch.cuda.set_sync_debug_mode`` is the CUDA-only cross-check.

    with HostSyncs() as syncs:
        trainer.step(...)
    print(syncs.by_site())   # {'semiseg/train.py:step': 1, ...}
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PACKAGE = Path(__file__).resolve().parent
# ops that wait for the device whatever their arguments
_ALWAYS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2",
           "unique_dim", "unique_consecutive", "bincount", "histc", "equal"}


def _is_bool_index(indices):
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _syncs(func, args, kwargs):
    name = func._overloadpacket.__name__
    if name in _ALWAYS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
        return _is_bool_index(args[1])
    if name == "repeat_interleave":
        return isinstance(args[0] if func._overloadname == "Tensor" else args[1] if len(args) > 1 else None,
                          torch.Tensor) and kwargs.get("output_size") is None
    return False


def _site():
    """``package/file.py:function`` of the innermost frame inside ``semiseg`` (not this file)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(PACKAGE) and path != Path(__file__).resolve():
            return f"semiseg/{path.relative_to(PACKAGE).as_posix()}:{frame.name}"
    return "outside semiseg"


class _Mode(TorchDispatchMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.record(str(func))
        return func(*args, **kwargs)


class HostSyncs:
    """Context manager collecting ``(site, op)`` for every host sync inside it."""

    def __init__(self):
        self.events = []

    def _record(self, op):
        self.events.append((_site(), op))

    def __enter__(self):
        self._mode = _Mode(self._record)
        self._mode.__enter__()
        # .tolist() on a CPU tensor reads memory directly and never reaches the dispatcher
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(tensor):
            counter._record("Tensor.tolist")
            return counter._tolist(tensor)

        torch.Tensor.tolist = tolist
        return self

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        self._mode.__exit__(*exc)
        return False

    def by_site(self, exclude=()):
        """``{site: count}``, leaving out sites whose file is in ``exclude``."""
        return dict(collections.Counter(s for s, _ in self.events if s.split(":")[0] not in exclude))
