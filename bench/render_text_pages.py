"""Render text pages as PP-OCR detector inputs (bench only; runs in a venv that has Pillow).

    python bench/render_text_pages.py OUT.npz --count 24 --seed 0 --size 320

Each page: a light background (white, grey or tinted paper), lines of random words in Pillow's
built-in scalable font at 10-30 px, dark ink of random colour, some lines of numbers, a few
boxes and rules. Saved as ``x [N, 3, size, size]`` float32, normalized as rapidocr feeds its
detector (scale 1/255, ImageNet mean and std). Pillow is never a modelshrink dependency.
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
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def page(rng: np.random.Generator, size: int) -> np.ndarray:
    paper = tuple(int(v) for v in rng.integers(205, 256, 3))
    image = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(image)
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
        if rng.random() < 0.1:
            draw.line((4, y + height + 2, size - 4, y + height + 2), fill=ink, width=1)
        if rng.random() < 0.08:
            draw.rectangle((x - 3, y - 2, min(size - 2, x + 12 * height), y + height + 3), outline=ink)
        y += height + int(rng.integers(4, 3 * height))
    noise = rng.normal(0, 3, (size, size, 3))
    pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255)
    return ((pixels.transpose(2, 0, 1) / 255.0 - MEAN) / STD).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    pages = np.stack([page(rng, args.size) for _ in range(args.count)])
    np.savez(args.out, x=pages)


if __name__ == "__main__":
    main()
