"""Small image folders the tests write: classes a, b and c, 5 training and 2 validation images each."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(root: Path, mixed: bool = True) -> Path:
    """``root/train/<c>/*`` and ``root/val/<c>/*``: random images 10-14 rows x 14 columns, PNG, or PNG and JPEG
    alternating (``mixed``); returns ``root``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for c in "abc":
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (10 + i, 14, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.{'png' if i % 2 or not mixed else 'jpg'}")
    return root
