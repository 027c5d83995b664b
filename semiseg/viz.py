"""Small helpers for the notebooks: show package source, draw label maps."""

from __future__ import annotations

import inspect

import numpy as np

from .predict import colourise


def show_source(obj):
    """Display the source of a function/class/module of ``semiseg`` as a highlighted code block
    (notebooks import the package and show its code; they never paste it)."""
    from IPython.display import Markdown, display

    display(Markdown(f"```python\n{inspect.getsource(obj)}\n```"))


def label_image(labels, palette, ignore_colour=(0, 0, 0)):
    """[H, W] class indices (255 = ignore) -> [H, W, 3] uint8 colours for ``imshow``."""
    labels = np.asarray(labels)
    out = colourise(np.where(labels == 255, 0, labels), palette)
    out[labels == 255] = ignore_colour
    return out
