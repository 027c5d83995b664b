"""Inference: ``python -m semiseg.predict CKPT IMAGES... --out DIR`` writes, for every image,
``<name>_mask.png`` (colour-coded classes, the dataset's palette) and ``<name>_overlay.png``
(the mask blended over the image). IMAGES may be files or folders.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .data.datasets import read_image
from .evaluate import predict_logits, to_tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def colourise(pred, palette):
    """[H, W] class indices -> [H, W, 3] uint8 colours (ignore / unknown -> black)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[pred.astype(np.int64).clip(0, 255)]


def list_images(paths):
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"image path {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, paths))}")
    return files


def save_png(array, path):
    """Write atomically: temp file + rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def predict_files(model, files, out_dir, palette, size=None, device="cpu", alpha=0.5):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        image = read_image(f)
        pred = predict_logits(model, to_tensor(image)[None].to(device), size).argmax(1)[0].cpu().numpy()
        mask = colourise(pred, palette)
        overlay = (alpha * mask + (1 - alpha) * image).astype(np.uint8)
        save_png(mask, out_dir / f"{f.stem}_mask.png")
        save_png(overlay, out_dir / f"{f.stem}_overlay.png")
        written.append(out_dir / f"{f.stem}_mask.png")
    return written


def main(argv=None):
    from .checkpoint import read_checkpoint
    from .config import one_line_errors
    from .train import load_checkpoint_model

    parser = argparse.ArgumentParser(prog="python -m semiseg.predict", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher", action="store_true")
    args = parser.parse_args(argv)
    with one_line_errors():
        cfg, model, device = load_checkpoint_model(args.checkpoint, teacher=args.teacher)
        palette = read_checkpoint(args.checkpoint)["palette"]
        files = list_images(args.images)
        predict_files(model, files, args.out, palette, cfg.eval_size, device)
    print(f"wrote {2 * len(files)} images to {args.out}")


if __name__ == "__main__":
    main()
