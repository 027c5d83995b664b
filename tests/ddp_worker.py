"""Run by ``tests/test_distributed.py`` under ``torchrun``: a few training steps of the smoke profile
on TinyShapes, then this process's bank, weights and losses to ``<out>/rank<r>.pt``."""

import sys

import torch

from semiseg import distributed
from semiseg.config import load_config
from semiseg.models.heads import ClassAttention
from semiseg.train import setup

if __name__ == "__main__":
    out, overrides = sys.argv[1], [a for a in sys.argv[2:] if a != "--frozen-bn"]
    cfg = load_config("smoke", overrides)
    info = distributed.init("cpu")
    trainer, batches, _ = setup(cfg, info)
    if "--frozen-bn" in sys.argv:  # BatchNorm from running statistics: no dependence on how a batch is split
        for module in trainer.student.modules():  # S_c's per-class BatchNorm lives in ClassAttention itself
            if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, ClassAttention)):
                module.eval()
    initial = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    terms = [trainer.step(*batches(0))]
    first_counts = trainer.class_counts.clone()  # the teacher is still the initial network here
    terms += [trainer.step(*batches(it)) for it in range(1, cfg.iterations)]
    torch.save({"memory": trainer.bank.memory, "count": trainer.bank.count, "student": trainer.student.state_dict(), "initial": initial,
                "teacher": trainer.teacher.state_dict(), "class_counts": trainer.class_counts, "terms": terms,
                "first_counts": first_counts,
                "world": info.world}, f"{out}/rank{info.rank}.pt")
    distributed.destroy(info)
