"""Training batches that depend only on ``(seed, iteration)``.

The batch of iteration t is a slice of the permutation of epoch ``t // batches_per_epoch``,
drawn from a generator seeded with (seed, epoch); each image's random crop comes from a
generator seeded with (seed, t, slot). So the data order needs no state of its own: a run
resumed at iteration t sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .datasets import to_tensor

IGNORE = 255


def seeded(*parts: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (stable across runs and processes)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def load_resized(dataset, index, base_size):
    """Image ``index`` of ``dataset`` resized to ``base_size`` [W, H] (None: as is):
    (image float [3, H, W] in [0, 1], label long [H, W])."""
    image, label = dataset.load(index)
    image, label = to_tensor(image), torch.from_numpy(label).long()
    if base_size is not None:
        W, H = base_size
        image = F.interpolate(image[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=(H, W), mode="nearest")[0, 0].long()
    return image, label


def load_crop(dataset, index, base_size, crop_size, generator, cache=None):
    """Image ``index`` of ``dataset`` resized to ``base_size`` [W, H] (None: as is), then a random
    ``crop_size`` [W, H] crop (padded with ignore where the image is smaller).
    ``cache`` (a dict) keeps the resized images, so each is decoded once (the same numbers).
    Returns (image float [3, h, w] in [0, 1], label long [h, w])."""
    if cache is None:
        image, label = load_resized(dataset, index, base_size)
    else:
        if index not in cache:
            cache[index] = load_resized(dataset, index, base_size)
        image, label = cache[index]
    cw, ch = crop_size
    H, W = label.shape
    if H < ch or W < cw:
        ph, pw = max(0, ch - H), max(0, cw - W)
        image, label = F.pad(image, (0, pw, 0, ph)), F.pad(label, (0, pw, 0, ph), value=IGNORE)
        H, W = label.shape
    y = int(torch.randint(0, H - ch + 1, (), generator=generator))
    x = int(torch.randint(0, W - cw + 1, (), generator=generator))
    return image[:, y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]


class Batches:
    """Shuffled, cropped batches of ``(images, labels, indices)`` indexed by the iteration.

    With ``world`` > 1 (multi-process training) ``batch_size`` is the global batch and this process
    (``rank``) gets the ``rank``-th of ``world`` equal contiguous shares of it. Each sample is
    cropped by a generator keyed on (seed, iteration, its place in the global batch), so the shares
    of all processes together are exactly the one-process batch.
    """

    def __init__(self, dataset, batch_size, base_size, crop_size, seed, rank=0, world=1, cache=False):
        if len(dataset) == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.dataset, self.base_size, self.crop_size, self.seed = dataset, base_size, crop_size, seed
        self.batch_size = min(batch_size, len(dataset))
        if self.batch_size % world:
            raise ValueError(f"a batch of {self.batch_size} cannot be split into {world} equal shares")
        self.rank, self.world, self.share = rank, world, self.batch_size // world
        self.per_epoch = len(dataset) // self.batch_size
        self.cache = {} if cache else None

    def indices(self, iteration):
        epoch, k = divmod(iteration, self.per_epoch)
        order = torch.randperm(len(self.dataset), generator=seeded(self.seed, epoch))
        return order[k * self.batch_size : (k + 1) * self.batch_size].tolist()

    def slots(self):
        """Places in the global batch of this process's samples."""
        return range(self.rank * self.share, (self.rank + 1) * self.share)

    def __call__(self, iteration):
        slots = self.slots()
        indices = self.indices(iteration)[slots.start:slots.stop]
        crops = [load_crop(self.dataset, i, self.base_size, self.crop_size, seeded(self.seed, iteration, slot), self.cache)
                 for slot, i in zip(slots, indices)]
        return torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops]), torch.tensor(indices)
