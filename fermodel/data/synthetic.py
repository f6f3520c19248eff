"""A procedural, seeded set of 48x48 grayscale expression faces: the built-in default dataset.

Each subject has identity traits (face shape, skin and hair tone, feature positions and sizes,
and a resting expression bias) shared by all of their images; expressions move what real ones
move (mouth curvature, openness and width, upper lip, brow height and tilt, eye openness, nose
wrinkle, one-sided lip raise for contempt), at an intensity between subtle and peak; nuisance
varies per image (pose, scale, illumination gradient and gain, noise, occluding patches). Weak
expressions, resting biases and occlusion keep the classes overlapping, so the task is
learnable but not trivial. Rendering is batched tensor maths at twice the size, then pooled.

It exercises the pipeline (readers, subject-independent folds, training, ablations); it says
nothing about accuracy on real faces.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fermodel.data.dataset import FER2013_CLASSES, FERDataset

# expression -> (mouth curve, mouth open, mouth width scale, upper-lip raise, one-sided raise,
#                brow raise, brow tilt (inner end up > 0), eye openness, nose wrinkle) at peak
EXPRESSIONS: dict[str, tuple[float, ...]] = {
    "neutral": (0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "angry": (-0.4, 0.0, 0.9, 0.0, 0.0, -0.8, -1.0, 0.7, 0.3),
    "disgust": (-0.6, 0.25, 1.0, 1.0, 0.0, -0.5, -0.4, 0.6, 1.0),
    "fear": (-0.3, 0.6, 1.2, 0.0, 0.0, 0.7, 0.8, 1.45, 0.0),
    "happy": (1.0, 0.35, 1.2, 0.0, 0.0, 0.1, 0.0, 0.75, 0.0),
    "sad": (-0.9, 0.0, 0.95, 0.0, 0.0, 0.1, 0.9, 0.8, 0.0),
    "surprise": (0.0, 1.0, 0.75, 0.0, 0.0, 1.0, 0.2, 1.6, 0.0),
    "contempt": (0.1, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.9, 0.0),
}
# synonyms used by CK+'s label names
EXPRESSIONS["anger"] = EXPRESSIONS["angry"]
EXPRESSIONS["sadness"] = EXPRESSIONS["sad"]


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def sample_identities(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Identity traits of ``n`` subjects, in the canonical frame u, v in [-1, 1]."""
    return {
        "face_a": _uniform(g, n, 0.56, 0.72),
        "face_b": _uniform(g, n, 0.76, 0.90),
        "skin": _uniform(g, n, 0.45, 0.85),
        "hair": _uniform(g, n, 0.05, 0.35),
        "hair_line": _uniform(g, n, -0.78, -0.45),
        "background": _uniform(g, n, 0.1, 0.9),
        "eye_y": _uniform(g, n, -0.24, -0.12),
        "eye_dx": _uniform(g, n, 0.23, 0.31),
        "eye_w": _uniform(g, n, 0.09, 0.13),
        "eye_h": _uniform(g, n, 0.05, 0.07),
        "brow_gap": _uniform(g, n, 0.1, 0.15),
        "brow_thick": _uniform(g, n, 0.025, 0.045),
        "brow_len": _uniform(g, n, 0.15, 0.21),
        "nose_len": _uniform(g, n, 0.14, 0.22),
        "mouth_y": _uniform(g, n, 0.34, 0.46),
        "mouth_w": _uniform(g, n, 0.17, 0.25),
        "lip": _uniform(g, n, 0.02, 0.035),
        # resting bias: some faces look a little sad or cross when neutral
        "rest_curve": 0.2 * torch.randn(n, generator=g),
        "rest_tilt": 0.2 * torch.randn(n, generator=g),
    }


def expression_params(names: list[str], intensity: torch.Tensor) -> torch.Tensor:
    """[N, 9] expression parameters: neutral moved toward each peak by ``intensity``."""
    unknown = sorted(set(names) - set(EXPRESSIONS))
    if unknown:
        raise ValueError(f"no synthetic expression for {unknown}; known: {sorted(EXPRESSIONS)}")
    peak = torch.tensor([EXPRESSIONS[c] for c in names])
    neutral = torch.tensor(EXPRESSIONS["neutral"])
    return neutral + intensity[:, None] * (peak - neutral)


def sample_nuisance(n: int, g: torch.Generator, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-image pose, light, noise and occlusion; ``strength`` 0 gives a frontal, clean face."""
    s = strength
    return {
        "angle": s * math.radians(10) * torch.randn(n, generator=g).clamp(-2, 2),
        "scale": 1 + s * _uniform(g, n, -0.12, 0.12),
        "shift_x": s * _uniform(g, n, -0.08, 0.08),
        "shift_y": s * _uniform(g, n, -0.08, 0.08),
        "flip": (torch.rand(n, generator=g) < 0.5 * min(s, 1.0)).float(),
        "gain": 1 + s * _uniform(g, n, -0.35, 0.25),
        "light": s * _uniform(g, n, 0.0, 0.35),
        "light_dir": _uniform(g, n, 0, 2 * math.pi),
        "noise": s * _uniform(g, n, 0.01, 0.06),
        "occlude": (torch.rand(n, generator=g) < 0.25 * s).float(),
        "occ_x": _uniform(g, n, -0.8, 0.5),
        "occ_y": _uniform(g, n, -0.6, 0.6),
        "occ_w": _uniform(g, n, 0.2, 0.5),
        "occ_h": _uniform(g, n, 0.15, 0.4),
        "occ_tone": _uniform(g, n, 0.0, 1.0),
        "jitter": s * 0.12 * torch.randn(n, 9, generator=g),
        "noise_seed": torch.randint(0, 2**31 - 1, (n,), generator=g),
    }


def _soft(d: torch.Tensor, edge: float) -> torch.Tensor:
    """A soft inside-mask of a signed distance (inside where d > 0)."""
    return torch.sigmoid(d / edge)


def _segment_distance(u, v, x0, y0, x1, y1):
    dx, dy = x1 - x0, y1 - y0
    t = (((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy)).clamp(0, 1)
    return torch.hypot(u - (x0 + t * dx), v - (y0 + t * dy))


def render(
    identity: dict[str, torch.Tensor],
    expression: torch.Tensor,
    nuisance: dict[str, torch.Tensor],
    size: int = 48,
) -> torch.Tensor:
    """Render N faces (every tensor has N rows) as uint8 [N, 1, size, size]."""
    n = expression.shape[0]
    res = 2 * size
    axis = torch.linspace(-1, 1, res)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    u, v = u.expand(n, res, res), v.expand(n, res, res)
    edge = 2.0 / res

    def p(d: dict, key: str) -> torch.Tensor:
        return d[key][:, None, None]

    e = (expression + nuisance["jitter"])[:, :, None, None]
    curve = e[:, 0] + p(identity, "rest_curve")
    mouth_open, width, upper_raise, one_side = e[:, 1].clamp(min=0), e[:, 2], e[:, 3], e[:, 4]
    brow_raise, tilt = e[:, 5], e[:, 6] + p(identity, "rest_tilt")
    eye_open, wrinkle = e[:, 7].clamp(0.15, 2.0), e[:, 8].clamp(min=0)

    skin, hair = p(identity, "skin"), p(identity, "hair")
    img = p(identity, "background").expand(n, res, res).clone()

    face_r = torch.sqrt(
        (u / p(identity, "face_a")) ** 2 + ((v - 0.05) / p(identity, "face_b")) ** 2
    )
    face = _soft(1 - face_r, edge * 2)
    # shade the face a little toward the jaw so it is not a flat disc
    img = img * (1 - face) + face * skin * (1 - 0.15 * (v.clamp(min=0) ** 2))
    head_r = torch.sqrt(
        (u / (1.08 * p(identity, "face_a"))) ** 2
        + ((v - 0.02) / (1.06 * p(identity, "face_b"))) ** 2
    )
    hair_mask = _soft(1 - head_r, edge * 2) * _soft(p(identity, "hair_line") - v, edge * 3)
    img = img * (1 - hair_mask) + hair_mask * hair

    eye_y, eye_dx = p(identity, "eye_y"), p(identity, "eye_dx")
    eye_w, eye_h = p(identity, "eye_w"), p(identity, "eye_h") * eye_open
    brow_y = eye_y - p(identity, "brow_gap") - 0.1 * brow_raise
    half_len, thick = p(identity, "brow_len") / 2, p(identity, "brow_thick")
    for side in (-1.0, 1.0):
        ex = side * eye_dx
        eye_r = torch.sqrt(((u - ex) / eye_w) ** 2 + ((v - eye_y) / eye_h) ** 2)
        eye = _soft(1 - eye_r, edge * 3)
        img = img * (1 - eye) + eye * (0.85 * skin + 0.15)
        iris_r = torch.sqrt((u - ex) ** 2 + (v - eye_y) ** 2)
        iris = eye * _soft(torch.minimum(eye_h, 0.045 * torch.ones_like(eye_h)) - iris_r, edge)
        img = img * (1 - iris) + iris * 0.08
        inner_y, outer_y = brow_y - 0.08 * tilt, brow_y + 0.03 * tilt
        d = _segment_distance(u, v, ex - side * half_len, inner_y, ex + side * half_len, outer_y)
        brow = _soft(thick - d, edge)
        img = img * (1 - brow) + brow * hair
        # nose wrinkle: short lines on the bridge between the eyes
        wr = _segment_distance(u, v, side * 0.03, eye_y + 0.03, side * 0.1, eye_y + 0.06)
        img = img - 0.25 * wrinkle * _soft(0.012 - wr, edge) * skin

    nose_top, nose_len = eye_y + 0.05, p(identity, "nose_len")
    nose = _soft(0.018 - _segment_distance(u, v, 0 * u, nose_top, 0 * u, nose_top + nose_len), edge)
    img = img - 0.18 * nose * skin
    for side in (-1.0, 1.0):
        nostril = torch.hypot(u - side * 0.045, v - (nose_top + nose_len))
        img = img - 0.3 * _soft(0.022 - nostril, edge) * skin

    mouth_y, half_w = p(identity, "mouth_y"), p(identity, "mouth_w") * width
    t = (u / half_w).clamp(-1, 1)
    inside_w = _soft(1 - (u / half_w).abs(), edge * 4 / half_w)
    centre = mouth_y - 0.12 * curve * (t**2 - 0.35) - 0.1 * one_side * t.clamp(min=0) ** 2
    gap = 0.1 * mouth_open * torch.sqrt((1 - t**2).clamp(min=0))
    upper = centre - gap - 0.06 * upper_raise * (1 - t**2)
    lower = centre + gap
    lip = p(identity, "lip")
    lips = inside_w * _soft(v - (upper - lip), edge) * _soft((lower + lip) - v, edge)
    img = img * (1 - lips) + lips * 0.55 * skin
    cavity = inside_w * _soft(v - upper, edge) * _soft(lower - v, edge) * (gap > 0.004)
    img = img * (1 - cavity) + cavity * 0.06

    # pose: rotate, scale and shift the canonical face; the border colour fills what comes in
    cos, sin = torch.cos(nuisance["angle"]), torch.sin(nuisance["angle"])
    scale = nuisance["scale"]
    flip = 1 - 2 * nuisance["flip"]
    theta = torch.stack(
        [
            torch.stack([cos / scale * flip, -sin / scale, nuisance["shift_x"]], dim=1),
            torch.stack([sin / scale * flip, cos / scale, nuisance["shift_y"]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [n, 1, res, res], align_corners=False)
    img = F.grid_sample(img[:, None], grid, padding_mode="border", align_corners=False)[:, 0]

    direction = p(nuisance, "light_dir")
    light = 1 + p(nuisance, "light") * (u * torch.cos(direction) + v * torch.sin(direction))
    img = img * p(nuisance, "gain") * light

    occ = p(nuisance, "occlude") * (
        _soft(u - p(nuisance, "occ_x"), edge)
        * _soft(p(nuisance, "occ_x") + p(nuisance, "occ_w") - u, edge)
        * _soft(v - p(nuisance, "occ_y"), edge)
        * _soft(p(nuisance, "occ_y") + p(nuisance, "occ_h") - v, edge)
    )
    img = img * (1 - occ) + occ * p(nuisance, "occ_tone")

    img = F.avg_pool2d(img[:, None], 2)
    noise = torch.stack(
        [
            torch.randn(1, size, size, generator=torch.Generator().manual_seed(int(s)))
            for s in nuisance["noise_seed"]
        ]
    )
    img = img + nuisance["noise"][:, None, None, None] * noise
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _rows(d: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in d.items()}


def render_in_chunks(identity, expression, nuisance, size=48, chunk=256) -> torch.Tensor:
    """``render`` a chunk at a time, so large sets stay within modest memory."""
    n = expression.shape[0]
    parts = []
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(start + chunk, n))
        parts.append(render(_rows(identity, idx), expression[idx], _rows(nuisance, idx), size))
    return torch.cat(parts) if parts else torch.zeros(0, 1, size, size, dtype=torch.uint8)


def make_synthetic(
    num_subjects: int = 60,
    images_per_class: int = 4,
    classes: tuple[str, ...] = FER2013_CLASSES,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    difficulty: float = 1.0,
) -> FERDataset:
    """Every subject shows every class ``images_per_class`` times (so classes are balanced);
    subjects are split train/val/test by ``split_fractions`` (no subject in two splits).
    Deterministic for a given seed: the same arguments give the same bytes.

    ``difficulty`` in (0, 1] scales what hides the expression: the nuisance (pose, light,
    noise, occlusion, expression jitter) is multiplied by it, and expressions range from
    ``1 - 0.55 * difficulty`` of their peak to the peak (1: from 0.45, subtle to peak; 0.5:
    from 0.725, half the nuisance). Identities and resting biases are the same at every
    difficulty."""
    if num_subjects < 3:
        raise ValueError(f"num_subjects must be at least 3 (one per split), got {num_subjects}")
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be at least 1, got {images_per_class}")
    if (
        len(split_fractions) != 3
        or min(split_fractions) < 0
        or abs(sum(split_fractions) - 1) > 1e-6
    ):
        raise ValueError(
            f"split_fractions must be three non-negative numbers summing to 1, "
            f"got {split_fractions}"
        )
    if not 0 < difficulty <= 1:
        raise ValueError(f"difficulty must be in (0, 1], got {difficulty}")
    # every split with a share gets at least one subject; train takes the rest
    n_val = max(1, round(split_fractions[1] * num_subjects)) if split_fractions[1] else 0
    n_test = max(1, round(split_fractions[2] * num_subjects)) if split_fractions[2] else 0
    n_train = num_subjects - n_val - n_test
    if n_train < (1 if split_fractions[0] else 0):
        raise ValueError(
            f"split_fractions {tuple(split_fractions)} with num_subjects={num_subjects} give "
            f"{n_val} val and {n_test} test subjects, leaving {n_train} for train"
        )
    g = torch.Generator().manual_seed(seed)
    k = len(classes)
    per_subject = k * images_per_class
    n = num_subjects * per_subject
    subject = torch.arange(num_subjects).repeat_interleave(per_subject)
    label = torch.arange(k).repeat_interleave(images_per_class).repeat(num_subjects)

    identity = _rows(sample_identities(num_subjects, g), subject)
    intensity = _uniform(g, n, 1 - 0.55 * difficulty, 1.0)
    expression = expression_params([classes[i] for i in label.tolist()], intensity)
    images = render_in_chunks(identity, expression, sample_nuisance(n, g, difficulty))

    order = torch.randperm(num_subjects, generator=g).numpy()
    subject_split = np.empty(num_subjects, dtype=object)
    subject_split[order[:n_train]] = "train"
    subject_split[order[n_train : n_train + n_val]] = "val"
    subject_split[order[n_train + n_val :]] = "test"
    names = np.array([f"syn{s:04d}" for s in range(num_subjects)])
    return FERDataset(
        name="synthetic",
        images=images,
        labels=label,
        classes=tuple(classes),
        split=subject_split[subject.numpy()].astype(str),
        ids=np.array([f"synthetic:{i}" for i in range(n)]),
        subjects=names[subject.numpy()],
        notes=[
            f"synthetic: {num_subjects} subjects x {k} classes x {images_per_class}, seed {seed}"
            + ("" if difficulty == 1 else f", difficulty {difficulty}")
        ],
    )
