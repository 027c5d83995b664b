"""Issue #4: host synchronisations of a training step, counted by ``semiseg.syncs.HostSyncs``."""

import pytest
import torch

from semiseg.config import load_config
from semiseg.data.sampling import Batches
from semiseg.losses import class_histogram
from semiseg.models.heads import ClassAttention
from semiseg.syncs import HostSyncs
from semiseg.train import Trainer, build_train_data, first_true


def test_counter_sees_the_usual_syncs():
    x = torch.randn(6)
    with HostSyncs() as syncs:
        x[x > 0]
        float(x.sum())
        x.tolist()
        torch.bincount(torch.tensor([1, 2]))
        x[torch.tensor([0, 2])]  # integer index: no sync
        x.sum() * 2  # no sync
    assert [op for _, op in syncs.events] == ["aten.index.Tensor", "aten._local_scalar_dense.default", "Tensor.tolist",
                                              "aten.bincount.default"]
    assert syncs.by_site() == {"outside semiseg": 4}


def test_class_histogram_and_first_true_match_their_syncing_versions():
    labels = torch.randint(0, 7, (500,))
    assert torch.equal(class_histogram(labels, 9), torch.bincount(labels, minlength=9))
    mask = torch.rand(300) > 0.4
    assert torch.equal(first_true(mask, int(mask.sum())), mask.nonzero()[:, 0])


def test_class_attention_with_given_counts_matches_counting_itself():
    torch.manual_seed(0)
    att = ClassAttention(4, dim=8, hidden=8).train()
    vectors, labels = torch.randn(40, 8), torch.randint(0, 4, (40,))
    counts = torch.bincount(labels, minlength=4).tolist()
    with HostSyncs() as syncs:
        given = att(vectors, labels, counts)
    assert syncs.events == []
    assert torch.equal(given, att(vectors, labels))
    with pytest.raises(ValueError, match="summing to 40"):
        att(vectors, labels, [1, 2, 3, 4])


def test_one_training_step_syncs_twice_outside_data_loading():
    """One sync for the counts of all class-wise attention calls, one for the logged loss values;
    none in the losses, the memory bank, the heads or the EMA. Data loading and augmentation (CPU
    draws, ClassMix's ``unique``) are outside the method and left out."""
    torch.manual_seed(0)
    cfg = load_config("smoke", {"fqf": False, "warmup_frac": 0.0})
    labeled, unlabeled, _ = build_train_data(cfg)
    trainer = Trainer(cfg, labeled.num_classes, len(labeled), "cpu")
    lab = Batches(labeled, 2, cfg.base_size, cfg.crop_size, 1)
    unl = Batches(unlabeled, 2, cfg.base_size, cfg.crop_size, 2)
    for it in range(3):
        trainer.step(lab(it), unl(it))
    assert int(trainer.bank.count.sum()) > 0  # the attention on bank slots runs too
    batches = lab(3), unl(3)
    with HostSyncs() as syncs:
        terms = trainer.step(*batches)
    assert "contr" in terms
    sites = syncs.by_site(exclude=("semiseg/data/augment.py", "semiseg/data/sampling.py"))
    assert sites == {"semiseg/train.py:host_counts": 1, "semiseg/train.py:step": 1}
