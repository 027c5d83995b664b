"""The run folder: everything that makes a run's files safe, apart from the training itself.

A run folder (``Config.run_dir()``) holds ``config.yaml``, ``metrics.jsonl``, ``status.json``,
``checkpoints/iterNNNNNNN.pt``, ``checkpoint.pt`` and ``summary.json``. This module owns:

* **the lock** -- ``lock`` holds the pid of the process training in the folder; a second process
  gets a one-line error naming the folder and the pid; a lock left by a dead process is taken over
  (said in one line);
* **overwrite** -- ``--overwrite`` removes the old run's files before anything new is written, so
  a later ``--resume`` can never continue the old run;
* **the resume check** -- a resumed run must train with the config it started with: any other
  difference is a one-line error naming the key and both values. Only the keys of
  :data:`RESUME_MAY_CHANGE` may differ (they change speed, logging and paths, not the numbers);
* **status** -- ``status.json``: ``running``, ``finished``, ``crashed`` (with the error) or
  ``interrupted`` (with the iteration to resume from);
* **signals** -- SIGTERM (what batch schedulers send before they kill) and SIGINT (Ctrl-C) stop
  the run after the current iteration: :func:`StopSignals.pending` tells the loop, which writes a
  checkpoint, sets ``interrupted``, prints one line on how to resume and exits with 128 + the
  signal number;
* **writes** -- every file is written to a uniquely named temp file in the same folder and
  renamed (never half-written), with the umask's normal mode; a full disk is one line naming the
  file, and the previous file stays intact;
* **JSON** -- no file we write holds NaN or Infinity (they become ``null``).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import tempfile
from pathlib import Path

# Keys that may differ between a run and its resumption: they change speed, logging or where
# files are, never the arithmetic of the method.
RESUME_MAY_CHANGE = ("threads", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "out_dir",
                     "data_root", "cache_images")

# Files of a run folder (removed by --overwrite).
RUN_FILES = ("config.yaml", "metrics.jsonl", "status.json", "summary.json", "checkpoint.pt", "curves.png",
             "embeddings.npz", "train.ipynb", "train.failed.ipynb")


class DiskFullError(OSError):
    """The disk filled up while writing a run file (the previous file is kept)."""

    def __init__(self, path):
        super().__init__(f"disk full while writing {path}; the previous file is kept")
        self.errno = errno.ENOSPC


def _umask_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path, write):
    """Call ``write(file_object)`` on a uniquely named temp file beside ``path``, then rename it to
    ``path`` with the umask's normal mode. Nothing is half-written; a full disk raises
    :class:`DiskFullError` naming ``path`` and leaves the old file in place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"cannot write {path}: a parent of {path.parent} is a file, not a folder") from None
    except PermissionError:
        raise PermissionError(f"cannot create the folder {path.parent}: permission denied") from None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except PermissionError:
        raise PermissionError(f"cannot write {path}: permission denied") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DiskFullError(path) from None
        if isinstance(err, RuntimeError) and "file write failed" in str(err).lower():
            # torch.save's zip writer reports ENOSPC this way ("enforce fail at inline_container.cc")
            raise DiskFullError(path) from None
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def finite(obj):
    """``obj`` with every NaN / Infinity float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kwargs):
    """Strict JSON (``allow_nan=False``) of ``obj`` after :func:`finite`."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def write_json(path, obj, indent=None):
    atomic_write_text(path, dumps(obj, indent=indent) + "\n")


def write_status(run_dir, status, **info):
    """``status.json``: running / finished / crashed (with the error) / interrupted (with the iteration)."""
    write_json(Path(run_dir) / "status.json", {"status": status, **info})


class MetricsLog:
    """``metrics.jsonl``, rewritten atomically at every record: never a half-written line.

    On resume only the records up to the checkpoint's iteration are kept.
    """

    def __init__(self, path, until_iteration):
        self.path = Path(path)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.records = [r for r in map(json.loads, lines) if r.get("iteration", 0) <= until_iteration]
        self._write()

    def add(self, record):
        self.records.append(finite(record))
        self._write()

    def _write(self):
        atomic_write_text(self.path, "".join(dumps(r) + "\n" for r in self.records))


class NoLog:
    """Stands in for the metrics log on processes other than rank 0."""

    def add(self, record):
        pass


# ----------------------------------------------------------------------------- the lock
def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``<run_dir>/lock`` holding this process's pid for the whole run (a context manager)."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / "lock"
        self.held = False

    def acquire(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _umask_mode())
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise RuntimeError(f"{self.path.parent} is in use by process {pid} (lock file {self.path}); "
                                       f"wait for it, or give this run another out_dir") from None
                print(f"taking over the stale lock of {self.path.parent} (process {pid or '?'} is gone)")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise RuntimeError(f"could not lock {self.path.parent}: another process keeps taking the lock")

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------- overwrite and resume
def remove_run_files(run_dir):
    """Remove a previous run's files from ``run_dir`` (``--overwrite``), before anything new is written."""
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def check_resume_config(saved, cfg, path):
    """A resumed run trains with the config it started with; a difference is a one-line error."""
    current = cfg.to_dict()
    for key, value in current.items():
        if key in RESUME_MAY_CHANGE or key not in saved:
            continue
        if saved[key] != value:
            raise ValueError(f"--resume: config key {key!r} is {value!r}, but the run in {path} was started with "
                             f"{saved[key]!r}; only {', '.join(RESUME_MAY_CHANGE)} may change on resume")


# ----------------------------------------------------------------------------- signals
class StopSignals:
    """While active, SIGTERM and SIGINT set :attr:`pending` (the signal number) instead of
    killing the process; the training loop stops after the current iteration."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.pending = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.pending = signum

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(SystemExit):
    """Raised by the training loop after a stop signal: exit status 128 + the signal number."""

    def __init__(self, signum, message):
        super().__init__(128 + signum)
        self.signum, self.message = signum, message
