"""FER2013 (Goodfellow et al., ICONIP 2013) in every common form, FER+ relabelling (Barsoum et
al., ICMI 2016), and writers that put a dataset on disk in those forms (used by the tests).

Forms read, detected from what the path holds:

- ``fer2013.csv``: ``emotion,pixels,Usage`` (the original Kaggle file, 35,887 rows);
- ``icml_face_data.csv``: ``emotion, Usage, pixels`` (leading spaces in the header);
- ``train.csv`` (``emotion,pixels``; Training rows only) with an unlabeled ``test.csv`` that
  cannot be scored and is ignored;
- image folders ``train/<class>/`` and ``test/<class>/``; file names starting ``Training_``,
  ``PublicTest_``, ``PrivateTest_`` give the split, otherwise train/ is train and test/ is test.

Usage maps to splits: Training -> train, PublicTest -> val (model selection), PrivateTest ->
test (reported once). Pixel strings are parsed for the whole file at once by numpy's C parser.

FER+ (``fer2013new.csv``) lists the rows of fer2013.csv in the same order; its Usage column is
checked against the CSV's row by row, so a file in another order is refused rather than
relabelling the wrong images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from fermodel.data.dataset import FER2013_CLASSES, IMAGE_SIZE, DatasetError, FERDataset
from fermodel.files import write_atomically

PIXELS = IMAGE_SIZE * IMAGE_SIZE
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
SPLIT_TO_USAGE = {v: k for k, v in USAGE_TO_SPLIT.items()}
FERPLUS_CLASSES = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
)
FERPLUS_COLUMNS = (*FERPLUS_CLASSES, "unknown", "NF")
# FER+ class -> FER2013 label; contempt has no FER2013 class
FERPLUS_TO_FER2013 = {
    "neutral": 6,
    "happiness": 3,
    "surprise": 5,
    "sadness": 4,
    "anger": 0,
    "disgust": 1,
    "fear": 2,
}
CSV_NAMES = ("fer2013.csv", "icml_face_data.csv", "train.csv")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------- reading


def find_fer2013(path: Path) -> Path:
    """The CSV file or image-folder root that ``path`` names or holds (one level down too)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.is_file():
        return path
    for folder in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
        for name in CSV_NAMES:
            if (folder / name).is_file():
                return folder / name
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return folder
    raise DatasetError(
        f"{path}: holds no FER2013 data (looked for {', '.join(CSV_NAMES)} "
        f"or train/ and test/ image folders)"
    )


def read_fer2013(
    path,
    labels: str = "fer2013",
    clean: bool = False,
    cache_dir: str | Path | None = None,
    mislabeled: bool = False,
) -> FERDataset:
    """Read FER2013 from ``path``.

    labels  ``fer2013``: the original 7 labels; ``ferplus``: FER+'s 8 majority labels;
            ``ferplus7``: FER+ labels mapped to FER2013's 7 classes (contempt dropped).
            Both FER+ forms need ``fer2013new.csv`` beside the CSV and drop non-faces and
            images without a majority (the official rule) from every split: such images have
            no FER+ label to train on or to score (FER+'s own test set, not FER2013's).
    clean   keep FER2013's labels but drop the training images FER+ marks as non-face or
            unknown (the paper's cleaning of mislabeled and non-face images). Val and test
            are kept whole, so test accuracy is measured on the full PrivateTest.
    mislabeled  also drop the training images whose FER+ majority label, read as one of
            FER2013's classes, disagrees with their FER2013 label (FER+'s contempt has no
            FER2013 class, so it always disagrees): the paper's "mislabeled" images. Images
            without a FER+ majority are ``clean``'s to drop. Works with every ``labels``; val
            and test stay as ``labels`` leaves them. Needs ``fer2013new.csv`` too.
    cache_dir  where to keep a parsed copy of a CSV (keyed on its path, size and mtime, written
            atomically); ``None`` parses every time.
    """
    if labels not in ("fer2013", "ferplus", "ferplus7"):
        raise ValueError(f"labels must be 'fer2013', 'ferplus' or 'ferplus7', got {labels!r}")
    source = find_fer2013(path)
    if source.is_dir():
        data = _read_folders(source)
    else:
        data = _cached(source, cache_dir, _read_csv)
    images, y, split, ids = data
    notes: list[str] = []
    classes: tuple[str, ...] = FER2013_CLASSES
    if labels != "fer2013" or clean or mislabeled:
        if source.is_dir():
            raise DatasetError(f"{source}: FER+ labels need the CSV form (row order), not folders")
        if not (split != "train").any():
            raise DatasetError(
                f"{source}: has no Usage column, so its rows cannot be matched to FER+'s "
                f"fer2013new.csv; FER+ labels need fer2013.csv or icml_face_data.csv"
            )
        votes = read_ferplus(
            source.parent / "fer2013new.csv",
            usage=np.array([SPLIT_TO_USAGE[s] for s in split]),
            source=source,
        )
        plus = ferplus_majority(votes)
        train = split == "train"
        as_fer2013 = np.array([FERPLUS_TO_FER2013.get(c, -1) for c in FERPLUS_CLASSES])
        disagree = train & (plus >= 0) & (as_fer2013[np.maximum(plus, 0)] != y)
        if labels == "fer2013":
            keep = (plus >= 0) | ~train if clean else np.ones(len(y), dtype=bool)
            if clean:
                notes.append(
                    f"FER+ cleaning dropped {int((~keep).sum())} non-face/unknown training "
                    f"images; val and test kept whole ({int(((plus < 0) & ~train).sum())} of "
                    f"their images are flagged)"
                )
        elif labels == "ferplus":
            keep, y, classes = plus >= 0, plus, FERPLUS_CLASSES
            notes.append(f"FER+ labels (8 classes); dropped {int((~keep).sum())} images")
        else:
            mapping = np.array([FERPLUS_TO_FER2013.get(c, -1) for c in FERPLUS_CLASSES])
            mapped = np.where(plus >= 0, mapping[np.maximum(plus, 0)], -1)
            keep, y = mapped >= 0, mapped
            notes.append(
                f"FER+ labels mapped to FER2013's 7 classes; dropped {int((~keep).sum())} "
                f"images (non-face, unknown, contempt)"
            )
        if mislabeled:
            notes.append(
                f"dropped {int((keep & disagree).sum())} mislabeled training images (FER+'s "
                f"majority disagrees with their FER2013 label)"
            )
            keep = keep & ~disagree
        images, y, split, ids = images[keep], y[keep], split[keep], ids[keep]
    dataset = FERDataset(
        name="fer2013",
        images=torch.tensor(images).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE),
        labels=torch.tensor(y, dtype=torch.int64),
        classes=classes,
        split=split,
        ids=ids,
        notes=[f"read {source}", *notes],
    )
    _check_not_empty(dataset, source)
    return dataset


def _check_not_empty(dataset: FERDataset, source: Path) -> None:
    empty = [c for c, n in dataset.class_counts("train").items() if n == 0]
    if empty:
        raise DatasetError(f"{source}: the train split has no image of class {empty[0]!r}")


def _read_csv(path: Path):
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DatasetError(f"{path}: not a readable CSV ({err})") from None
    frame.columns = [c.strip() for c in frame.columns]
    columns = set(frame.columns)
    if columns == {"pixels"}:
        raise DatasetError(f"{path}: has no emotion column (Kaggle's unlabeled test.csv?)")
    if not {"emotion", "pixels"} <= columns or not columns <= {"emotion", "pixels", "Usage"}:
        raise DatasetError(
            f"{path}: wrong header {list(frame.columns)}; expected emotion,pixels,Usage "
            f"(fer2013.csv, icml_face_data.csv) or emotion,pixels (train.csv)"
        )
    if frame.empty:
        raise DatasetError(f"{path}: has a header but no rows")
    line = np.arange(len(frame)) + 2  # file line of each row: the header is line 1

    emotion = pd.to_numeric(frame["emotion"], errors="coerce")
    bad = np.flatnonzero(~emotion.isin(range(len(FER2013_CLASSES))).to_numpy())
    if bad.size:
        i = bad[0]
        raise DatasetError(
            f"{path}, line {line[i]}: emotion {frame['emotion'].iloc[i]!r} is not a label 0-6"
        )
    if "Usage" in columns:
        usage = frame["Usage"].str.strip()
        bad = np.flatnonzero(~usage.isin(list(USAGE_TO_SPLIT)).to_numpy())
        if bad.size:
            i = bad[0]
            raise DatasetError(
                f"{path}, line {line[i]}: Usage {usage.iloc[i]!r} is not one of "
                f"{', '.join(USAGE_TO_SPLIT)}"
            )
        split = usage.map(USAGE_TO_SPLIT).to_numpy().astype(str)
    else:
        split = np.full(len(frame), "train")

    pixels = frame["pixels"].str.strip()
    bad = np.flatnonzero(~pixels.str.fullmatch(r"[0-9]+(?: +[0-9]+)*").to_numpy())
    if bad.size:
        i = bad[0]
        token = next((t for t in pixels.iloc[i].split() if not t.isdigit()), "")
        what = f"non-numeric pixel {token!r}" if token else "no pixels"
        raise DatasetError(f"{path}, line {line[i]}: {what}")
    # single spaces are the norm: count them fast, and count tokens only where that disagrees
    counts = np.fromiter((row.count(" ") + 1 for row in pixels), dtype=np.int64, count=len(pixels))
    for i in np.flatnonzero(counts != PIXELS):
        counts[i] = len(pixels.iloc[i].split())
    bad = np.flatnonzero(counts != PIXELS)
    if bad.size:
        i = bad[0]
        raise DatasetError(
            f"{path}, line {line[i]}: {counts[i]} pixel values, expected {PIXELS} (48x48)"
        )
    values = np.fromstring(" ".join(pixels.tolist()), dtype=np.int32, sep=" ")
    values = values.reshape(len(frame), PIXELS)
    bad = np.flatnonzero(values.max(axis=1) > 255)
    if bad.size:
        i = bad[0]
        raise DatasetError(
            f"{path}, line {line[i]}: pixel value {values[i].max()} is out of range 0-255"
        )
    missing = [u for u, s in USAGE_TO_SPLIT.items() if s not in set(split)]
    if "Usage" in columns and missing:
        raise DatasetError(f"{path}: no {missing[0]} rows (that split is empty)")
    ids = np.char.add(f"{path.name}:line ", line.astype(str))
    return values.astype(np.uint8), emotion.to_numpy(dtype=np.int64), split, ids


def _read_folders(root: Path):
    images, labels, split, ids = [], [], [], []
    for part in ("train", "test"):
        folder = root / part
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        unknown = sorted(set(classes) - set(FER2013_CLASSES))
        if unknown:
            raise DatasetError(
                f"{folder / unknown[0]}: unknown class folder; "
                f"expected {', '.join(FER2013_CLASSES)}"
            )
        for label, name in enumerate(FER2013_CLASSES):
            files = sorted(
                f for f in (folder / name).glob("*") if f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not files and part == "train":
                raise DatasetError(f"{folder / name}: empty class folder (no images)")
            for file in files:
                images.append(read_image(file))
                labels.append(label)
                split.append(_split_of(file.name, part))
                ids.append(str(file.relative_to(root)))
    if not images:
        raise DatasetError(f"{root}: no images in train/ or test/")
    return (
        np.stack(images).reshape(-1, PIXELS),
        np.array(labels, dtype=np.int64),
        np.array(split),
        np.array(ids),
    )


def _split_of(filename: str, part: str) -> str:
    for usage, split in USAGE_TO_SPLIT.items():
        if filename.startswith(usage + "_"):
            return split
    return "train" if part == "train" else "test"


def read_image(file: Path) -> np.ndarray:
    """One image file as a 48x48 grey uint8 array, converted to grey and resized if it is not;
    a file that is not a readable image is a ``DatasetError`` naming it."""
    try:
        with Image.open(file) as im:
            gray = im.convert("L")
            if gray.size != (IMAGE_SIZE, IMAGE_SIZE):
                gray = gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(gray, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"{file}: unreadable image ({err.__class__.__name__})") from None


def read_ferplus(path: Path, usage: np.ndarray, source: Path) -> np.ndarray:
    """FER+ votes [rows, 10] in FERPLUS_COLUMNS order; a non-face row (empty Image name) gets
    all of its weight on NF.

    ``usage`` is the Usage of every row of the FER2013 CSV ``source``: FER+ must have as many
    rows, with the same Usage on each line (the files share one row order)."""
    if not path.is_file():
        raise DatasetError(f"{path}: not found (FER+ labels must sit beside the FER2013 CSV)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DatasetError(f"{path}: not a readable CSV ({err})") from None
    frame.columns = [c.strip() for c in frame.columns]
    expected = ["Usage", "Image name", *FERPLUS_COLUMNS]
    if list(frame.columns) != expected:
        raise DatasetError(f"{path}: wrong header {list(frame.columns)}; expected {expected}")
    if len(frame) != len(usage):
        raise DatasetError(
            f"{path}: {len(frame)} rows, but the FER2013 CSV has {len(usage)} "
            f"(FER+ rows must be in the same order)"
        )
    plus_usage = frame["Usage"].str.strip().to_numpy()
    bad = np.flatnonzero(plus_usage != usage)
    if bad.size:
        i = bad[0]
        raise DatasetError(
            f"{path}, line {i + 2}: Usage {str(plus_usage[i])!r}, but line {i + 2} of "
            f"{source.name} has Usage {str(usage[i])!r}; fer2013new.csv must list the rows "
            f"in {source.name}'s order"
        )
    votes = frame[list(FERPLUS_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    bad = np.argwhere(votes.isna().to_numpy() | (votes.to_numpy() < 0))
    if bad.size:
        i, j = bad[0]
        raise DatasetError(
            f"{path}, line {i + 2}: {FERPLUS_COLUMNS[j]} vote "
            f"{frame[FERPLUS_COLUMNS[j]].iloc[i]!r} is not a non-negative number"
        )
    votes = votes.to_numpy(dtype=np.float64, copy=True)
    nonface = frame["Image name"].str.strip().to_numpy() == ""
    votes[nonface] = 0
    votes[nonface, FERPLUS_COLUMNS.index("NF")] = 10
    return votes


def ferplus_majority(votes: np.ndarray) -> np.ndarray:
    """The official FER+ majority rule: votes of 1 are dropped as outliers; the label is the
    argmax if it holds more than half of the remaining votes, else unknown. Returns the FER+
    class index (0-7), or -1 for unknown and non-face images (to be dropped)."""
    v = np.where(votes <= 1, 0.0, votes)
    total = v.sum(axis=1)
    best = v.argmax(axis=1)
    majority = v.max(axis=1) > 0.5 * total
    return np.where(majority & (best < len(FERPLUS_CLASSES)), best, -1)


# ---------------------------------------------------------------------------------- cache


def _cached(source: Path, cache_dir, parse):
    if cache_dir is None:
        return parse(source)
    stat = source.stat()
    key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() / f"{source.stem}-{digest}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return z["images"], z["labels"], z["split"], z["ids"]
    data = parse(source)
    write_atomically(
        cache, lambda f: np.savez(f, images=data[0], labels=data[1], split=data[2], ids=data[3])
    )
    return data
