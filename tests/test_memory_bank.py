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
    """§4.2: the quota holds per (image, class), not per batch (the official code's bug), and the kept
    vectors are each image's highest-scored ones, not the batch's."""
    C, quota = 3, 2
    bank = ClassMemoryBank(C, 16, 1)
    # class 0: five vectors in each of images 7 and 9, interleaved; every score of image 9 is below
    # every score of image 7, so the batch's top 2 (or top 4) of class 0 all come from image 7
    scores0 = {7: [0.90, 0.70, 0.80, 0.60, 0.65], 9: [0.30, 0.50, 0.10, 0.40, 0.20]}
    feats, labels, scores, image_ids = [], [], [], []
    for k in range(5):
        for image in (7, 9):
            feats.append(100 * image + 10 * k)  # the vector's value names its image and place
            labels.append(0)
            scores.append(scores0[image][k])
            image_ids.append(image)
    # class 1: three vectors of image 9 only; class 2: one vector of image 7 (fewer than the quota)
    for value, label, score, image in [(901, 1, 0.2, 9), (902, 1, 0.9, 9), (903, 1, 0.5, 9), (701, 2, 0.3, 7)]:
        feats.append(value), labels.append(label), scores.append(score), image_ids.append(image)
    bank.push(torch.tensor(feats, dtype=torch.float32)[:, None], torch.tensor(labels), torch.tensor(scores),
              torch.tensor(image_ids), quota=quota)
    # per (image, class): 2 of class 0 from each image, 2 of class 1, the single one of class 2
    assert bank.count.tolist() == [4, 2, 1]
    # which ones: image 7's two best (0.9, 0.8) and image 9's two best (0.5, 0.4) -- not the batch's
    # top four (0.9, 0.8, 0.7, 0.65, all of image 7) -- newest ordered by score, highest first
    assert bank.get(0).flatten().tolist() == [700.0, 720.0, 910.0, 930.0]
    assert bank.get(1).flatten().tolist() == [902.0, 903.0]
    assert bank.get(2).flatten().tolist() == [701.0]
    # a second batch: again quota per image, in front of the older entries
    bank.push(torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]]), torch.tensor([0, 0, 0, 0, 0]),
              torch.tensor([0.1, 0.9, 0.6, 0.8, 0.2]), torch.tensor([1, 1, 1, 2, 2]), quota=quota)
    assert bank.get(0).flatten().tolist() == [2.0, 4.0, 3.0, 5.0, 700.0, 720.0, 910.0, 930.0]


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
