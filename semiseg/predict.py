"""Inference: ``python -m semiseg.predict CKPT IMAGES... --out DIR`` writes colour masks and overlays.

For every image it writes ``<name>_mask.png`` (colour-coded classes, the dataset's palette) and
``<name>_overlay.png`` (the mask blended over the image). IMAGES may be files or folders. Outputs
never overwrite each other: they keep the images' paths relative to their common folder, so
``A/x.png`` and ``B/x.png`` give ``DIR/A/x_mask.png`` and ``DIR/B/x_mask.png``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .data.datasets import read_image
from .data.datasets import to_tensor
from .evaluate import predict_logits
from .run_dir import atomic_write

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
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, paths))}")
    return files


def save_png(array, path):
    """Write atomically: unique temp file + rename."""
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def output_stems(files):
    """Output name (without suffix) of each file: its path relative to the files' common folder,
    so two images with one name in different folders never share an output."""
    resolved = [Path(os.path.abspath(f)) for f in files]
    if len({f.stem for f in resolved}) == len(resolved):
        return [Path(f.stem) for f in resolved]
    common = Path(os.path.commonpath([str(f.parent) for f in resolved]))
    return [f.relative_to(common).with_suffix("") for f in resolved]


def predict_files(model, files, out_dir, palette, size=None, device="cpu", alpha=0.5):
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; give a folder")
    written = []
    for f, stem in zip(files, output_stems(files)):
        image = read_image(f)
        pred = predict_logits(model, to_tensor(image)[None].to(device), size).argmax(1)[0].cpu().numpy()
        mask = colourise(pred, palette)
        overlay = (alpha * mask + (1 - alpha) * image).astype(np.uint8)
        save_png(mask, out_dir / f"{stem}_mask.png")
        save_png(overlay, out_dir / f"{stem}_overlay.png")
        written += [out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"]
    return written


def main(argv=None):
    from .checkpoint import read_checkpoint
    from .config import one_line_errors
    from .train import load_checkpoint_model

    parser = argparse.ArgumentParser(prog="python -m semiseg.predict", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint.pt of a run (python -m semiseg.train)")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--teacher", action="store_true", help="predict with the EMA teacher instead of the student")
    args = parser.parse_args(argv)
    with one_line_errors():
        cfg, model, device = load_checkpoint_model(args.checkpoint, teacher=args.teacher)
        palette = read_checkpoint(args.checkpoint)["palette"]
        files = list_images(args.images)
        written = predict_files(model, files, args.out, palette, cfg.eval_size, device)
    print(f"wrote {len(written)} images to {args.out}")


if __name__ == "__main__":
    main()
