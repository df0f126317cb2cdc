"""scikit-learn's 8 x 8 handwritten digits, an image sanity check for the 2-D models.

The only real images any package reachable here ships (1,797 of them, 16 grey levels, UCI's
optdigits test set); read straight from scikit-learn's own copy, `digits.csv.gz`, without
importing scikit-learn. It has no domain shift of its own, so **the shift here is synthetic**: the
target domain is another pen, every image drawn with strokes one pixel thicker (the image and its
copy shifted right by one pixel, the larger value kept) and moved down by one pixel. A fixed
seeded split: half the images are the source domain, the other half, shifted, the target domain
(60 % fine-tuned on, 40 % tested on). Forms: `features` (64 values) or `images` (1 x 8 x 8).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from skip2fleet.shared.datasets import Split, Task
from skip2fleet.shared.errors import DataError

CLASSES = tuple(str(d) for d in range(10))
SIDE = 8
SOURCE_SHARE, FINETUNE_SHARE = 0.5, 0.6
SPLIT_SEED = 0


def digits_file() -> Path:
    """scikit-learn's copy of the digits, found without importing scikit-learn."""
    found = importlib.util.find_spec("sklearn")
    if found is None or not found.submodule_search_locations:
        raise DataError("the digits task reads scikit-learn's copy: pip install scikit-learn")
    path = Path(found.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: scikit-learn's digits file is missing")
    return path


def thicker_pen(images: np.ndarray) -> np.ndarray:
    """The target domain's pen: strokes a pixel wider to the right, the image a pixel lower."""
    square = images.reshape(-1, SIDE, SIDE)
    wide = square.copy()
    wide[:, :, 1:] = np.maximum(square[:, :, 1:], square[:, :, :-1])
    lower = np.zeros_like(wide)
    lower[:, 1:] = wide[:, :-1]
    return lower.reshape(len(images), -1)


def load_digits_task(form: str) -> Task:
    path = digits_file()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not scikit-learn's digits table ({exc})") from None
    if table.ndim != 2 or table.shape[1] != SIDE * SIDE + 1:
        raise DataError(f"{path}: expected {SIDE * SIDE} pixels and a label per row")
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    source, target = np.split(order, [round(SOURCE_SHARE * len(y))])
    tune, test = np.split(target, [round(FINETUNE_SHARE * len(target))])
    shifted = thicker_pen(x)
    return Task(
        name="digits",
        classes=CLASSES,
        pretrain=Split(x[source], y[source]),
        finetune=Split(shifted[tune], y[tune]),
        test=Split(shifted[test], y[test]),
        shape=(1, SIDE, SIDE) if form == "images" else (),
    )
