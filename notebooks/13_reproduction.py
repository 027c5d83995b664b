# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Does the memory bank help? CamVid, three splits, two label ratios
#
# The paper makes two claims that a reproduction at any scale can test:
#
# 1. with few labels the method beats supervised-only training by a wide margin
#    (Table 2: 58.0 mIoU with 1/30 of Cityscapes' labels, 87 % of full supervision);
# 2. the class-wise contrastive term with its memory bank adds to pseudo-labels and
#    entropy minimisation (Table 5: 57.4 → 59.4 on Cityscapes 1/30).
#
# The grid (`python -m semiseg.reproduce camvid --splits 0 1 2 --jobs 2`) trains the
# `camvid_quick` CPU profile on CamVid 1/16 (23 labeled images) and 1/8 (46), three
# splits each with seed = split, in three variants: `supervised` ($\mathcal{L}_{sup}$
# only), `no_contr` (everything but $\mathcal{L}_{contr}$) and `full`; and the ceiling,
# `supervised` with all 367 labels. Every run is scored on CamVid **test** (233 images,
# the literature's split) with val beside it; val is the only split any setting was
# chosen on. Every number below is read from a committed `summary.json` or
# `metrics.jsonl`; nothing is typed.

# %% tags=["parameters"]
smoke = False
model = "student"
split = "test"

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from IPython.display import Markdown, display

from semiseg import results
from semiseg.viz import show_source

runs = results.grid_runs(results.collect())
print(f"{len(runs)} runs of the grid found under book/results")
commits = sorted({r.get("commit") or "?" for r in runs})
machines = sorted({r["machine"] for r in runs})
print(f"trained by commit(s) {', '.join(commits)} on {'; '.join(machines)}")
RATIOS = [r for r in ("1/16", "1/8", "1/1") if any(x["ratio"] == r for x in runs)]


def markdown_table(rows, columns):
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n"
                   for r in rows)
    return head + body


def mean_std(values):
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f} (1 split)"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} ({len(values)})"


# %% [markdown]
# ## Mean ± std over the splits
#
# Student (the paper's model, §4.2) and EMA teacher, on test and val; the last column is
# the student's test mIoU as a percentage of the fully supervised ceiling.

# %%
top = results.ceiling(runs, "student", "test")
rows = []
for ratio in RATIOS:
    for variant in results.GRID_VARIANTS:
        row = {"ratio": ratio, "variant": variant}
        for m in ("student", "teacher"):
            for s in ("test", "val"):
                per_split = results.cells(runs, m, s).get((ratio, variant), {})
                values = list(per_split.values())
                row[f"{m} {s}"] = mean_std(values)
        student = list(results.cells(runs).get((ratio, variant), {}).values())
        if student and top:
            row["% of ceiling"] = f"{100 * np.mean(student) / top:.1f}"
        if any(row[c] for c in row if " " in c):
            rows.append(row)
columns = ["ratio", "variant", "student test", "student val", "teacher test",
           "teacher val", "% of ceiling"]
display(Markdown(markdown_table(rows, columns)))

# %% [markdown]
# ## Paired differences per split
#
# Each split is trained once per variant, so the differences are paired by split. The
# interval is the 95 % Student-t interval of the mean difference (2 degrees of freedom
# with three splits: $t_{0.975,2} = 4.30$, so it is wide).

# %%
pairs = [results.paired(runs, ratio, a, b, model, split)
         for ratio in ("1/16", "1/8") for a, b in (("full", "supervised"),
                                                   ("full", "no_contr"),
                                                   ("no_contr", "supervised"))]
display(Markdown(markdown_table(
    [{"ratio": p["ratio"], "difference": f"{p['a']} − {p['b']}",
      "per split": ", ".join(f"{k}: {d:+.2f}" for k, d in p["diffs"].items()),
      "mean [95 % CI]": results.fmt_interval(p),
      "includes 0": {None: "", True: "**yes**", False: "no"}[p["includes_zero"]]}
     for p in pairs],
    ["ratio", "difference", "per split", "mean [95 % CI]", "includes 0"])))
show_source(results.paired)

# %% [markdown]
# ## What the numbers say
#
# These sentences are generated from the committed summaries.

# %%
display(Markdown("\n".join(f"- {s}" for s in results.conclusions(runs, model, split))))

# %% [markdown]
# ## Label efficiency
#
# Left: test mIoU against the number of labeled images (mean line, one dot per split).
# Right: the same as a percentage of each setup's fully supervised result, beside the
# paper's (Table 2, Cityscapes, DeepLabv2-R101, ImageNet: "Ours" at 1/30, 1/8 and 1/4
# against its "FS" row), at each labeled fraction.

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
table = results.cells(runs, model, split)
for variant, colour in zip(results.GRID_VARIANTS, sns.color_palette(n_colors=3)):
    xs, means, rel = [], [], []
    for ratio in RATIOS:
        per_split = table.get((ratio, variant if ratio != "1/1" else "supervised"), {})
        if not per_split or (ratio == "1/1" and variant != "supervised"):
            continue
        n = np.mean([results.labeled_count("camvid", ratio, k) for k in per_split])
        left.scatter([n] * len(per_split), list(per_split.values()), color=colour, s=14)
        xs.append(n)
        means.append(np.mean(list(per_split.values())))
    if xs:
        left.plot(xs, means, "-o", color=colour, label=variant)
        if top:
            right.plot([x / 367 for x in xs], [100 * m / top for m in means], "-o",
                       color=colour, label=f"ours, {variant}")
paper = {r["labels"]: r["miou"] for r in results.paper_table(2)
         if r["method"] == "Ours" and r["pretraining"] == "ImageNet"
         and r["architecture"] == "DeepLabv2-R101"}
fractions = [(1 / 30, "1/30"), (1 / 8, "1/8"), (1 / 4, "1/4")]
paper_rel = [100 * paper[k] / paper["FS"] for _, k in fractions]
right.plot([f for f, _ in fractions], paper_rel, "k--s",
           label="paper, Table 2 (Cityscapes)")
left.set(xscale="log", xlabel="labeled images", ylabel=f"{split} mIoU (%)",
         title=f"CamVid {split}, {model}")
right.set(xscale="log", xlabel="fraction of the training set labeled",
          ylabel="% of fully supervised", title="relative to full supervision")
for ax in (left, right):
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Per-class IoU: where does the unlabeled data help?
#
# `full − supervised` per class on test: the bar is the mean over splits, each dot one split.

# %%
long = []
by_key = {(r["ratio"], r["variant"], r["split"]): r for r in runs}
for (ratio, variant, k), r in by_key.items():
    base = by_key.get((ratio, "supervised", k))
    if variant != "full" or base is None:
        continue
    ours = r["scores"][model][split]["per_class_iou"]
    theirs = base["scores"][model][split]["per_class_iou"]
    long += [{"class": c, "difference": ours[c] - theirs[c], "ratio": ratio, "split": k}
             for c in ours if ours[c] is not None and theirs[c] is not None]
if long:
    fig, ax = plt.subplots(figsize=(11, 3.6))
    x = [d["class"] for d in long]
    y = [d["difference"] for d in long]
    hue = [d["ratio"] for d in long]
    sns.barplot(x=x, y=y, hue=hue, errorbar=None, alpha=0.6, ax=ax)
    sns.stripplot(
        x=x, y=y, hue=hue, dodge=True, palette="dark:k", size=3, legend=False, ax=ax
    )
    ax.axhline(0, color="k", lw=0.8)
    ax.set(ylabel="IoU difference (points)",
           title=f"full − supervised, {model}, {split}")
    plt.setp(ax.get_xticklabels(), rotation=30)
    fig.tight_layout()
    plt.show()
else:
    print("no split has finished both full and supervised yet")

# %% [markdown]
# ## Learning curves (split 0)
#
# From each run's `metrics.jsonl`: the loss terms of eq. (1) (unweighted), the memory
# bank's fill, the accuracy of the pseudo-labels of eq. (5) on the unlabeled images (read
# against their true labels, for this plot only), the mean pixel weight
# $\beta = \text{confidence}^6$ of $\mathcal{L}_{pseudo}$, and val mIoU of student and
# teacher every 250 iterations.
#
# **Why the teacher can end below the student.** Eq. (2) with $\tau$ rising linearly to 1
# makes the teacher's update $1-\tau$ shrink to 0: in the last iterations the teacher
# barely moves, while the student still learns (the learning rate decays as a polynomial,
# not to zero until the very end). The teacher is an average of the students of earlier
# iterations, so at the end of a short schedule it lags behind the student.

# %%
def records(run):
    path = Path(run["path"]).with_name("metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


curve_runs = [r for r in runs if r["split"] == 0 and r["ratio"] != "1/1"]
if curve_runs:
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    def curve(recs, key):
        return [x["iteration"] for x in recs], [x[key] for x in recs]

    for r in sorted(curve_runs, key=lambda r: (r["ratio"], r["variant"])):
        rec = records(r)
        steps = [x for x in rec if "loss" in x]
        label = f"{r['ratio']} {r['variant']}"
        axes[0].plot(*curve(steps, "sup"), label=label)
        if r["variant"] == "full":
            axes[1].plot(*curve(steps, "bank_fill"), label=label)
        semi = [x for x in steps if "pseudo_acc" in x]
        if semi:
            axes[2].plot(*curve(semi, "pseudo_acc"), label=f"{label}: accuracy")
            axes[2].plot(*curve(semi, "pseudo_beta"), ":", label=f"{label}: mean β")
        evals = [x for x in rec if "teacher_val_miou" in x]
        line, = axes[3].plot(*curve(evals, "val_miou"), label=f"{label} student")
        axes[3].plot(*curve(evals, "teacher_val_miou"), "--", color=line.get_color(),
                     label=f"{label} teacher")
    titles = ("L_sup", "memory bank fill", "pseudo-labels", "val mIoU")
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="iteration")
        ax.legend(fontsize=6)
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ### Bank fill per class at the end (split 0, full)
#
# Which classes the Feature Quality Filter (confidence > φ and correct) let into the bank.

# %%
fill_rows = []
for r in curve_runs:
    if r["variant"] != "full":
        continue
    last = [x for x in records(r) if "bank_fill_per_class" in x][-1]
    names = list(r["scores"]["student"]["test"]["per_class_iou"])
    fills = zip(names, last["bank_fill_per_class"])
    fill_rows.append({"ratio": r["ratio"], **{n: f"{f:.2f}" for n, f in fills}})
if fill_rows:
    display(Markdown(markdown_table(fill_rows, list(fill_rows[0]))))

# %% [markdown]
# ## What the unlabeled terms had to work with
#
# A gain from $\mathcal{L}_{pseudo}$ and $\mathcal{L}_{contr}$ needs a teacher whose
# pseudo-labels are right and confident, and a memory bank that holds every class. The
# table reads each semi-supervised run's log: where the warm-up ended (the grid's commit
# used the paper's fixed rule, 2/150 of the schedule), the first logged iteration at which
# the mean pixel weight $\beta$ reached 0.05 (the default of the warm-up gate added after
# the grid, README "Choices the paper leaves open"), the first at which the bank held more
# than one class, and at the end the pseudo-label accuracy, the mean $\beta$ and the
# classes in the bank. Between the end of the warm-up and the first two columns, the
# unlabeled terms trained on what an unconfident teacher gave them.

# %%
signal_rows = []
for r in sorted(runs, key=lambda r: (r["ratio"], r["variant"], r["split"])):
    if r["variant"] == "supervised":
        continue
    sig = results.unlabeled_signals(r)
    banked = r["variant"] != "no_contr"  # no_contr has no L_contr, so no memory bank
    signal_rows.append({
        "ratio": r["ratio"], "variant": r["variant"], "split": r["split"],
        "warm-up ended": sig["warmup_end"],
        "β ≥ 0.05 from": sig["beta_reached"] or "never",
        "bank > 1 class from": (sig["bank_two_classes"] or "never") if banked else "–",
        "pseudo acc (end)": f"{sig['pseudo_acc_end']:.3f}",
        "β (end)": f"{sig['beta_end']:.3f}",
        "bank classes (end)": (
            f"{sig['bank_classes_end']} of {sig['classes']}" if banked else "–"
        ),
    })
if signal_rows:
    display(Markdown(markdown_table(signal_rows, list(signal_rows[0]))))
    lags = [x["β ≥ 0.05 from"] - x["warm-up ended"] for x in signal_rows
            if isinstance(x["β ≥ 0.05 from"], int) and x["warm-up ended"] is not None]
    if lags:
        print(f"iterations between the end of the warm-up and beta >= 0.05: "
              f"{min(lags)} to {max(lags)} over {len(lags)} run(s)")

# %% [markdown]
# ## After the grid: a warm-up that waits for the teacher
#
# The table above suggests that the unlabeled terms start too early. The warm-up gate
# (`warmup_beta`, README "Choices the paper leaves open") keeps $\lambda_{pseudo}$ and
# $\lambda_{contr}$ at 0 until the running mean of $\beta$ reaches 0.05, as well as for the
# paper's fixed fraction. The check retrains `full` with the gate on cells of the grid (same
# profile, split and seed; a later commit whose resolved config differs only by the gate
# and the stacked attention, `attention_impl: batched`, the same numbers up to rounding) and
# sets each run beside the grid's `full` and `supervised` of the same split. The runs live
# in `book/results/checks/warmup_gate_1500/`; they are not part of the grid.

# %%
gate = results.check_runs()
if gate:
    display(Markdown(results.gate_table(runs, gate)))
    gate_rows = []
    for r in sorted(gate, key=lambda r: (r["ratio"], r["split"])):
        sig = results.unlabeled_signals(r)
        gate_rows.append({
            "ratio": r["ratio"], "split": r["split"],
            "warm-up ended": sig["warmup_end"],
            "β ≥ 0.05 from": sig["beta_reached"] or "never",
            "bank > 1 class from": sig["bank_two_classes"] or "never",
            "bank classes (end)": f"{sig['bank_classes_end']} of {sig['classes']}",
        })
    display(Markdown(markdown_table(gate_rows, list(gate_rows[0]))))
    for ratio in sorted({r["ratio"] for r in gate}):
        for b in ("full", "supervised"):
            p = results.paired(runs + gate, ratio, "full_gate", b, model, split)
            print(f"{ratio}: gated full - {b} = {results.fmt_interval(p)} "
                  f"over {p['n']} split(s)"
                  + ("; the interval includes 0" if p["includes_zero"] else ""))
else:
    print("No run of the warm-up gate check is committed.")

# %% [markdown]
# ## Before the grid: the head learning rate
#
# The grid's one measured choice. The official optimizer trains every layer at one rate
# (`model/deeplabv2.py`, `optim_parameters`), and so does the paper; DeepLab practice
# trains new layers at 10×. `head_lr_mult` was picked on CamVid 1/8 split 0 (seed 0),
# both variants, by **val** mIoU; test is shown for completeness only.

# %%
choice_rows = []
choices = Path(results.BOOK / "results" / "choices")
for path in sorted(choices.glob("*/*/*/split*/*/seed*/summary.json")):
    s = json.loads(path.read_text())
    choice_rows.append({"setting": path.parts[-7], "variant": s["variant"],
                        "val": f"{s['val_miou']:.2f}", "test": f"{s['miou']:.2f}",
                        "teacher val": f"{s['teacher_val_miou']:.2f}",
                        "minutes": f"{s['seconds'] / 60:.1f}", "commit": s["commit"]})
choice_columns = ["setting", "variant", "val", "test", "teacher val", "minutes",
                  "commit"]
display(Markdown(markdown_table(choice_rows, choice_columns)
                 if choice_rows else "No choice runs are committed."))

# %% [markdown]
# ## Checks

# %%
for r in runs:
    on_disk = json.loads(Path(r["path"]).read_text())
    headline = on_disk["scores"]["student"][r["scored_on"]]["miou"]
    assert headline == r["miou"]
    assert r["profile"] == "quick" and r["seed"] == r["split"]
assert all(p["n"] <= 3 for p in pairs)
