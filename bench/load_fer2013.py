"""Time to load a full-size fer2013.csv (35,887 rows written by the synthetic writer), cold and
from the cache, against pandas' own C parser splitting the pixel column (the reference).

    .venv/bin/python bench/load_fer2013.py
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fermodel.data import make_synthetic
from fermodel.data.fakes import write_fer2013_csv
from fermodel.data.fer2013 import read_fer2013

ROWS = {"train": 28_709, "val": 3_589, "test": 3_589}  # FER2013's Training/PublicTest/PrivateTest


def full_size_csv(path: Path) -> Path:
    base = make_synthetic(num_subjects=60, images_per_class=4, seed=0)
    parts = []
    for split, n in ROWS.items():
        pool = np.flatnonzero(base.split == split)
        part = base.subset(pool[np.arange(n) % len(pool)])
        part.images = part.images.clone()
        part.images[:, 0, 0, 0] = torch.arange(n) % 256  # no two rows alike
        parts.append(part)
    full = parts[0]
    for p in parts[1:]:
        full.images = torch.cat([full.images, p.images])
        full.labels = torch.cat([full.labels, p.labels])
        full.split = np.concatenate([full.split, p.split])
        full.ids = np.concatenate([full.ids, p.ids])
        full.subjects = np.concatenate([full.subjects, p.subjects])
    return write_fer2013_csv(full, path)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def pandas_reference(path: Path):
    frame = pd.read_csv(path)
    pixels = pd.read_csv(
        io.StringIO("\n".join(frame["pixels"])), sep=" ", header=None, dtype=np.uint8
    )
    return pixels.to_numpy().reshape(-1, 1, 48, 48)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        csv, seconds = timed(lambda: full_size_csv(Path(tmp) / "fer2013.csv"))
        print(f"wrote {csv.stat().st_size / 1e6:.0f} MB, 35,887 rows in {seconds:.1f} s")
        ref, t_ref = timed(lambda: pandas_reference(csv))
        cold, t_cold = timed(lambda: read_fer2013(csv))
        cache = Path(tmp) / "cache"
        _, t_fill = timed(lambda: read_fer2013(csv, cache_dir=cache))
        warm, t_warm = timed(lambda: read_fer2013(csv, cache_dir=cache))
        assert len(cold) == len(warm) == 35_887 and torch.equal(cold.images, warm.images)
        assert np.array_equal(ref, cold.images.numpy())
        print(f"reference (pandas C parser on the pixel column): {t_ref:6.2f} s")
        print(
            f"read_fer2013, cold (validated):                 {t_cold:6.2f} s  "
            f"({t_ref / t_cold:.1f}x the reference)"
        )
        print(f"read_fer2013, cold, writing the cache:          {t_fill:6.2f} s")
        print(
            f"read_fer2013, from the cache:                   {t_warm:6.2f} s  "
            f"({t_cold / t_warm:.0f}x faster than cold)"
        )


if __name__ == "__main__":
    main()
