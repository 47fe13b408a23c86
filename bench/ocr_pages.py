"""Run rapidocr's whole pipeline on rendered pages with each detector swapped in (bench venv only).

    build/bench-ocr/bin/python bench/ocr_pages.py PAGES.npz OUT.json --det original=det.onnx ...

``PAGES.npz`` holds ``images [N, H, W, 3]`` uint8 BGR (from render_text_pages.py ``--images``).
Each detector runs inside ``RapidOCR(det_model_path=...)`` with rapidocr-onnxruntime 1.4.4's own
classifier and recogniser, one thread, ``det_limit_side_len`` = ``--limit``. ``OUT.json`` maps
each name to one list per page: the recognised strings in the pipeline's reading order.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from rapidocr_onnxruntime import RapidOCR


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pages")
    parser.add_argument("out")
    parser.add_argument("--det", action="append", required=True, help="NAME=PATH (repeatable)")
    parser.add_argument("--limit", type=int, default=320, help="det_limit_side_len")
    args = parser.parse_args()
    images = np.load(args.pages)["images"]
    texts: dict[str, list[list[str]]] = {}
    for spec in args.det:
        name, path = spec.split("=", 1)
        engine = RapidOCR(
            det_model_path=path,
            det_limit_side_len=args.limit,
            intra_op_num_threads=1,
            inter_op_num_threads=1,
        )
        pages = []
        for image in images:
            result, _ = engine(np.ascontiguousarray(image))
            pages.append([str(r[1]) for r in result] if result else [])
        texts[name] = pages
    with open(args.out, "w") as f:
        json.dump(texts, f)


if __name__ == "__main__":
    main()
