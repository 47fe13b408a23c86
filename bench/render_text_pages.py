"""Render text pages for the PP-OCR detector bench (in the bench's rapidocr venv, not modelshrink's).

    build/bench-ocr/bin/python bench/render_text_pages.py OUT.npz --count 32 --seed 0 --images PAGES.npz

Each page: a light background (white, grey or tinted paper), lines of random words in Pillow's
built-in scalable font at 10-30 px, dark ink of random colour, some lines of numbers, a few
boxes and rules. Saved as ``x [N, 3, size, size]`` float32, made by rapidocr's own detector
pre-processing (``DetPreProcess``: BGR, scale 1/255, mean 0.5, std 0.5, sides rounded to 32;
``--limit`` is its ``limit_side_len``), so the rows are exactly what the detector sees inside the
pipeline. ``--images PAGES.npz`` also saves ``images [N, size, size, 3]`` uint8 BGR (what
``RapidOCR()`` is called on) and ``text [N]``, each page's visible lines joined by newlines.

Adapted from the issue-16 bench renderer, which normalized with ImageNet mean and std in RGB order:
rapidocr-onnxruntime 1.4.4 feeds its detector BGR with mean and std 0.5 (its ``config.yaml``).
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = [
    "invoice",
    "total",
    "amount",
    "date",
    "name",
    "address",
    "order",
    "number",
    "price",
    "quantity",
    "shipping",
    "customer",
    "account",
    "balance",
    "payment",
    "receipt",
    "store",
    "table",
    "chapter",
    "section",
    "figure",
    "results",
    "method",
    "model",
    "data",
    "report",
    "summary",
    "page",
    "contents",
    "reference",
    "item",
    "description",
    "tax",
    "due",
    "paid",
    "open",
    "closed",
    "north",
    "south",
    "east",
    "west",
    "station",
    "street",
    "avenue",
    "city",
    "phone",
    "email",
    "office",
    "hours",
    "monday",
    "friday",
]


def page(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """One page as uint8 RGB [size, size, 3] and the text drawn on it, one line per row."""
    paper = tuple(int(v) for v in rng.integers(205, 256, 3))
    image = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(image)
    lines = []
    y = int(rng.integers(4, 20))
    while y < size - 12:
        height = int(rng.integers(10, 31))
        font = ImageFont.load_default(size=height)
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        x = int(rng.integers(4, size // 3))
        if rng.random() < 0.2:
            text = " ".join(str(int(rng.integers(0, 100000))) for _ in range(int(rng.integers(1, 4))))
        else:
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))
            if rng.random() < 0.3:
                text = text.title()
        draw.text((x, y), text, fill=ink, font=font)
        # What is visible: a line running off the right edge is cut there.
        visible = text
        while visible and draw.textlength(visible, font=font) + x > size:
            visible = visible[:-1]
        lines.append(visible.strip())
        if rng.random() < 0.1:
            draw.line((4, y + height + 2, size - 4, y + height + 2), fill=ink, width=1)
        if rng.random() < 0.08:
            draw.rectangle((x - 3, y - 2, min(size - 2, x + 12 * height), y + height + 3), outline=ink)
        y += height + int(rng.integers(4, 3 * height))
    noise = rng.normal(0, 3, (size, size, 3))
    pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).round().astype(np.uint8)
    return pixels, "\n".join(line for line in lines if line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--limit", type=int, default=320, help="rapidocr's det limit_side_len")
    parser.add_argument("--images", help="also save the uint8 images and their text to this .npz")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rendered = [page(rng, args.size) for _ in range(args.count)]
    bgr = np.stack([pixels[..., ::-1] for pixels, _ in rendered])
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess  # the OCR venv only: lines import WORDS

    pre = DetPreProcess(args.limit, "min", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    x = np.concatenate([pre(image) for image in bgr]).astype(np.float32)
    np.savez(args.out, x=x)
    if args.images:
        np.savez(args.images, images=bgr, text=np.array([text for _, text in rendered]))


if __name__ == "__main__":
    main()
