# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Training one run (the parameterised notebook)
#
# This notebook trains one run of the method — or one of its ablations — and is what
# papermill executes for every reproduction run. Change the cell below by hand in
# JupyterLab, or from the command line:
#
# ```bash
# jupytext --to ipynb -o /tmp/08_train.ipynb notebooks/08_train.py   # the .py is the source
# papermill /tmp/08_train.ipynb out.ipynb -p variant supervised -p seed 1
# ```
#
# A run writes `config.yaml` (every setting, resolved), `metrics.jsonl` (loss terms every
# `log_every` iterations), `summary.json` (mIoU in percent, per-class IoU, time, seed, split,
# profile) and `checkpoint.pt` into `out_dir`, plus `curves.png`. With `resume=True` it
# continues from the newest valid checkpoint of `out_dir` (profiles write one every
# `checkpoint_every` iterations).

# %% tags=["parameters"]
profile = "camvid_quick"
dataset = "camvid"
ratio = "1/8"
split = 0
variant = "full"
seed = 0
out_dir = ""
overrides = ""
resume = False
smoke = False

# %%
import json

import matplotlib.pyplot as plt

from semiseg.config import load_config
from semiseg.train import train

settings = {
    "dataset": dataset,
    "ratio": ratio,
    "split": split,
    "variant": variant,
    "seed": seed,
}
# e.g. "lambda_contr=1 psi=64"
settings.update(dict(item.split("=", 1) for item in overrides.split()))
if smoke:
    profile = "smoke"
    settings.update({"dataset": "tiny", "ratio": "1/1" if ratio == "1/1" else "1/4"})
cfg = load_config(profile, settings)
if out_dir:
    cfg.out_dir = out_dir
print(
    f"profile {cfg.profile}: {cfg.arch}, {cfg.iterations} iterations, "
    f"run dir {cfg.run_dir()}"
)

# %% [markdown]
# A variant is a named set of overrides (`semiseg.config.VARIANTS`, applied by `load_config`
# wherever `variant=` is given): `supervised` sets
# $\lambda_{pseudo} = \lambda_{ent} = \lambda_{contr} = 0$; `full` keeps the paper's
# $\lambda_{sup}=1, \lambda_{pseudo}=1, \lambda_{ent}=0.01, \lambda_{contr}=0.1$. The
# `overrides` parameter adds any other setting, e.g. `"lambda_contr=1"` for Table 6.

# %%
summary_path = cfg.run_dir() / "summary.json"
if summary_path.exists():
    print(f"{summary_path} exists: showing the finished run")
    summary = json.loads(summary_path.read_text())
else:
    summary = train(cfg, progress=True, resume=resume)
keys = (
    "variant",
    "seed",
    "scored_on",
    "miou",
    "val_miou",
    "teacher_miou",
    "iterations",
    "seconds",
)
print(json.dumps({k: summary.get(k) for k in keys}))

# %% [markdown]
# ## Curves
# Loss terms of eq. (1) over the iterations (each unweighted), and the memory-bank fill.

# %%
records = [
    json.loads(line)
    for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()
]
steps = [r for r in records if "loss" in r]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for term in ("sup", "pseudo", "ent", "contr"):
    points = [(r["iteration"], r[term]) for r in steps if term in r]
    if points:
        axes[0].plot(*zip(*points), label=term)
axes[0].set(xlabel="iteration", ylabel="loss term", yscale="log", title="loss terms")
axes[0].legend()
axes[1].plot([r["iteration"] for r in steps], [r["bank_fill"] for r in steps])
axes[1].set(
    xlabel="iteration",
    ylabel="fraction of psi filled",
    title="memory bank fill",
    ylim=(0, 1.05),
)
fig.tight_layout()
curves = cfg.run_dir() / "curves.png"
tmp = curves.with_name(".curves.png.tmp")
fig.savefig(tmp, format="png", dpi=80)
tmp.replace(curves)

# %% [markdown]
# ## Checks

# %%
assert summary_path.exists() and 0.0 <= summary["miou"] <= 100.0
assert summary["variant"] == variant and summary["seed"] == seed
assert steps and steps[-1]["iteration"] == cfg.iterations
if variant == "supervised":
    assert all("pseudo" not in r and "contr" not in r for r in steps)

# %% [markdown]
# ## Every config key
#
# Generated from the comments of `semiseg.config.Config` (also printed by
# `python -m semiseg.train --keys`). A profile is a YAML file of some of these keys; any key can
# be overridden on the command line (`key=value`) or in the `overrides` parameter above.
# `base_size` resizes every image to exactly [W, H] before the random crop, whatever its size
# and shape (the aspect ratio is not kept); `null` crops from the image as it is.

# %%
from IPython.display import Markdown, display

from semiseg.config import keys_table

display(Markdown(keys_table()))
