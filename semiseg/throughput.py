"""``python -m semiseg.bench --parts throughput``: training iterations per hour on this machine.

Issue #9 asks, before the reproduction grid, which way of using the 2 CPU cores trains fastest
without changing the method. Each option trains the ``camvid_quick`` profile (the full method,
real CamVid batches through :func:`semiseg.train.setup`, data loading included) for a few
iterations in a fresh process, one option at a time, nothing else running:

* ``1x2 threads``        -- one run, ``threads=2`` (how runs were trained so far);
* ``2x1 thread``         -- two runs side by side, ``threads=1`` each (iterations of both count);
* ``channels_last``      -- one run, 2 threads, NHWC convolutions in fp32;
* ``compile``            -- one run, 2 threads, ``torch.compile`` of the networks' forward passes;
* ``cache_images``       -- one run, 2 threads, each training image decoded and resized once;
* ``2x1 thread + cache`` -- the side-by-side runs with the image cache;
* ``2x1 thread + channels_last + cache`` -- and NHWC convolutions.

Every option leaves the arithmetic of the method unchanged (``cache_images`` gives bit-identical
batches, a test says so); bf16 is not among them because it changes the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

OPTIONS = {  # name -> (processes, threads per process, overrides)
    "1x2 threads": (1, 2, {}),
    "2x1 thread": (2, 1, {}),
    "channels_last": (1, 2, {"channels_last": True}),
    "compile": (1, 2, {"compile": True}),
    "cache_images": (1, 2, {"cache_images": True}),
    "2x1 thread + cache": (2, 1, {"cache_images": True}),
    "2x1 thread + channels_last + cache": (2, 1, {"channels_last": True, "cache_images": True}),
}


def worker(overrides, iterations, warmup):
    """Train ``warmup`` + ``iterations`` steps of camvid_quick (full method) in this process;
    returns the seconds of the last ``iterations`` (data loading included)."""
    import torch

    from .config import load_config
    from .data.tiny import camvid_or_tiny
    from .train import setup

    _, tiny = camvid_or_tiny("train")
    cfg = load_config("camvid_quick", {**tiny, "warmup_frac": 0.0, "warmup_beta": 0.0, "eval_every": 0, **overrides})
    torch.set_num_threads(cfg.threads)
    trainer, batches, _ = setup(cfg)
    for it in range(warmup):
        trainer.step(*batches(it))
    start = time.perf_counter()
    for it in range(warmup, warmup + iterations):
        trainer.step(*batches(it))
    return time.perf_counter() - start


def measure(name, iterations=30, warmup=5):
    """Iterations per hour of option ``name`` (all its processes together)."""
    processes, threads, overrides = OPTIONS[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = []
    for k in range(processes):
        spec = json.dumps({"overrides": {**overrides, "threads": threads, "seed": k}, "iterations": iterations,
                           "warmup": warmup})
        procs.append(subprocess.Popen([sys.executable, "-m", "semiseg.throughput", spec], env=env,
                                      stdout=subprocess.PIPE, text=True))
    seconds = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"throughput option {name!r}: worker exited with status {proc.returncode}")
        seconds.append(json.loads(out.strip().splitlines()[-1])["seconds"])
    per_hour = sum(iterations / s for s in seconds) * 3600
    return {"option": name, "processes": processes, "threads": threads, "overrides": overrides,
            "iterations": iterations, "seconds": [round(s, 2) for s in seconds],
            "iterations_per_hour": round(per_hour)}


def throughput_part(iterations=30, warmup=5, options=None):
    rows = [measure(name, iterations, warmup) for name in (options or OPTIONS)]
    base = rows[0]["iterations_per_hour"]
    for row in rows:
        row["speedup"] = round(row["iterations_per_hour"] / base, 3)
    best = max(rows, key=lambda r: r["iterations_per_hour"])
    return {"setting": "camvid_quick full method, data loading included", "rows": rows, "best": best["option"],
            "best_speedup": best["speedup"]}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps({"seconds": worker(spec["overrides"], spec["iterations"], spec["warmup"])}))
