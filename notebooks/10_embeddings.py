# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # Embeddings: what the memory bank holds, and whether unlabeled features join it
#
# The contrastive loss (eq. 8–11) pulls each student prediction vector towards the teacher's
# projection vectors of its class in the memory bank, which come from *labeled* images only
# (§3.4). The claim of the paper is that this aligns the features of unlabeled images with
# those of labeled ones, class by class. Here we look: a UMAP of the bank's vectors coloured by
# class, and a joint UMAP of the bank and of projection vectors $g_\xi(f_\xi^-(x_u))$ of
# unlabeled images (coloured by their ground truth, which training never saw).

# %% tags=["parameters"]
smoke = False
seed = 0
run_dir = ""
max_points_per_class = 120

# %% [markdown]
# The page reads the run's `embeddings.npz` (`python -m semiseg.embeddings RUN`, written at
# the end of every run): the bank, a class-stratified sample of vectors from unlabeled images,
# and their labels. It trains nothing. `run_dir` points it at any run, e.g.
# `papermill ... -p run_dir runs/camvid/1-8/split0/full/seed0`; empty means the committed
# headline run (CamVid 1/8 split 0, full method).

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
import umap

from semiseg import embeddings, results

torch.manual_seed(seed)
path = results.embeddings_path(run_dir or None, smoke=smoke)
data = embeddings.load(path)
class_names, palette = data["class_names"], data["palette"] / 255
print(
    f"{path}: iteration {data['meta']['iteration']}, "
    f"profile {data['meta']['config']['profile']}, "
    f"seed {data['meta']['config']['seed']}"
)

# %% [markdown]
# ## The memory bank
#
# Each class keeps its newest ψ high-quality teacher vectors (FQF + ranking by $S_{c,\xi}$).

# %%
bank_vectors = torch.from_numpy(data["bank_vectors"]).float()
bank_labels = torch.from_numpy(data["bank_labels"]).long()
count = torch.bincount(bank_labels, minlength=len(class_names))
print({name: int(n) for name, n in zip(class_names, count)})

# %% [markdown]
# ## Unlabeled-image features
#
# Teacher projections $g_\xi(f_\xi^-(x_u))$ of pixels of unlabeled training images, the space
# the bank lives in, sampled per class and coloured by their true label (which training never
# reads).

# %%
unl_vectors = torch.from_numpy(data["proj_vectors"]).float()
unl_labels = torch.from_numpy(data["pred_true"]).long()
pseudo = torch.from_numpy(data["pred_pseudo"]).long()
print(
    f"{len(unl_vectors)} unlabeled vectors; "
    "their pseudo-labels (eq. 5) agree with the truth "
    f"for {float((pseudo == unl_labels).float().mean()):.1%}"
)


def subsample(vectors, labels, per_class, generator):
    keep = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
    return vectors[keep], labels[keep]


g = torch.Generator().manual_seed(seed)
bank_s, bank_l = subsample(bank_vectors, bank_labels, max_points_per_class, g)
unl_s, unl_l = subsample(unl_vectors, unl_labels, max_points_per_class, g)
print(f"UMAP on {len(bank_s)} bank + {len(unl_s)} unlabeled vectors")

# %%
# the loss compares directions (eq. 9): embed unit vectors
points = F.normalize(torch.cat([bank_s, unl_s]), dim=1).numpy()
reducer = umap.UMAP(n_neighbors=15, min_dist=0.1, metric="euclidean", random_state=seed,
                    n_jobs=1, n_epochs=50 if smoke else 200)
embedding = reducer.fit_transform(points)
emb_bank, emb_unl = embedding[: len(bank_s)], embedding[len(bank_s):]
fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharex=True, sharey=True)
for c, name in enumerate(class_names):
    axes[0].scatter(*emb_bank[bank_l.numpy() == c].T, s=6, color=palette[c], label=name)
    axes[1].scatter(*emb_unl[unl_l.numpy() == c].T, s=6, color=palette[c], marker="x")
    axes[1].scatter(*emb_bank[bank_l.numpy() == c].T, s=3, color=palette[c], alpha=0.25)
axes[0].set_title("memory bank (labeled images, teacher)")
axes[1].set_title("unlabeled images (x) over the bank (faint)")
axes[0].legend(markerscale=3, fontsize=7, loc="best")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Do labeled and unlabeled features of a class align?
#
# A number to go with the picture: the cosine similarity between the mean direction of each
# class in the bank and the mean direction of the unlabeled vectors of each class. A diagonal
# that stands out means unlabeled features sit with the bank vectors of their own class.

# %%
classes = [
    c
    for c in range(len(class_names))
    if (bank_labels == c).any() and (unl_labels == c).any()
]


def mean_direction(vectors, labels, c):
    return F.normalize(F.normalize(vectors[labels == c], dim=1).mean(0), dim=0)


if not classes:
    print(
        "the memory bank holds no vectors yet "
        "(a run too short for the FQF to accept any): nothing to compare"
    )
sim = np.array(
    [
        [
            float(
                mean_direction(unl_vectors, unl_labels, a)
                @ mean_direction(bank_vectors, bank_labels, b)
            )
            for b in classes
        ]
        for a in classes
    ]
).reshape(len(classes), len(classes))
if classes:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(sim, cmap="viridis", vmin=-1, vmax=1)
    ax.set_xticks(
        range(len(classes)), [class_names[c] for c in classes], rotation=60, fontsize=7
    )
    ax.set_yticks(range(len(classes)), [class_names[c] for c in classes], fontsize=7)
    ax.set(xlabel="bank class", ylabel="unlabeled class")
    fig.colorbar(im)
    fig.tight_layout()
    plt.show()
diag = float(np.mean(np.diag(sim))) if classes else float("nan")
off = (
    float(sim[~np.eye(len(classes), dtype=bool)].mean())
    if len(classes) > 1
    else float("nan")
)
print(f"mean same-class similarity {diag:.3f}, mean other-class similarity {off:.3f}")

# %% [markdown]
# ## Checks

# %%
assert embedding.shape == (len(points), 2) and np.isfinite(embedding).all()
psi = data["meta"]["config"]["psi"]
assert int(count.sum()) == len(bank_vectors) and (count <= psi).all()
# every class with bank entries appears in the bank's embedding
assert set(bank_l.unique().tolist()) == set(torch.nonzero(count).flatten().tolist())
if not smoke and len(classes) > 1:
    # a trained model's unlabeled features point to their own class's bank vectors more
    # than to others
    assert diag > off, (diag, off)

# %% [markdown]
# ## What differs from the paper
#
# The paper shows no embedding plot; this page is our own look at its claim. We embed unit
# vectors (the loss only sees directions, eq. 9) and use the teacher for both sides, as the
# bank does (§3.4).
