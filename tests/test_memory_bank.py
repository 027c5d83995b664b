"""§3.4 memory bank: FQF, per-(image, class) top-K by score, newest first, FIFO, quota."""

import torch

from semiseg.memory_bank import ClassMemoryBank, bank_quota, feature_quality_filter
from semiseg.reference import memory_push_loop


def test_push_matches_loop_reference_over_several_updates():
    g = torch.Generator().manual_seed(0)
    C, psi, D = 3, 7, 4
    bank = ClassMemoryBank(C, psi, D)
    reference = [[] for _ in range(C)]
    for step in range(5):
        N = 40
        feats = torch.randn(N, D, generator=g)
        labels = torch.randint(0, C + 1, (N,), generator=g)
        labels[labels == C] = 255  # rejected by FQF
        scores = torch.rand(N, generator=g)
        image_ids = torch.randint(0, 3, (N,), generator=g) + 10 * step
        bank.push(feats, labels, scores, image_ids, quota=2)
        reference = memory_push_loop(reference, feats, labels, scores, image_ids, 2, psi)
        for c in range(C):
            want = torch.stack(reference[c]) if reference[c] else torch.zeros(0, D)
            assert torch.equal(bank.get(c), want), (step, c)


def test_keeps_highest_scores_not_lowest():
    bank = ClassMemoryBank(1, 4, 1)
    feats = torch.arange(6.0)[:, None]
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2])
    bank.push(feats, torch.zeros(6, dtype=torch.long), scores, torch.zeros(6, dtype=torch.long), quota=2)
    assert bank.get(0).flatten().tolist() == [1.0, 4.0]  # scores 0.9 and 0.8


def test_fifo_drops_oldest_and_newest_are_first():
    bank = ClassMemoryBank(1, 3, 1)
    for value in range(5):
        bank.push(torch.tensor([[float(value)]]), torch.tensor([0]), torch.tensor([1.0]), torch.tensor([value]), quota=1)
    assert bank.get(0).flatten().tolist() == [4.0, 3.0, 2.0]
    assert bank.count.tolist() == [3]


def test_quota_is_per_image_and_class():
    bank = ClassMemoryBank(2, 10, 1)
    labels = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0])
    image_ids = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    bank.push(torch.arange(8.0)[:, None], labels, torch.rand(8), image_ids, quota=2)
    assert bank.count.tolist() == [4, 2]


def test_valid_mask_and_empty_input():
    bank = ClassMemoryBank(2, 4, 2)
    bank.push(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.long), 1)
    assert bank.count.tolist() == [0, 0]
    bank.push(torch.ones(3, 2), torch.tensor([0, 1, 1]), torch.rand(3), torch.tensor([0, 0, 0]), 5,
              valid=torch.tensor([False, True, False]))
    assert bank.count.tolist() == [0, 1]


def test_bank_quota_formula():
    assert bank_quota(256, 46) == 5  # max(1, 256 / 46)
    assert bank_quota(256, 100) == 2
    assert bank_quota(256, 1000) == 1


def test_feature_quality_filter():
    logits = torch.tensor([[[[5.0, 0.0, 5.0]], [[0.0, 5.0, 0.0]]]])  # [1, 2, 1, 3]
    labels = torch.tensor([[[0, 1, 1]]])
    mask = feature_quality_filter(logits, labels, phi=0.95)
    assert mask.tolist() == [[[True, True, False]]]  # third: wrong class
    assert not feature_quality_filter(logits, labels, phi=0.999).any()  # not confident enough
