"""The images of a run: labeled, unlabeled and source training sets, and the splits it is scored on.

Built from a :class:`semiseg.config.Config` and the committed split lists (§4.1).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .registry import build_dataset
from .splits import read_split

if TYPE_CHECKING:  # annotations only: the config module is not imported by the data layer
    from ..config import Config


def build_train_data(cfg: Config):
    """Labeled and unlabeled training sets from the committed split lists (§4.1; 'tiny' builds its own)."""
    full = build_dataset(cfg.dataset, "train", cfg.data_root)
    if cfg.dataset == "tiny":
        names = full.names
        n = max(1, math.ceil(len(names) / int(cfg.ratio.split("/")[1])))
        labeled, unlabeled = names[:n], names[n:]
    elif cfg.ratio == "1/1":  # the fully supervised ceiling: every training image labeled
        labeled, unlabeled = list(full.names), []
    else:
        labeled, unlabeled = read_split(cfg.dataset, cfg.ratio, cfg.split)
    source = None
    if cfg.target_sequences:
        keep = tuple(s + "_" for s in cfg.target_sequences)
        labeled = [n for n in labeled if n.startswith(keep)]
        unlabeled = [n for n in unlabeled if n.startswith(keep)]
    if cfg.source_dataset:
        src = build_dataset(cfg.source_dataset, "train", cfg.data_root)
        if cfg.source_sequences:
            src = src.subset([n for n in src.names if n.startswith(tuple(s + "_" for s in cfg.source_sequences))])
        source = src
    if not labeled:
        raise ValueError(f"the labeled split of {cfg.dataset} {cfg.ratio} split{cfg.split} is empty")
    if not unlabeled and (cfg.lambda_pseudo or cfg.lambda_ent) and not cfg.source_dataset:
        # a semi-supervised variant with nothing unlabeled would silently train supervised-only
        raise ValueError(f"variant {cfg.variant!r} needs unlabeled images, but {cfg.dataset} ratio {cfg.ratio} "
                         f"split{cfg.split} has none (use variant=supervised)")
    return full.subset(labeled), full.subset(unlabeled), source


def build_eval_dataset(cfg: Config, split="val"):
    """The images of ``split`` a run is scored on.

    With ``target_sequences`` (domain adaptation) only the target's frames of that split, when it
    has any: CamVid's test split holds 62 frames of the dusk sequence 0001TP, so the demo is scored
    inductively on frames never trained on. CamVid's val split holds none, so val stays whole (a
    documented choice: val is only used to choose settings).
    """
    dataset = build_dataset(cfg.dataset, split, cfg.data_root)
    if cfg.target_sequences:
        keep = tuple(s + "_" for s in cfg.target_sequences)
        target = [n for n in dataset.names if n.startswith(keep)]
        if target:
            dataset = dataset.subset(target)
    return dataset


def eval_splits(cfg: Config):
    """The splits a finished run is scored on: ``test_split`` first (the headline) when set, then val."""
    return [cfg.test_split, "val"] if cfg.test_split and cfg.test_split != "val" else ["val"]
