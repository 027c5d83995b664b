"""semiseg: Semi-Supervised Semantic Segmentation with Pixel-Level Contrastive Learning
from a Class-wise Memory Bank (Alonso et al., ICCV 2021), as a small readable package."""

__version__ = "0.1.0"
