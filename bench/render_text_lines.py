"""Render text lines as PP-OCR recognizer inputs (bench only; runs in a venv that has Pillow).

    python bench/render_text_lines.py OUT.npz --count 200 --seed 0

Each line: a light background, one to four random words or numbers in Pillow's built-in
scalable font at 26-40 px, dark ink of random colour, a little noise, drawn at the height the
recognizer reads (48 px) and padded to a fixed width (320 px) as rapidocr pads a batch. Saved as
``x [N, 3, 48, 320]`` float32, normalized as rapidocr feeds its recognizer ((v / 255 - 0.5) / 0.5),
and the text of each line as ``text``. Pillow is never a modelshrink dependency.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from render_text_pages import WORDS  # one word list for pages and lines

HEIGHT, WIDTH = 48, 320


def line(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    if rng.random() < 0.25:
        text = " ".join(str(int(rng.integers(0, 100000))) for _ in range(int(rng.integers(1, 3))))
    else:
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        if rng.random() < 0.3:
            text = text.title()
    size = int(rng.integers(26, 41))
    font = ImageFont.load_default(size=size)
    _left, top, right, bottom = font.getbbox(text)
    paper = tuple(int(v) for v in rng.integers(200, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    image = Image.new("RGB", (right + 12, max(bottom, size) + 12), paper)
    ImageDraw.Draw(image).text((6, 6 - top // 2), text, fill=ink, font=font)
    width = min(WIDTH, max(8, round(image.width * HEIGHT / image.height)))
    image = image.resize((width, HEIGHT), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 3, (HEIGHT, width, 3))
    normalized = (np.clip(pixels, 0, 255).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    padded = np.zeros((3, HEIGHT, WIDTH), np.float32)  # rapidocr pads with 0 after normalizing
    padded[:, :, :width] = normalized
    return padded, text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    lines = [line(rng) for _ in range(args.count)]
    np.savez(args.out, x=np.stack([x for x, _ in lines]), text=np.array([t for _, t in lines]))


if __name__ == "__main__":
    main()
