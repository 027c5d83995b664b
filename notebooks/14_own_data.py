# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Train on your own data
#
# Your images and masks go in a `folder` dataset (layout in `data/README.md`). This page
# builds one offline, then runs the commands you would type, in order, and shows what
# each prints:
#
# ```bash
# export SEMISEG_SPLITS=<where the split lists go>    # default: the repo's data/splits
# python -m semiseg.data.splits folder --root <root> --ratios 1/4 --splits 0
# python -m semiseg.train camvid_quick dataset=folder data_root=<root> ratio=1/4 \
#     test_split=null iterations=300 variant=supervised out_dir=<run>   # and =full
# python -m semiseg.evaluate <run>/checkpoint.pt
# python -m semiseg.predict <run>/checkpoint.pt <images> --out <dir>
# jupytext --to ipynb -o <tmp>/10_embeddings.ipynb notebooks/10_embeddings.py
# papermill <tmp>/10_embeddings.ipynb <out>.ipynb -p run_dir <run>
# ```
#
# Everything is written under `runs/own_data/` (ignored by git); the page empties its
# folder there first. The site shows the page in its smoke mode (`smoke = True`, the
# default): a handful of small images and the seconds-long `smoke` profile, so every
# command really runs while the book builds. With `smoke = False` (in JupyterLab, or
# `papermill ... -p smoke False`) it exports 60 + 20 images at 240×180 and trains 300
# iterations of `camvid_quick` per variant: the whole page took 6 min 28 s on the 2-core
# development machine with nothing else running (2026-12-02, commit `b888c73`, seed 0). There
# `supervised` reached 38.76 val mIoU and `full` 36.33, with the warning that its warm-up had
# not ended at half the schedule (the teacher's mean β was 0.013 < 0.05): 300 iterations are
# too few for the unlabeled terms on 15 labeled images, and the run says so.

# %% tags=["parameters"]
smoke = True
n_train = 60
n_val = 20
size = [240, 180]
iterations = 300
ratio = "1/4"
seed = 0

# %% [markdown]
# The commands are typed at the repository root, so the page works there too; its
# scratch folder is `runs/own_data/quick` (`runs/own_data/smoke` in smoke mode).

# %%
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import numpy as np
from PIL import Image

import semiseg
from semiseg import embeddings
from semiseg.data import build_dataset, camvid_or_tiny
from semiseg.data.datasets import read_index_mask
from semiseg.data.export import export_split, shuffled_palette_mask, write_palette
from semiseg.viz import label_image, show_source

if smoke:
    n_train, n_val, size = 12, 4, [96, 72]
os.chdir(Path(semiseg.__file__).resolve().parents[1])
work = Path("runs") / "own_data" / ("smoke" if smoke else "quick")
shutil.rmtree(work, ignore_errors=True)
root = work / "data"
print(f"repository {Path.cwd()}, scratch folder {work}")

# %% [markdown]
# ## 1. A folder dataset, as real datasets ship it
#
# We export CamVid (or, when it is not on disk, the built-in TinyShapes, said loudly) to
# the `folder` layout: `<root>/{train,val}/images/*.png`,
# `<root>/{train,val}/masks/*.png` and one `palette.txt` at `<root>` for both splits,
# one `name R G B` line per class in class order and an `ignore` line whose colour
# becomes label 255. Masks are **colour** masks: most are RGB PNGs, and every third is a
# palette ("P" mode) PNG whose embedded palette lists the same colours in a shuffled
# order, different from file to file and from `palette.txt`, as many real datasets do.
# Its raw pixel values are then not class indices.

# %%
show_source(shuffled_palette_mask)

# %%
train_source, _ = camvid_or_tiny("train")
val_source, _ = camvid_or_tiny("val")
palette_file = write_palette(root, train_source.class_names, train_source.palette)
exported = {
    "train": export_split(train_source, root, "train", n_train, size, seed=seed),
    "val": export_split(val_source, root, "val", n_val, size, seed=seed + 1),
}
print(f"{palette_file}:\n{palette_file.read_text()}")
for split, files in exported.items():
    modes = [mode for mode, _ in files.values()]
    print(
        f"{root / split}: {len(files)} images {size[0]}x{size[1]}, masks "
        f"{modes.count('RGB')} RGB + {modes.count('P')} P-mode"
    )
for path in sorted((root / "train").rglob("*.png"))[:3]:
    print(" ", path)

# %% [markdown]
# `build_dataset("folder", split, root)` reads a P-mode mask through **its own**
# palette: pixel → colour → `palette.txt` class. Reading its raw indices instead (what
# an index-mask reader does) gives other classes everywhere. Left to right: the image,
# the raw indices of a P-mode mask drawn with `palette.txt`'s colours, and the mask as
# the dataset reads it.

# %%
train_set = build_dataset("folder", "train", root)
print(train_set, train_set.class_names)
p_names = [name for name, (mode, _) in exported["train"].items() if mode == "P"]
name = p_names[0]
mask_path = train_set.files[name][1]
image, label = train_set.load_name(name)
raw = read_index_mask(mask_path)
palette_colours = np.array(train_set.palette, np.uint8)
with Image.open(mask_path) as mask:
    embedded = np.array(mask.getpalette()[: 3 * (train_set.num_classes + 1)])
print(f"{mask_path}: mode P, embedded palette (first 4 colours):")
print(f"  {embedded.reshape(-1, 3)[:4].tolist()}")
print(f"palette.txt (first 4 colours): {palette_colours[:4].tolist()}")
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
axes[0].imshow(image)
axes[1].imshow(label_image(raw, train_set.palette))
axes[2].imshow(label_image(label, train_set.palette))
titles = (name, "raw P indices (wrong)", "read through its palette")
for ax, title in zip(axes, titles):
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# The check: every P-mode mask of the export is read back as exactly the class map we
# wrote, and its raw indices differ from it (the palettes really are shuffled).

# %%
for split in ("train", "val"):
    dataset = build_dataset("folder", split, root)
    for name, (mode, written) in exported[split].items():
        if mode != "P":
            continue
        _, label = dataset.load_name(name)
        assert (label == written).all(), f"{split}/{name}: read differs from export"
        raw = read_index_mask(dataset.files[name][1])
        assert (raw != written).all(), f"{split}/{name}: palette not shuffled"
print(f"{sum(m == 'P' for s in exported.values() for m, _ in s.values())} P-mode masks "
      f"read through their own palettes")

# %% [markdown]
# ## 2. The commands
#
# Each command below is printed as you would type it at the repository root (`$ ...`),
# run, and followed by what it printed. `python` is this kernel's interpreter (the
# venv's), and `jupytext` / `papermill` are the ones installed beside it.

# %%
env = dict(os.environ, SEMISEG_SPLITS=str(work / "splits"))
os.environ["SEMISEG_SPLITS"] = env["SEMISEG_SPLITS"]


def sh(command):
    """Print ``command`` as typed, run it with the venv's programs, show its output."""
    print(f"$ {command}")
    args = shlex.split(command)
    if args[0] == "python":
        args[0] = sys.executable
    else:
        args[0] = str(Path(sys.executable).with_name(args[0]))
    done = subprocess.run(args, check=False, capture_output=True, env=env)
    out, err = done.stdout.decode(), done.stderr.decode()
    # progress bars redraw one line with \r: keep what each line ended as
    shown = [line.rsplit("\r", 1)[-1] for line in (out + err).split("\n")]
    print("\n".join(line for line in shown if line.strip()))
    assert done.returncode == 0, f"{command} exited with status {done.returncode}"
    return out


print(f"$ export SEMISEG_SPLITS={env['SEMISEG_SPLITS']}")

# %% [markdown]
# ### Split lists
#
# A run trains on the labeled / unlabeled split lists of its dataset, drawn from the
# names in `<root>/train` (split *k* uses seed *k*). They are written under
# `$SEMISEG_SPLITS`, here the scratch folder, so nothing lands in the repository's
# `data/splits`.

# %%
sh(f"python -m semiseg.data.splits folder --root {root} --ratios {ratio} --splits 0")
labeled = (work / "splits/folder" / ratio.replace("/", "-") / "split0/labeled.txt")
assert labeled.is_file() and labeled.read_text().strip()

# %% [markdown]
# ### Training, supervised-only and the full method
#
# `dataset=folder data_root=<root>` points a profile at the folder; the rest of the
# profile (network, crops, schedule) stays. `camvid_quick` also scores CamVid's test
# split at the end, which our folder does not have, so `test_split=null` leaves val as
# the split the run is scored on; `iterations=300` shortens its 1500. In smoke mode the
# `smoke` profile is used (6 iterations, 64² crops, no pretrained weights): the numbers
# then mean nothing.

# %%
if smoke:
    profile = "smoke"
else:
    profile = f"camvid_quick test_split=null iterations={iterations}"
runs = {}
for variant in ("supervised", "full"):
    runs[variant] = work / variant
    sh(
        f"python -m semiseg.train {profile} dataset=folder data_root={root} "
        f"ratio={ratio} variant={variant} out_dir={runs[variant]} --no-progress"
    )

# %% [markdown]
# Each run folder holds `config.yaml`, `metrics.jsonl`, `checkpoint.pt`, `summary.json`
# and `embeddings.npz`.

# %%
summaries = {}
for variant, run_dir in runs.items():
    assert (run_dir / "summary.json").is_file(), f"{run_dir}: no summary.json"
    summaries[variant] = json.loads((run_dir / "summary.json").read_text())
print(f"{'variant':<12}{'scored on':>10}{'mIoU':>8}{'iters':>7}{'seconds':>9}")
for variant, s in summaries.items():
    print(
        f"{variant:<12}{s['scored_on']:>10}{s['miou']:>8.2f}{s['iterations']:>7}"
        f"{s['seconds']:>9.1f}"
    )
assert all(s["dataset"] == "folder" for s in summaries.values())

# %% [markdown]
# ### Evaluation
#
# `semiseg.evaluate` rebuilds the model and the data from the checkpoint alone and
# scores the student on val (its default split). It must give the mIoU the run wrote
# into `summary.json` for the split it names (`scored_on`).

# %%
run = runs["full"]
summary = summaries["full"]
result = json.loads(sh(f"python -m semiseg.evaluate {run / 'checkpoint.pt'}"))
assert summary["scored_on"] == "val", summary["scored_on"]
assert abs(result["miou"] - summary["miou"]) < 1e-3, (result["miou"], summary["miou"])
print(f"evaluate: {result['miou']:.4f} mIoU, summary.json: {summary['miou']:.4f} (val)")

# %% [markdown]
# ### Prediction on new images
#
# `semiseg.predict` writes `<name>_mask.png` (classes in `palette.txt`'s colours) and
# `<name>_overlay.png` for every image it is given (files or folders).

# %%
images = sorted((root / "val" / "images").glob("*.png"))[:2]
pred_dir = run / "predictions"
sh(
    f"python -m semiseg.predict {run / 'checkpoint.pt'} "
    f"{' '.join(map(str, images))} --out {pred_dir}"
)
expected = {
    pred_dir / f"{p.stem}_{kind}.png" for p in images for kind in ("mask", "overlay")
}
assert set(pred_dir.glob("*.png")) == expected, sorted(pred_dir.glob("*.png"))

# %%
name = images[0].stem
pred = np.asarray(Image.open(pred_dir / f"{name}_mask.png").convert("RGB"))
truth = exported["val"][name][1]
assert pred.shape[:2] == truth.shape
colours = {tuple(c) for c in np.unique(pred.reshape(-1, 3), axis=0).tolist()}
assert colours <= {tuple(c) for c in train_set.palette}, colours
panels = {
    "image": Image.open(images[0]),
    "ground truth": label_image(truth, train_set.palette),
    f"{name}_mask.png": pred,
    f"{name}_overlay.png": Image.open(pred_dir / f"{name}_overlay.png"),
}
fig, axes = plt.subplots(1, 4, figsize=(15, 3))
for ax, (title, picture) in zip(axes, panels.items()):
    ax.imshow(picture)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The embedding page for this run
#
# Any page of the book that takes a `run_dir` renders for your run: convert it from its
# `.py` source with jupytext, then execute it with papermill. Here *Embeddings* reads
# the run's `embeddings.npz` (with `-p smoke True` in smoke mode, which only shortens
# its UMAP), and the check below makes sure it read this run's file.

# %%
ipynb = work / "10_embeddings.ipynb"
executed = run / "10_embeddings.ipynb"
sh(f"jupytext --to ipynb -o {ipynb} notebooks/10_embeddings.py")
smoke_flag = " -p smoke True" if smoke else ""
sh(f"papermill {ipynb} {executed} -p run_dir {run}{smoke_flag} --no-progress-bar")
assert executed.is_file(), executed

# %%
nb = nbformat.read(executed, as_version=4)
printed = "".join(
    out.get("text", "") for cell in nb.cells for out in cell.get("outputs", [])
)
errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
assert not errors and printed, f"{executed}: errors or no output"
print(f"{executed}: {len(nb.cells)} cells executed; it read")
print(" ", printed.splitlines()[0])
assert str(run / "embeddings.npz") in printed.splitlines()[0]
data = embeddings.load(run / "embeddings.npz")
present = sorted(set(data["pred_true"].tolist()) | set(data["bank_labels"].tolist()))
print(f"{run / 'embeddings.npz'}: classes present")
print(" ", [data["class_names"][c] for c in present])
assert present and data["class_names"] == train_set.class_names

# %% [markdown]
# ## What to change for your data
#
# Put your images and masks in the same layout with your `palette.txt` (or `classes.txt`
# for index masks), keep `SEMISEG_SPLITS` where you want the lists, and pick the profile
# by your hardware: `camvid_quick`'s settings (`base_size`, `crop_size`, `eval_size`,
# `iterations`) are for small images on a CPU; the `paper_*` profiles are the paper's
# GPU settings. Every key is listed by `python -m semiseg.train --keys`.
