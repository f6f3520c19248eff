"""CK+, the Extended Cohn-Kanade dataset (Lucey et al., "The Extended Cohn-Kanade Dataset (CK+):
A complete dataset for action unit and emotion-specified expression", CVPR Workshops 2010).

Two layouts are read, the format being detected from what the folder holds:

- the original distribution: ``cohn-kanade-images/S005/001/S005_001_00000001.png`` full frames
  (640x490 for most subjects), ``Emotion/S005/001/S005_001_00000011_emotion.txt`` with one
  float code for the sequence's peak (last) frame, only for the 327 labeled sequences, and
  ``Landmarks/S005/001/S005_001_00000011_landmarks.txt`` with 68 ``x y`` points per frame;
- CK+48, the common pre-cropped variant: one folder per class holding 48x48 PNGs named
  ``S###_###_########.png``, the last 3 frames of each labeled sequence.

Faces are cut from original frames by each frame's landmarks (see ``crop_face``), so both layouts
give the same kind of 48x48 face. Neither dataset may be redistributed, so the tests (and anyone
without a copy) use ``write_ckplus_original`` and ``write_ckplus48``, which put a synthetic CK+
rendered by ``fermodel.data.synthetic`` on disk in the real formats.

Choices (where the field or the paper leave room):

- ``frames="last"``, k = 3: the field's standard protocol (the last, most intense frames).
- ``frames="paper"``: Gu & Jin (2025) take "4 random frames" per labeled sequence without saying
  which. Frames are drawn without replacement from the second half of the sequence
  (``frames[n // 2:]``, which ends with the labeled peak), so that each shows the expression
  rather than the neutral onset; where that half has fewer than 4 frames the last 4 frames are
  the pool. The draw for a sequence depends only on ``seed``, the subject and the sequence
  number, so adding or removing other sequences does not change it.
- Crop: the landmarks' bounding box, made square around its centre and widened by
  ``CROP_MARGIN`` (10 %) of its side on each side, so the crop takes in the forehead above the
  brows and a little of the cheeks beyond the jaw points. A square that overhangs the frame is
  shifted inside it (and shrunk to the frame's shorter side if larger), never stretched.
- Neutral: CK+ codes neutral as 0 but labels no sequence with it; with ``include_neutral`` the
  first frame (the onset, neutral by CK+'s recording protocol) of every labeled sequence is a
  "neutral" image, and that frame is then never picked as an expressive one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fermodel.data.dataset import CKPLUS_CLASSES, IMAGE_SIZE, DatasetError, FERDataset

IMAGES_DIR = "cohn-kanade-images"
EMOTION_DIR = "Emotion"
LANDMARKS_DIR = "Landmarks"
NEUTRAL = "neutral"
NUM_LANDMARKS = 68
CROP_MARGIN = 0.1  # of the landmark box side, added on each side
PAPER_FRAMES = 4
CK48_FRAMES = 3  # CK+48 holds the last 3 frames of each labeled sequence
FRAME_SIZE = (640, 490)  # width, height of most CK+ frames

_SUBJECT_RE = re.compile(r"S\d{3}")
_SEQUENCE_RE = re.compile(r"\d{3}")
_FRAME_RE = re.compile(r"(S\d{3})_(\d{3})_(\d{8})\.png")
_EMOTION_RE = re.compile(r"(S\d{3})_(\d{3})_(\d{8})_emotion\.txt")
_LANDMARKS_RE = re.compile(r"(S\d{3})_(\d{3})_(\d{8})_landmarks\.txt")
_FRAME_PATTERN = "S###_###_########.png"


def _visible(folder: Path) -> list[Path]:
    """A folder's entries, sorted, without hidden files (macOS copies carry .DS_Store)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# --------------------------------------------------------------------------- format detection


def detect_ckplus_format(path) -> str:
    """``"original"`` (cohn-kanade-images/, Emotion/, Landmarks/) or ``"ck48"`` (class folders).

    Raises DatasetError when the path is missing, is not a folder, holds neither layout or both.
    """
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; CK+ is read from a folder holding its layout")
    folders = {p.name for p in _visible(root) if p.is_dir()}
    original = folders & {IMAGES_DIR, EMOTION_DIR, LANDMARKS_DIR}
    ck48 = folders & {*CKPLUS_CLASSES, NEUTRAL}
    if original and ck48:
        raise DatasetError(
            f"{root}: holds both layouts (original {sorted(original)} and CK+48 "
            f"{sorted(ck48)}); point at one of them"
        )
    if original:
        return "original"
    if ck48:
        return "ck48"
    raise DatasetError(
        f"{root}: neither CK+ layout: expected {IMAGES_DIR}/, {EMOTION_DIR}/ and "
        f"{LANDMARKS_DIR}/ (original) or folders {', '.join(CKPLUS_CLASSES)} (CK+48); "
        f"found {sorted(folders) or 'no folders'}"
    )


# --------------------------------------------------------------------------- file parsers


def read_gray(path: Path) -> Image.Image:
    """A frame as an 8-bit grayscale PIL image; some CK+ copies have RGB frames."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):
                # 16-bit PNGs: scale to 8 bits rather than let convert("L") clip them at 255
                arr = np.asarray(img, dtype=np.float64)
                if img.mode.startswith("I;16") or arr.max() > 255:
                    arr = arr / 257.0
                return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
            return img.convert("L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc})") from exc


def read_emotion(path: Path, include_neutral: bool) -> int:
    """The code in an emotion file: exactly one number, an integer in 1..7 (0..7 with neutral)."""
    try:
        tokens = path.read_text().split()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable emotion file ({exc})") from exc
    if len(tokens) != 1:
        raise DatasetError(
            f"{path}: an emotion file holds exactly one number, found {len(tokens)} "
            f"values {tokens[:4]}"
        )
    try:
        value = float(tokens[0])
    except ValueError:
        raise DatasetError(f"{path}: line 1: emotion code {tokens[0]!r} is not a number") from None
    low = 0 if include_neutral else 1
    if not (math.isfinite(value) and value.is_integer() and low <= value <= 7):
        why = " (0 is neutral; pass include_neutral=True to keep it)" if value == 0 else ""
        raise DatasetError(
            f"{path}: line 1: emotion code {tokens[0]} is not an integer in {low}..7{why}"
        )
    return int(value)


def read_landmarks(path: Path) -> np.ndarray:
    """[68, 2] float (x, y) points; the file must have 68 lines of two finite numbers."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable landmarks file ({exc})") from exc
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing blank line is harmless
    points = np.zeros((NUM_LANDMARKS, 2))
    for i, line in enumerate(lines[:NUM_LANDMARKS]):
        tokens = line.split()
        try:
            xy = [float(t) for t in tokens]
        except ValueError:
            xy = []
        if len(xy) != 2 or not all(math.isfinite(v) for v in xy):
            raise DatasetError(
                f"{path}: line {i + 1}: expected two numbers 'x y', got {line.strip()!r}"
            )
        points[i] = xy
    if len(lines) < NUM_LANDMARKS:
        raise DatasetError(
            f"{path}: line {len(lines) + 1}: missing; the file has {len(lines)} lines, "
            f"a CK+ landmarks file has {NUM_LANDMARKS}"
        )
    if len(lines) > NUM_LANDMARKS:
        raise DatasetError(
            f"{path}: line {NUM_LANDMARKS + 1}: extra line; a CK+ landmarks file has "
            f"{NUM_LANDMARKS} lines, this one {len(lines)}"
        )
    return points


def crop_face(frame: Image.Image, points: np.ndarray, source: Path | None = None) -> np.ndarray:
    """The face as uint8 [48, 48]: the landmarks' box, squared and widened by ``CROP_MARGIN``.

    Squaring keeps the face's aspect ratio through the resize; the margin keeps the forehead,
    which the 68 points (brows to chin) leave out. The square is shifted inside the frame where
    it overhangs, rather than clipped, so it stays square. PIL's resize on a float box samples
    the exact square with an antialiasing filter, since faces are shrunk about fourfold.
    """
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    side = max(x1 - x0, y1 - y0) * (1 + 2 * CROP_MARGIN)
    if side <= 0:
        raise DatasetError(f"{source}: the {len(points)} landmarks coincide; no face box")
    width, height = frame.size
    side = min(side, width, height)
    left = min(max((x0 + x1) / 2 - side / 2, 0.0), width - side)
    top = min(max((y0 + y1) / 2 - side / 2, 0.0), height - side)
    box = (float(left), float(top), float(left + side), float(top + side))
    face = frame.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS, box=box)
    return np.asarray(face, dtype=np.uint8)


# --------------------------------------------------------------------------- frame selection


def select_frames(
    count: int, frames: str, k: int, rng: np.random.Generator | None, skip_first: bool
) -> list[int]:
    """Indices (into a sequence's frames sorted by number) of the expressive frames to keep."""
    first = 1 if skip_first else 0
    if frames == "last":
        return list(range(max(first, count - k), count))
    pool = list(range(max(first, count // 2), count))
    if len(pool) < PAPER_FRAMES:
        pool = list(range(max(first, count - PAPER_FRAMES), count))
    if len(pool) <= PAPER_FRAMES:
        return pool
    return sorted(rng.choice(pool, size=PAPER_FRAMES, replace=False).tolist())


def _check_frames_arg(frames: str, k: int, seed: int) -> None:
    if frames not in ("last", "paper"):
        raise ValueError(f"frames must be 'last' or 'paper', got {frames!r}")
    if frames == "last" and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if frames == "paper" and k != 3:
        raise ValueError(
            f"k={k!r} applies to frames='last' only; frames='paper' takes {PAPER_FRAMES} random "
            f"frames per sequence (leave k at its default, 3)"
        )
    if frames == "paper" and (
        isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0
    ):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


# --------------------------------------------------------------------------- original layout


@dataclass
class _Sequence:
    subject: str
    number: str
    code: int
    emotion_file: Path
    peak: int  # frame number the emotion file labels


def _check_name(folder: Path, pattern: re.Pattern, what: str) -> None:
    if not folder.is_dir() or not pattern.fullmatch(folder.name):
        raise DatasetError(f"{folder}: unexpected entry; {what}")


def _labeled_sequences(emotion_root: Path, include_neutral: bool) -> tuple[list[_Sequence], int]:
    """Labeled sequences from Emotion/S###/###/, and how many sequence folders had no label."""
    labeled, unlabeled = [], 0
    for subject_dir in _visible(emotion_root):
        _check_name(subject_dir, _SUBJECT_RE, "Emotion/ holds subject folders S###")
        for seq_dir in _visible(subject_dir):
            _check_name(seq_dir, _SEQUENCE_RE, "a subject folder holds sequence folders ###")
            files = _visible(seq_dir)
            for f in files:
                m = _EMOTION_RE.fullmatch(f.name)
                if m is None or m.group(1, 2) != (subject_dir.name, seq_dir.name):
                    raise DatasetError(
                        f"{f}: not an emotion file of sequence {subject_dir.name}/{seq_dir.name}"
                        f" (expected {subject_dir.name}_{seq_dir.name}_########_emotion.txt)"
                    )
            if not files:
                unlabeled += 1
                continue
            if len(files) > 1:
                raise DatasetError(
                    f"{seq_dir}: {len(files)} emotion files for one sequence "
                    f"({', '.join(f.name for f in files)}); CK+ labels only the peak frame"
                )
            f = files[0]
            peak = int(_EMOTION_RE.fullmatch(f.name).group(3))
            code = read_emotion(f, include_neutral)
            labeled.append(_Sequence(subject_dir.name, seq_dir.name, code, f, peak))
    return labeled, unlabeled


def _numbered_files(
    folder: Path, pattern: re.Pattern, suffix: str, seq: _Sequence
) -> dict[int, Path]:
    """Files of one sequence by frame number; any other entry is an error."""
    found = {}
    for f in _visible(folder):
        m = pattern.fullmatch(f.name)
        if m is None or not f.is_file() or m.group(1, 2) != (seq.subject, seq.number):
            raise DatasetError(
                f"{f}: file name does not match {seq.subject}_{seq.number}_########{suffix} "
                f"of sequence {seq.subject}/{seq.number}"
            )
        found[int(m.group(3))] = f
    return found


class _LandmarkSource:
    """A sequence's landmark files; a frame without one borrows its nearest neighbour's."""

    def __init__(self, folder: Path, seq: _Sequence):
        self.folder = folder
        self.files = (
            _numbered_files(folder, _LANDMARKS_RE, "_landmarks.txt", seq) if folder.is_dir() else {}
        )
        if not self.files:
            raise DatasetError(
                f"{folder}: no landmarks for sequence {seq.subject}/{seq.number}; its faces "
                f"cannot be cropped (expected {seq.subject}_{seq.number}_########_landmarks.txt)"
            )

    def points_for(self, number: int) -> tuple[np.ndarray, Path, bool]:
        if number in self.files:
            path = self.files[number]
            return read_landmarks(path), path, False
        # ties go to the earlier frame
        nearest = min(self.files, key=lambda n: (abs(n - number), n))
        path = self.files[nearest]
        return read_landmarks(path), path, True


def _read_original(
    root: Path, frames: str, k: int, include_neutral: bool, seed: int
) -> tuple[list, list[str]]:
    for name in (IMAGES_DIR, EMOTION_DIR, LANDMARKS_DIR):
        if not (root / name).is_dir():
            raise DatasetError(
                f"{root / name}: missing; the original CK+ layout has {IMAGES_DIR}/, "
                f"{EMOTION_DIR}/ and {LANDMARKS_DIR}/ side by side"
            )
    sequences, unlabeled = _labeled_sequences(root / EMOTION_DIR, include_neutral)
    if not sequences:
        raise DatasetError(
            f"{root / EMOTION_DIR}: no labeled sequence (no S###_###_########_emotion.txt "
            f"under {EMOTION_DIR}/S###/###/)"
        )
    offset = 0 if include_neutral else 1  # label index of an emotion code
    records, notes = [], []
    for seq in sequences:
        image_dir = root / IMAGES_DIR / seq.subject / seq.number
        if not image_dir.is_dir():
            raise DatasetError(
                f"{image_dir}: sequence without frames: {_rel(seq.emotion_file, root)} labels "
                f"it but the image folder is missing"
            )
        numbered = _numbered_files(image_dir, _FRAME_RE, ".png", seq)
        if not numbered:
            raise DatasetError(
                f"{image_dir}: sequence without frames: no {_FRAME_PATTERN} in the folder"
            )
        if seq.peak not in numbered:
            raise DatasetError(
                f"{seq.emotion_file}: labels frame {seq.peak}, which {image_dir} does not hold"
            )
        # the labeled frame is the peak; anything recorded after it is not part of the label
        ordered = sorted(n for n in numbered if n <= seq.peak)
        if include_neutral and len(ordered) < 2:
            raise DatasetError(
                f"{image_dir}: one frame only; it cannot be both the neutral onset and the peak"
            )
        rng = None
        if frames == "paper":
            rng = np.random.default_rng([seed, int(seq.subject[1:]), int(seq.number)])
        chosen = [
            (ordered[i], seq.code - offset)
            for i in select_frames(len(ordered), frames, k, rng, include_neutral)
        ]
        if include_neutral:
            chosen.insert(0, (ordered[0], 0))
        wanted = k if frames == "last" else PAPER_FRAMES
        if len(chosen) - include_neutral < wanted:
            notes.append(
                f"{seq.subject}/{seq.number}: {len(ordered)} frames, so "
                f"{len(chosen) - include_neutral} expressive frames instead of {wanted}"
            )
        landmarks = _LandmarkSource(root / LANDMARKS_DIR / seq.subject / seq.number, seq)
        for number, label in chosen:
            path = numbered[number]
            points, lm_path, borrowed = landmarks.points_for(number)
            if borrowed:
                notes.append(
                    f"{_rel(path, root)}: no landmarks file; cropped with {_rel(lm_path, root)}"
                )
            face = crop_face(read_gray(path), points, lm_path)
            records.append((face, label, seq.subject, _rel(path, root)))
    notes.insert(
        0,
        f"ckplus: original layout at {root}: {len(sequences)} labeled sequences "
        f"({unlabeled} unlabeled skipped); frames={frames!r}"
        + (f", k={k}" if frames == "last" else f", seed={seed}")
        + f"; faces cropped by landmarks with a {CROP_MARGIN:.0%} margin",
    )
    return records, notes


# --------------------------------------------------------------------------- CK+48 layout


def _read_ck48(root: Path, frames: str, k: int, include_neutral: bool) -> tuple[list, list[str]]:
    if frames == "paper":
        raise DatasetError(
            f"{root}: CK+48 holds only the last 3 frames of each sequence; frames='paper' "
            f"samples from whole sequences and needs the original layout"
        )
    known = (*CKPLUS_CLASSES, NEUTRAL)
    folders = {}
    for entry in _visible(root):
        if not entry.is_dir():
            raise DatasetError(
                f"{entry}: a file where a CK+48 tree holds only the class folders "
                f"{', '.join(known)}"
            )
        if entry.name not in known:
            raise DatasetError(
                f"{entry}: unknown folder name {entry.name!r} in a CK+48 tree; expected "
                f"{', '.join(known)}"
            )
        folders[entry.name] = entry
    for name in CKPLUS_CLASSES:
        if name not in folders:
            raise DatasetError(f"{root / name}: missing; CK+48 has one folder per class")
    if include_neutral and NEUTRAL not in folders:
        raise DatasetError(
            f"{root / NEUTRAL}: missing; include_neutral=True needs a neutral folder in CK+48"
        )
    classes = ((NEUTRAL,) if include_neutral else ()) + CKPLUS_CLASSES
    notes = []
    if NEUTRAL in folders and not include_neutral:
        notes.append(f"{NEUTRAL}/ ignored (include_neutral=False)")
    records, seen = [], {}
    for label, name in enumerate(classes):
        folder = folders[name]
        by_seq: dict[tuple[str, str], list[tuple[int, Path]]] = {}
        for f in _visible(folder):
            m = _FRAME_RE.fullmatch(f.name)
            if m is None or not f.is_file():
                raise DatasetError(f"{f}: file name does not match {_FRAME_PATTERN}")
            by_seq.setdefault(m.group(1, 2), []).append((int(m.group(3)), f))
        if not by_seq:
            raise DatasetError(f"{folder}: empty class folder; CK+48 has images in every class")
        for key, files in by_seq.items():
            if name != NEUTRAL:
                if key in seen:
                    raise DatasetError(
                        f"{folder / files[0][1].name}: sequence {key[0]}/{key[1]} is in both "
                        f"{seen[key]}/ and {name}/"
                    )
                seen[key] = name
                if len(files) < k:
                    if k > CK48_FRAMES:
                        raise DatasetError(
                            f"{root}: k={k}, but CK+48 holds only the last {CK48_FRAMES} frames "
                            f"of each sequence ({key[0]}/{key[1]} has {len(files)} in "
                            f"{name}/); use k <= {CK48_FRAMES}, or the original layout for more"
                        )
                    notes.append(
                        f"{key[0]}/{key[1]}: {len(files)} frames in {name}/, so "
                        f"{len(files)} frames instead of {k}"
                    )
                files = sorted(files)[-k:]
            for _, f in files:
                img = read_gray(f)
                if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                    raise DatasetError(
                        f"{f}: image is {img.size[0]}x{img.size[1]}; CK+48 images are 48x48"
                    )
                records.append((np.asarray(img, dtype=np.uint8), label, key[0], _rel(f, root)))
    notes.insert(
        0, f"ckplus: CK+48 layout at {root}: {len(seen)} labeled sequences; last {k} frames"
    )
    return records, notes


# --------------------------------------------------------------------------- reader


def read_ckplus(
    path, frames: str = "last", k: int = 3, include_neutral: bool = False, seed: int = 0
) -> FERDataset:
    """CK+ from the original tree or CK+48 folders, as a FERDataset named "ckplus".

    frames           "last": the last ``k`` frames of each labeled sequence (the standard, k = 3;
                     CK+48 holds only 3 frames a sequence, so k > 3 there is a DatasetError);
                     "paper": 4 random frames per labeled sequence from its second half, drawn
                     with ``seed`` (Gu & Jin's protocol; original layout only; ``k`` must stay
                     at its default, 3, since it does not apply)
    include_neutral  add class 0 "neutral": the first frame of each labeled sequence (original)
                     or the neutral/ folder (CK+48)

    Labels index ``CKPLUS_CLASSES`` (codes 1..7 -> 0..6), or ``("neutral",) + CKPLUS_CLASSES``
    (codes 0..7) with neutral. ``split`` is "" everywhere: CK+ defines no split, the protocols
    assign subject-independent folds using ``subjects``. ``ids`` are paths relative to ``path``.
    """
    _check_frames_arg(frames, k, seed)
    root = Path(path)
    fmt = detect_ckplus_format(root)
    if fmt == "original":
        records, notes = _read_original(root, frames, k, include_neutral, seed)
    else:
        records, notes = _read_ck48(root, frames, k, include_neutral)
    # one order for both layouts: subject, sequence, frame (the frame name carries all three)
    records.sort(key=lambda r: (Path(r[3]).name, r[1]))
    faces, labels, subjects, ids = zip(*records, strict=True)
    n = len(records)
    return FERDataset(
        name="ckplus",
        images=torch.from_numpy(np.stack(faces)[:, None].copy()),
        labels=torch.tensor(labels, dtype=torch.int64),
        classes=((NEUTRAL,) if include_neutral else ()) + CKPLUS_CLASSES,
        split=np.full(n, "", dtype=str),
        ids=np.array(ids, dtype=str),
        subjects=np.array(subjects, dtype=str),
        notes=notes,
    )
