"""A user's own labelled samples: a folder of `.npz` and `.csv` files, read in name order.

- `.npz`: `x` (samples x features, or samples x channels x length) and `y` (integer class
  indices or class names);
- `.csv`: a header row, one row a sample, the label in the column named by `task.label_column`
  (default `label`), every other column a feature, in order.

Files are streamed in blocks of rows (an `.npz` member is read straight from its zip entry), so a
folder of any size is checked in bounded memory. Every problem is a `DataError` naming the file
and the row (`sample N` counts from 0 as `x[N]` does; `line N` counts a CSV's lines from 1).

Class names live in the base model: labels may be its names or its indices. The hold-out is
every sample that makes the count of its class cross a multiple of 1/fraction, in file order
(with 0.25: the 4th, 8th, ... sample of each class), so files added later never move a sample
between the training set and the hold-out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import sys
import zipfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from skip2fleet.shared.datasets import Split, Task
from skip2fleet.shared.errors import DataError

SUFFIXES = (".npz", ".csv")
ROWS_PER_BLOCK = 4096
DEFAULT_LABEL_COLUMN = "label"
DEFAULT_HOLDOUT = 0.25
# A device trains on at most this many of its newest samples: 20,000 fan spectra are 20 MB, their
# Skip2 cache 36 MB, what a 512 MB board holds beside Flower.
DEFAULT_MAX_SAMPLES = 20_000


@dataclass(frozen=True)
class Block:
    """Consecutive samples of one file: raw rows (flattened) and their labels as written."""

    file: Path
    first: int  # index of the block's first sample in its file
    x: np.ndarray  # float32, (rows, features)
    labels: np.ndarray  # integers or strings, as the file has them
    shape: tuple[int, ...]  # of one sample

    def where(self, i: int) -> str:
        """The i-th row of the block as a user finds it in the file."""
        if self.file.suffix == ".csv":
            return f"{self.file}: line {self.first + i + 2}"
        return f"{self.file}: sample {self.first + i}"


def sample_files(path: Path) -> list[Path]:
    """A file, or a folder's `.npz` and `.csv` files in name order; none is an error."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"{path}: not a .npz or .csv file")
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{path}: no .npz or .csv files in this folder")
    return files


def fingerprint(files: Sequence[Path]) -> str:
    """Names, sizes and modification times: a new or changed file gives a new fingerprint."""
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def read_blocks(
    path: Path,
    label_column: str = DEFAULT_LABEL_COLUMN,
    rows: int = ROWS_PER_BLOCK,
    labelled: bool = True,
) -> Iterator[Block]:
    """Every file's samples in blocks of at most `rows`; NaN or Inf and files whose sample shape
    disagrees with the first file's are refused, naming the file and the row. Unless
    `labelled`, labels may be missing (samples to predict); a block then has empty labels."""
    shape: tuple[int, ...] | None = None
    first_file: Path | None = None
    for file in sample_files(path):
        blocks = (
            _npz_blocks(file, rows, labelled)
            if file.suffix == ".npz"
            else _csv_blocks(file, label_column, rows, labelled)
        )
        empty = True
        for block in blocks:
            empty = False
            if shape is None:
                shape, first_file = block.shape, file
            elif block.shape != shape:
                raise DataError(
                    f"{file}: samples of shape {_shape(block.shape)}, but {first_file} has "
                    f"{_shape(shape)}"
                )
            bad = ~np.isfinite(block.x).all(axis=1)
            if bad.any():
                raise DataError(f"{block.where(int(np.flatnonzero(bad)[0]))}: NaN or Inf")
            yield block
        if empty:
            raise DataError(f"{file}: no samples")


def _shape(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape)) or "scalar"


def _npz_blocks(file: Path, rows: int, labelled: bool) -> Iterator[Block]:
    try:
        archive = zipfile.ZipFile(file)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{file}: not a readable .npz file ({exc})") from None
    with archive:
        names = set(archive.namelist())
        for key in ("x", "y") if labelled else ("x",):
            if f"{key}.npy" not in names:
                raise DataError(f"{file}: no array '{key}' (expected x and y)")
        if "y.npy" not in names:
            yield from _unlabelled(archive, file, rows)
            return
        with archive.open("x.npy") as xs, archive.open("y.npy") as ys:
            x_shape, x_dtype = _npy_header(xs, file, "x")
            y_shape, y_dtype = _npy_header(ys, file, "y")
            if len(x_shape) not in (2, 3, 4):
                raise DataError(
                    f"{file}: x is {_shape(x_shape)}; expected samples x features, "
                    "samples x channels x length or samples x channels x height x width"
                )
            if len(y_shape) != 1 or y_shape[0] != x_shape[0]:
                raise DataError(f"{file}: x has {x_shape[0]} samples but y is {_shape(y_shape)}")
            if x_dtype.kind not in "fiu" or y_dtype.kind not in "iuU":
                raise DataError(
                    f"{file}: x must be numbers and y integers or names, got {x_dtype} and "
                    f"{y_dtype}"
                )
            width = int(np.prod(x_shape[1:]))
            for first in range(0, x_shape[0], rows):
                n = min(rows, x_shape[0] - first)
                x = _read(xs, x_dtype, n * width, file, "x").reshape(n, width)
                y = _read(ys, y_dtype, n, file, "y")
                yield Block(file, first, x.astype(np.float32), y, tuple(x_shape[1:]))


def _unlabelled(archive: zipfile.ZipFile, file: Path, rows: int) -> Iterator[Block]:
    with archive.open("x.npy") as xs:
        shape, dtype = _npy_header(xs, file, "x")
        if len(shape) not in (2, 3, 4) or dtype.kind not in "fiu":
            raise DataError(f"{file}: x is {dtype} {_shape(shape)}; expected samples of numbers")
        width = int(np.prod(shape[1:]))
        for first in range(0, shape[0], rows):
            n = min(rows, shape[0] - first)
            x = _read(xs, dtype, n * width, file, "x").reshape(n, width)
            yield Block(file, first, x.astype(np.float32), np.array([], str), tuple(shape[1:]))


def _npy_header(
    stream: io.BufferedIOBase, file: Path, key: str
) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(stream)
        read = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        shape, fortran, dtype = read[version](stream)
    except (ValueError, KeyError) as exc:
        raise DataError(f"{file}: array '{key}' is not a readable .npy ({exc})") from None
    if fortran or dtype.hasobject:
        raise DataError(
            f"{file}: array '{key}' is Fortran-ordered or holds objects; save it with np.savez"
        )
    return tuple(shape), dtype


def _read(
    stream: io.BufferedIOBase, dtype: np.dtype, count: int, file: Path, key: str
) -> np.ndarray:
    data = stream.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise DataError(f"{file}: array '{key}' is truncated")
    return np.frombuffer(data, dtype)


def _csv_blocks(file: Path, label_column: str, rows: int, labelled: bool) -> Iterator[Block]:
    try:
        handle = open(file, newline="", encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror})") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{file}: empty CSV file") from None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{file}: line 1: not CSV text ({exc})") from None
        header = [h.strip() for h in header]
        if label_column not in header and labelled:
            raise DataError(
                f"{file}: no label column {label_column!r} in the header "
                f"(task.label_column names it)"
            )
        at = header.index(label_column) if label_column in header else None
        width = len(header) - (at is not None)
        first, xs, labels = 0, [], []
        line = 1
        try:
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{file}: line {line}: {len(row)} columns, the header has {len(header)}"
                    )
                label = row.pop(at).strip() if at is not None else ""
                try:
                    xs.append([float(v) for v in row])
                except ValueError:
                    raise DataError(f"{file}: line {line}: a feature is not a number") from None
                labels.append(label)
                if len(xs) == rows:
                    yield Block(file, first, np.array(xs, np.float32), np.array(labels), (width,))
                    first, xs, labels = first + rows, [], []
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{file}: line {line + 1}: not CSV text ({exc})") from None
        if xs:
            yield Block(file, first, np.array(xs, np.float32), np.array(labels), (width,))


@dataclass
class Labeller:
    """Turns labels as written (names or indices) into class indices of `classes`."""

    classes: tuple[str, ...]
    _index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.classes)}

    def __call__(self, block: Block) -> np.ndarray:
        out = np.empty(len(block.labels), np.int64)
        for i, label in enumerate(block.labels.tolist()):
            index = self._index.get(str(label))
            if index is None:
                index = _as_index(label)
                if index is None or not 0 <= index < len(self.classes):
                    raise DataError(
                        f"{block.where(i)}: label {label!r} is not a class of the base model "
                        f"({', '.join(self.classes)})"
                    )
            out[i] = index
        return out


def _as_index(label: object) -> int | None:
    if isinstance(label, int):
        return label
    text = str(label)
    return int(text) if text.lstrip("-").isdigit() else None


def holdout_mask(y: np.ndarray, fraction: float, seen: dict[int, int] | None = None) -> np.ndarray:
    """True for held-out samples: per class, in file order, the sample that makes its class's
    count cross the next multiple of 1/fraction (stable when files are added). `seen` carries
    each class's count over from earlier blocks, and is updated."""
    seen = {} if seen is None else seen
    mask = np.zeros(len(y), bool)
    for c in np.unique(y).tolist():
        where = np.flatnonzero(y == c)
        j = np.arange(len(where)) + seen.get(c, 0)
        mask[where] = np.floor((j + 1) * fraction) > np.floor(j * fraction)
        seen[c] = seen.get(c, 0) + len(where)
    return mask


class Newest:
    """The newest `limit` rows of a stream of blocks, holding about `limit` rows at a time."""

    def __init__(self, limit: int) -> None:
        self.limit, self.rows = limit, 0
        self.blocks: deque[Split] = deque()

    def add(self, part: Split) -> None:
        self.blocks.append(part)
        self.rows += len(part)
        while self.blocks and self.rows - len(self.blocks[0]) >= self.limit:
            self.rows -= len(self.blocks.popleft())

    def split(self) -> Split:
        x = np.vstack([b.x for b in self.blocks])[-self.limit :]
        return Split(x, np.concatenate([b.y for b in self.blocks])[-self.limit :])


def device_samples(
    path: Path, classes: Sequence[str], label_column: str, fraction: float, limit: int
) -> tuple[Split, Split]:
    """A device's (training, hold-out) from its folder, streamed: the hold-out is decided sample
    by sample, and only the newest `limit` training samples (and the newest hold-out samples in
    proportion) are kept, so a folder of any size is read in bounded memory."""
    label = Labeller(tuple(classes))
    seen: dict[int, int] = {}
    train = Newest(limit)
    held = Newest(max(1, int(np.ceil(limit * fraction / (1 - fraction)))))
    for block in read_blocks(path, label_column):
        y = label(block)
        mask = holdout_mask(y, fraction, seen)
        train.add(Split(block.x[~mask], y[~mask]))
        held.add(Split(block.x[mask], y[mask]))
    if not held.rows or not train.rows:
        need = int(np.ceil(1 / fraction))
        raise DataError(
            f"{path}: {sum(seen.values())} samples leave nothing to "
            f"{'hold out' if not held.rows else 'train on'}; a class needs at least {need} "
            "samples"
        )
    return train.split(), held.split()


def source_classes(path: Path, label_column: str) -> tuple[str, ...]:
    """The classes of a source folder (at least two): 0..max when every label is an index, else
    the names sorted."""
    seen: set[str] = set()
    for block in read_blocks(path, label_column):
        seen.update(map(str, np.unique(block.labels).tolist()))
    if len(seen) < 2:
        raise DataError(
            f"{path}: every sample is labelled {', '.join(sorted(seen)) or '(none)'}; a base "
            "model needs samples of at least two classes to tell apart"
        )
    if all(_as_index(s) is not None and _as_index(s) >= 0 for s in seen):
        return tuple(str(i) for i in range(max(int(s) for s in seen) + 1))
    return tuple(sorted(seen))


def source_task(path: Path, label_column: str, fraction: float, form: str) -> Task:
    """The coordinator's own source data as a task: pretrain on the training part, report
    accuracy on the held-out part."""
    path = Path(path).expanduser()
    classes = source_classes(path, label_column)
    train, held = device_samples(path, classes, label_column, fraction, sys.maxsize)
    first = next(read_blocks(path, label_column)).shape
    shape = first if len(first) > 1 else ()
    if form == "windows" and not shape:
        shape = (1, train.x.shape[1])
    elif form == "features":
        shape = ()
    if form == "images" and len(shape) != 3:
        raise DataError(f"{path}: samples of {_shape(first)}; an image model reads C x H x W")
    return Task(str(path), classes, train, train, held, shape)


@dataclass
class Report:
    """What `fleet data check` found in a folder, read block by block."""

    files: dict[str, int] = field(default_factory=dict)  # samples per file
    per_class: dict[str, int] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    low: float = float("inf")
    high: float = float("-inf")
    total: float = 0.0

    @property
    def samples(self) -> int:
        return sum(self.files.values())


def check_samples(
    path: Path,
    label_column: str = DEFAULT_LABEL_COLUMN,
    classes: Sequence[str] | None = None,
    width: int | None = None,
) -> Report:
    """Read every sample once, in bounded memory; a problem is a `DataError` naming the file and
    row. With a base's `classes` (and `width`), labels and sample width must fit it."""
    report = Report()
    label = Labeller(tuple(classes)) if classes is not None else None
    for block in read_blocks(path, label_column):
        if width is not None and block.x.shape[1] != width:
            raise DataError(
                f"{block.file}: samples of {block.x.shape[1]} values; the base takes {width}"
            )
        report.shape = block.shape
        report.files[str(block.file)] = report.files.get(str(block.file), 0) + len(block.x)
        names = np.asarray(classes)[label(block)] if label is not None else block.labels.astype(str)
        for name, count in zip(*np.unique(names, return_counts=True), strict=True):
            report.per_class[str(name)] = report.per_class.get(str(name), 0) + int(count)
        report.low = min(report.low, float(block.x.min()))
        report.high = max(report.high, float(block.x.max()))
        report.total += float(block.x.sum(dtype=np.float64))
    return report


def held_out_count(samples: int, fraction: float) -> int:
    """How many of a class's `samples` `holdout_mask` holds out."""
    return int(np.floor(samples * fraction))
