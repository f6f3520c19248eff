"""Datasets on disk in the real formats, made from the synthetic set (as torchvision's
``FakeData``): FER2013's CSV in its three published forms and as image folders, FER+'s votes
file, and CK+ in its original layout (frames, emotion codes, 68 landmarks) and as CK+48. The
readers' tests and the benchmarks read these exactly as they read a user's copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fermodel.data import synthetic
from fermodel.data.ckplus import (
    CROP_MARGIN,
    EMOTION_DIR,
    FRAME_SIZE,
    IMAGES_DIR,
    LANDMARKS_DIR,
    NEUTRAL,
)
from fermodel.data.dataset import CKPLUS_CLASSES, IMAGE_SIZE, FERDataset
from fermodel.data.fer2013 import FERPLUS_COLUMNS, PIXELS, SPLIT_TO_USAGE

_PASTE = 1.5  # CK+ frames: the pasted head square over the face square


# ---------------------------------------------------------------------------------- FER2013


def _pixel_strings(dataset: FERDataset) -> list[str]:
    flat = dataset.images.reshape(len(dataset), PIXELS).numpy()
    return [" ".join(map(str, row)) for row in flat.tolist()]


def write_fer2013_csv(dataset: FERDataset, path, form: str = "fer2013") -> Path:
    """Write ``dataset`` (FER2013's 7 classes; split train/val/test) as ``fer2013.csv``
    (``form="fer2013"``), ``icml_face_data.csv`` (``"icml"``), or Kaggle's ``train.csv`` with
    an unlabeled ``test.csv`` beside it (``"kaggle"``: only the train split is labeled)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    usage = [SPLIT_TO_USAGE[s] for s in dataset.split]
    frame = pd.DataFrame(
        {"emotion": dataset.labels.numpy(), "pixels": _pixel_strings(dataset), "Usage": usage}
    )
    if form == "fer2013":
        frame.to_csv(path, index=False)
    elif form == "icml":
        frame = frame[["emotion", "Usage", "pixels"]]
        frame.columns = ["emotion", " Usage", " pixels"]
        frame.to_csv(path, index=False)
    elif form == "kaggle":
        train = dataset.split == "train"
        frame.loc[train, ["emotion", "pixels"]].to_csv(path, index=False)
        frame.loc[~train, ["pixels"]].to_csv(path.with_name("test.csv"), index=False)
    else:
        raise ValueError(f"form must be 'fer2013', 'icml' or 'kaggle', got {form!r}")
    return path


def write_fer2013_folders(dataset: FERDataset, root, prefixes: bool = True) -> Path:
    """Write ``train/<class>/`` and ``test/<class>/`` PNGs; val images go to test/ (as in the
    Kaggle folders), told apart by their ``PublicTest_`` prefix when ``prefixes`` is on."""
    root = Path(root)
    flat = dataset.images[:, 0].numpy()
    for i, (label, split) in enumerate(zip(dataset.labels.tolist(), dataset.split, strict=True)):
        folder = root / ("train" if split == "train" else "test") / dataset.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{SPLIT_TO_USAGE[split]}_{i:08d}.png" if prefixes else f"{i:08d}.png"
        Image.fromarray(flat[i]).save(folder / name)
    for part in ("train", "test"):
        for name in dataset.classes:
            (root / part / name).mkdir(parents=True, exist_ok=True)
    return root


def write_ferplus_csv(path, usage: list[str], votes: np.ndarray, nonface: np.ndarray) -> Path:
    """Write a ``fer2013new.csv``: ``votes`` [rows, 10] in FERPLUS_COLUMNS order; rows where
    ``nonface`` is true get an empty Image name, as in the real file."""
    names = [("" if nf else f"fer{i:07d}.png") for i, nf in enumerate(nonface)]
    frame = pd.DataFrame(votes.astype(int), columns=list(FERPLUS_COLUMNS))
    frame.insert(0, "Image name", names)
    frame.insert(0, "Usage", usage)
    frame.to_csv(path, index=False)
    return Path(path)


# ---------------------------------------------------------------------------------- CK+


@dataclass
class _Plan:
    subject: str
    subject_index: int
    number: str
    code: int  # the expression rendered (1..7)
    labeled: bool
    face_side: int  # side of the square the crop by landmarks takes, pixels
    face_xy: tuple[int, int]  # its top-left corner in the frame


def _plan(num_subjects, sequences_per_subject, unlabeled_sequences, seed) -> list[_Plan]:
    """Which sequences exist. Labeled sequences are numbered first and their codes run through
    1..7 in turn across subjects, so each subject shows several emotions (folds can then be
    stratified); placement is drawn per (seed, subject, sequence), so the labeled sequences are
    the same whatever ``unlabeled_sequences`` is, and both writers agree for a given seed."""
    if not 1 <= num_subjects <= 400:
        raise ValueError(f"num_subjects must be in 1..400, got {num_subjects}")
    if sequences_per_subject < 1 or unlabeled_sequences < 0:
        raise ValueError(
            f"need sequences_per_subject >= 1 and unlabeled_sequences >= 0, got "
            f"{sequences_per_subject} and {unlabeled_sequences}"
        )
    if sequences_per_subject + unlabeled_sequences > 999:
        raise ValueError("at most 999 sequences per subject (three-digit sequence numbers)")
    plans = []
    for s in range(num_subjects):
        subject = f"S{5 + 2 * s:03d}"  # gaps in the numbering, as in CK+
        # face size varies by subject; a multiple of 4 puts the crop on whole pixels of the paste
        side = 4 * int(np.random.default_rng([seed, s]).integers(40, 56))
        pasted = side * 3 // 2
        for j in range(sequences_per_subject + unlabeled_sequences):
            labeled = j < sequences_per_subject
            code = (s * sequences_per_subject + j) % 7 + 1 if labeled else (s + j) % 7 + 1
            place = np.random.default_rng([seed, s, j])
            xy = (
                int(place.integers(16, FRAME_SIZE[0] - pasted - 16)) + side // 4,
                int(place.integers(16, FRAME_SIZE[1] - pasted - 16)) + side // 4,
            )
            plans.append(_Plan(subject, s, f"{j + 1:03d}", code, labeled, side, xy))
    return plans


def _landmarks_of(person: dict[str, float]) -> np.ndarray:
    """The 68 points (iBUG order: jaw, brows, nose, eyes, lips) of a synthetic face at rest, in
    the renderer's canonical frame (u, v in [-1, 1]), placed where ``synthetic.render`` draws
    those features, so the crop by landmarks frames the face the way it frames a real one."""
    a, b = person["face_a"], person["face_b"]
    eye_y, eye_dx, eye_w, eye_h = (person[k] for k in ("eye_y", "eye_dx", "eye_w", "eye_h"))
    # jaw: the face outline from ear to ear (eye height) through the chin
    start = math.asin(max(-1.0, min(1.0, (eye_y - 0.05) / b)))
    phi = np.linspace(math.pi - start, start, 17)
    jaw = np.stack([a * np.cos(phi), 0.05 + b * np.sin(phi)], 1)
    # brows: the drawn segments, inner end raised by the resting tilt, left to right
    brow_y, half, tilt = eye_y - person["brow_gap"], person["brow_len"] / 2, person["rest_tilt"]
    inner_y, outer_y = brow_y - 0.045 * tilt, brow_y + 0.02 * tilt
    t = np.linspace(0, 1, 5)
    left_brow = np.stack([-eye_dx - half + 2 * half * t, outer_y + (inner_y - outer_y) * t], 1)
    right_brow = np.stack([eye_dx - half + 2 * half * t, inner_y + (outer_y - inner_y) * t], 1)
    nose_top, nose_end = eye_y + 0.05, eye_y + 0.05 + person["nose_len"]
    bridge = np.stack([np.zeros(4), np.linspace(nose_top, nose_end - 0.03, 4)], 1)
    s = np.linspace(-1, 1, 5)
    base = np.stack([0.065 * s, nose_end + 0.01 * (1 - s**2)], 1)
    # eyes: outer (left) corner first, then the upper lid, as iBUG orders them
    theta = math.pi + np.linspace(0, 2 * math.pi, 6, endpoint=False)
    eyes = [
        np.stack([c + eye_w * np.cos(theta), eye_y + eye_h * np.sin(theta)], 1)
        for c in (-eye_dx, eye_dx)
    ]
    # lips: the drawn mouth curve (resting curvature), outer contour then inner
    mouth_y, half_w, lip = person["mouth_y"], person["mouth_w"], person["lip"]

    def lips(count: int, reach: float, thick: float) -> np.ndarray:
        angle = math.pi + np.linspace(0, 2 * math.pi, count, endpoint=False)
        t = reach * np.cos(angle)
        centre = mouth_y - 0.065 * person["rest_curve"] * (t**2 - 0.35)
        return np.stack([half_w * t, centre + thick * np.sin(angle)], 1)

    return np.concatenate(
        [
            jaw,
            left_brow,
            right_brow,
            bridge,
            base,
            *eyes,
            lips(12, 1.0, lip),
            lips(8, 0.85, 0.4 * lip),
        ]
    )


def _crop_window(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and half side, in canonical units, of the square ``crop_face`` takes around
    ``points``: what the 48x48 face shows and what the writers paste into a frame."""
    low, high = points.min(axis=0), points.max(axis=0)
    return (low + high) / 2, float((high - low).max()) * (1 + 2 * CROP_MARGIN) / 2


def _render_sequences(plans, num_subjects, frames_per_sequence, seed):
    """Render every planned sequence, the face going from neutral (intensity 0) to the peak
    (intensity 1), frontal and clean (no nuisance) as in lab video. Each image shows the
    subject's landmark crop window widened 1.5 times (the whole head, pasted into frames) at
    72 pixels, so that the crop window is exactly its central 48 pixels: the face a correct
    reader recovers. (The renderer draws at twice the size and area-averages, so upscaled
    frames stay smooth.)

    Returns uint8 [S, F, 72, 72] and each subject's (points, centre, half side)."""
    if frames_per_sequence < 2:
        raise ValueError(f"frames_per_sequence must be at least 2, got {frames_per_sequence}")
    g = torch.Generator().manual_seed(seed)
    identity = synthetic.sample_identities(num_subjects, g)
    geometry = []
    for s in range(num_subjects):
        points = _landmarks_of({key: float(value[s]) for key, value in identity.items()})
        geometry.append((points, *_crop_window(points)))
    f = frames_per_sequence
    who = torch.tensor([p.subject_index for p in plans]).repeat_interleave(f)
    names = [CKPLUS_CLASSES[p.code - 1] for p in plans for _ in range(f)]
    intensity = torch.linspace(0, 1, f).repeat(len(plans))
    expression = synthetic.expression_params(names, intensity)
    nuisance = synthetic.sample_nuisance(len(names), g, strength=0.0)
    # the renderer's pose maps its output square onto the canonical window centre +- 1/scale
    centre = torch.tensor(np.array([geo[1] for geo in geometry]), dtype=torch.float32)[who]
    half = torch.tensor([geo[2] for geo in geometry], dtype=torch.float32)[who]
    nuisance.update(scale=1 / (_PASTE * half), shift_x=centre[:, 0], shift_y=centre[:, 1])
    rows = {key: value[who] for key, value in identity.items()}
    size = 3 * IMAGE_SIZE // 2
    faces = synthetic.render_in_chunks(rows, expression, nuisance, size=size, chunk=32)
    return faces.view(len(plans), f, size, size), identity, geometry


def _face_window(faces: torch.Tensor) -> torch.Tensor:
    """uint8 [F, 1, 48, 48]: what a perfect crop of each frame recovers, the central 48 pixels
    of the 72-pixel renders (the landmark crop window)."""
    inner = slice(IMAGE_SIZE // 4, IMAGE_SIZE // 4 + IMAGE_SIZE)
    return faces[:, None, inner, inner].contiguous()


def write_ckplus_original(
    root,
    num_subjects: int = 6,
    sequences_per_subject: int = 4,
    frames_per_sequence: int = 8,
    unlabeled_sequences: int = 1,
    seed: int = 0,
) -> dict:
    """Write a synthetic CK+ in the original layout under ``root``; returns what was written.

    Frames are 640x490 grayscale PNGs: the rendered head, upscaled (the face square 160 to 220
    pixels, subject-dependent), pasted at a per-sequence position on a plain background of the
    head's own background tone. Every frame has a landmarks file (``"   %.7e   %.7e"`` lines) of 68
    points on the face's jaw, brows, nose, eyes and lips; the face square is exactly the
    square ``crop_face`` takes around them, so a correct reader recovers the rendered face.
    Emotion files (``"   %.7e"``) exist for labeled sequences only, on the last frame; unlabeled
    sequences get an empty Emotion folder, as in CK+.

    Returns {"root": Path, "sequences": [{"subject", "sequence", "emotion" (code, None when
    unlabeled), "rendered" (code shown), "frames", "landmarks" (paths relative to root),
    "emotion_file" (relative path or None), "face_box" (x, y, side of the face square),
    "faces" (uint8 [F, 1, 48, 48], what a perfect crop of each frame gives)}]}.
    """
    root = Path(root)
    plans = _plan(num_subjects, sequences_per_subject, unlabeled_sequences, seed)
    faces, identity, geometry = _render_sequences(plans, num_subjects, frames_per_sequence, seed)
    sequences = []
    for plan, seq_faces in zip(plans, faces, strict=True):
        canonical, centre, half = geometry[plan.subject_index]
        background = round(float(identity["background"][plan.subject_index].clamp(0, 1)) * 255)
        (x, y), side = plan.face_xy, plan.face_side
        pasted, offset = side * 3 // 2, side // 4
        points = np.array([x, y]) + ((canonical - centre) / half + 1) / 2 * side
        landmark_text = "".join(f"   {px:.7e}   {py:.7e}\n" for px, py in points)
        image_dir = Path(IMAGES_DIR, plan.subject, plan.number)
        landmark_dir = Path(LANDMARKS_DIR, plan.subject, plan.number)
        emotion_dir = Path(EMOTION_DIR, plan.subject, plan.number)
        for folder in (image_dir, landmark_dir, emotion_dir):
            (root / folder).mkdir(parents=True, exist_ok=True)
        frames, landmarks = [], []
        for i, face in enumerate(seq_faces, start=1):
            stem = f"{plan.subject}_{plan.number}_{i:08d}"
            frame = Image.new("L", FRAME_SIZE, background)
            big = Image.fromarray(face.numpy()).resize((pasted, pasted), Image.Resampling.BICUBIC)
            frame.paste(big, (x - offset, y - offset))
            frame.save(root / image_dir / f"{stem}.png", compress_level=1)  # speed over size
            (root / landmark_dir / f"{stem}_landmarks.txt").write_text(landmark_text)
            frames.append((image_dir / f"{stem}.png").as_posix())
            landmarks.append((landmark_dir / f"{stem}_landmarks.txt").as_posix())
        emotion_file = None
        if plan.labeled:
            emotion_file = (
                emotion_dir / f"{plan.subject}_{plan.number}_{len(frames):08d}_emotion.txt"
            )
            (root / emotion_file).write_text(f"   {float(plan.code):.7e}\n")
            emotion_file = emotion_file.as_posix()
        sequences.append(
            {
                "subject": plan.subject,
                "sequence": plan.number,
                "emotion": plan.code if plan.labeled else None,
                "rendered": plan.code,
                "frames": frames,
                "landmarks": landmarks,
                "emotion_file": emotion_file,
                "face_box": (x, y, side),
                "faces": _face_window(seq_faces),
            }
        )
    return {"root": root, "sequences": sequences}


def write_ckplus48(
    root,
    num_subjects: int = 6,
    seed: int = 0,
    sequences_per_subject: int = 4,
    frames_per_sequence: int = 8,
    neutral: bool = False,
) -> dict:
    """Write a synthetic CK+48 under ``root``: the last 3 frames of each labeled sequence as
    48x48 PNGs in class folders (and, with ``neutral``, each sequence's first frame in neutral/).

    The faces are those ``write_ckplus_original`` renders for the same arguments, so the two
    layouts of one seed describe the same sequences. Returns {"root": Path, "images": [{"path"
    (relative to root), "class", "label" (index in CKPLUS_CLASSES, or None for neutral),
    "subject", "image" (uint8 [48, 48])}]}.
    """
    root = Path(root)
    plans = _plan(num_subjects, sequences_per_subject, 0, seed)
    faces, _, _ = _render_sequences(plans, num_subjects, frames_per_sequence, seed)
    images = []
    for plan, seq_faces in zip(plans, faces, strict=True):
        faces = _face_window(seq_faces)[:, 0].numpy()
        name = CKPLUS_CLASSES[plan.code - 1]
        picks = [(name, i) for i in range(len(faces) - 3, len(faces))]
        if neutral:
            picks.insert(0, (NEUTRAL, 0))
        for cls, i in picks:
            rel = Path(cls, f"{plan.subject}_{plan.number}_{i + 1:08d}.png")
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(faces[i]).save(root / rel, compress_level=1)
            images.append(
                {
                    "path": rel.as_posix(),
                    "class": cls,
                    "label": None if cls == NEUTRAL else plan.code - 1,
                    "subject": plan.subject,
                    "image": faces[i],
                }
            )
    return {"root": root, "images": images}
