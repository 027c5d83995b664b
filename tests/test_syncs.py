"""Issue #4: host synchronisations of a training step, counted by ``semiseg.syncs.HostSyncs``."""

import torch

from semiseg.config import load_config
from semiseg.data.sampling import Batches
from semiseg.losses import class_histogram
from semiseg.models.heads import ClassAttention
from semiseg.syncs import HostSyncs
from semiseg.train import Trainer, build_train_data


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


def test_class_histogram_matches_its_syncing_version():
    labels = torch.randint(0, 7, (500,))
    assert torch.equal(class_histogram(labels, 9), torch.bincount(labels, minlength=9))


def test_class_attention_never_waits_for_the_device():
    """Issue #13: S_c runs with static shapes, in training (with a valid mask) and in eval."""
    torch.manual_seed(0)
    att = ClassAttention(4, dim=8, hidden=8).train()
    vectors, labels = torch.randn(40, 8, requires_grad=True), torch.randint(0, 4, (40,))
    valid = torch.rand(40) > 0.2
    with HostSyncs() as syncs:
        att(vectors, labels, valid).sum().backward()
        att.eval()(vectors, labels)
    assert syncs.events == []


def test_one_training_step_syncs_once_outside_data_loading():
    """One sync for the logged loss values; none in the class-wise attention (issue #13: fixed
    shapes, no segment sizes read back), the losses, the memory bank, the heads, the optimizer step
    or the EMA. Data loading and augmentation (CPU draws, ClassMix's ``unique``) are outside the
    method and left out."""
    torch.manual_seed(0)
    cfg = load_config("smoke", {"fqf": False, "warmup_frac": 0.0, "warmup_beta": 0.0})
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
    assert sites == {"semiseg/train.py:step": 1}
