"""``python -m fermodel.predict MODEL IMAGES...``: the expression of each face, with the class
probabilities.

MODEL is a run folder of ``python -m fermodel.train`` (its selected weights: the epoch with the
best validation accuracy), or an MLflow model that a study logged: ``runs:/<run id>/model`` or
``models:/<name>@<alias>``. IMAGES are image files, folders of images, or FER2013-format CSV
files (a ``pixels`` column; ``emotion`` and ``Usage`` may be there and are ignored). Faces are
expected cropped; an image that is not 48x48 grey is converted to grey and resized, as the
FER2013 folder reader does. The model predicts as it was tested, without test-time
augmentation. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fermodel.augment import to_float
from fermodel.checkpoint import CheckpointError, best_model, load_checkpoint
from fermodel.cli import OneLineParser
from fermodel.config import ConfigError, TrialConfig
from fermodel.data import DatasetError
from fermodel.data.dataset import IMAGE_SIZE
from fermodel.data.fer2013 import IMAGE_SUFFIXES, read_image

MLFLOW_SCHEMES = ("runs:/", "models:/")
BATCH = 256


class ModelError(ValueError):
    """A model that cannot be found or loaded."""


@dataclass
class Predictor:
    net: torch.nn.Module  # [N, 1, 48, 48] floats in [0, 1] -> logits [N, K]
    classes: tuple[str, ...]

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities [N, K] of uint8 images [N, 1, 48, 48], N >= 1."""
        return torch.cat(
            [
                torch.softmax(self.net(to_float(images[i : i + BATCH])).float(), dim=1)
                for i in range(0, len(images), BATCH)
            ]
        )


def selected_model(config: TrialConfig, num_classes: int, weights: dict) -> torch.nn.Module:
    """A trial's selected model as it predicts, on the CPU, in eval mode: built as the engine
    builds it (``build_parts``; no pretrained file is read, contiguous memory), so its wrapper
    takes [0, 1] grey images [N, 1, 48, 48] and returns logits [N, K]. What a study logs to
    MLflow, and what a run folder loads."""
    from fermodel.engine import build_parts

    config = config.replace(pretrained="", compile=False, channels_last=False)
    net = build_parts(config, num_classes, torch.device("cpu")).net
    net.model.load_state_dict(weights)
    return net.eval()


def load_predictor(model: str) -> Predictor:
    if model.startswith(MLFLOW_SCHEMES):
        return _load_mlflow(model)
    return _load_run_folder(Path(model))


def _load_run_folder(folder: Path) -> Predictor:
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such run folder (nor a runs:/ or models:/ URI)")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a run folder of python -m fermodel.train (no config.json)")
    results = folder / "results.json"
    if not results.is_file():  # the class names are written when the run finishes
        raise ModelError(f"{results}: missing; finish the run first (--resume {folder})")
    config = TrialConfig.from_file(folder / "config.json")
    classes = tuple(json.loads(results.read_text())["classes"])
    weights = best_model(load_checkpoint(folder / "checkpoint"))
    return Predictor(selected_model(config, len(classes), weights), classes)


def _load_mlflow(uri: str) -> Predictor:
    import mlflow.pytorch
    from mlflow.models import get_model_info

    store = mlflow.get_tracking_uri()
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        raise ModelError(f"{uri}: no MLflow store at {store} (give --tracking-uri)")
    try:
        metadata = get_model_info(uri).metadata or {}
        net = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as err:  # MLflow raises its own types, per store
        text = str(err).strip().splitlines()
        raise ModelError(f"{uri}: {text[0] if text else type(err).__name__}") from None
    if not metadata.get("classes"):
        raise ModelError(f"{uri}: not a model of this project (no classes in its metadata)")
    return Predictor(net, tuple(metadata["classes"]))  # exported in eval mode: eval() is refused


def read_images(sources: list[str]) -> tuple[list[str], torch.Tensor]:
    """Names and uint8 images [N, 1, 48, 48] of image files, folders and FER2013 CSV files."""
    names, images = [], []
    for source in map(Path, sources):
        if source.is_dir():
            files = sorted(f for f in source.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DatasetError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            names += map(str, files)
            images += map(read_image, files)
        elif source.suffix.lower() == ".csv":
            ids, pixels = read_pixels_csv(source)
            names += ids
            images += list(pixels)
        elif source.is_file():
            names.append(str(source))
            images.append(read_image(source))
        else:
            raise DatasetError(f"{source}: no such file or folder")
    stacked = np.stack(images).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    return names, torch.from_numpy(stacked)


def read_pixels_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """The ``pixels`` column of a FER2013-format CSV as uint8 [N, 48, 48], named by line."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not a readable CSV ({err})") from None
    frame.columns = [c.strip() for c in frame.columns]
    if "pixels" not in frame.columns:
        raise DatasetError(
            f"{path}: no pixels column (header {list(frame.columns)}); expected FER2013's "
            f"emotion,pixels,Usage (emotion and Usage optional)"
        )
    if frame.empty:
        raise DatasetError(f"{path}: has a header but no rows")
    rows = []
    for line, text in enumerate(frame["pixels"], start=2):  # the header is line 1
        tokens = text.split()
        if len(tokens) != IMAGE_SIZE * IMAGE_SIZE:
            raise DatasetError(
                f"{path}, line {line}: {len(tokens)} pixel values, expected 2304 (48x48)"
            )
        values = np.array([int(t) if t.isdigit() else -1 for t in tokens])
        if values.min() < 0 or values.max() > 255:
            bad = tokens[int(np.flatnonzero((values < 0) | (values > 255))[0])]
            raise DatasetError(f"{path}, line {line}: pixel {bad!r} is not a value 0-255")
        rows.append(values.astype(np.uint8))
    names = [f"{path}:line {line}" for line in range(2, len(rows) + 2)]
    return names, np.stack(rows).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


def format_table(names: list[str], classes: tuple[str, ...], probs: torch.Tensor) -> str:
    """One aligned line per image: name, expression, then each class's probability."""
    width = max(len("image"), *map(len, names))
    expression = max(len("expression"), *map(len, classes))
    columns = [max(5, len(c)) for c in classes]
    head = [f"{'image':<{width}}  {'expression':<{expression}}"]
    head += [f"{c:>{w}}" for c, w in zip(classes, columns, strict=True)]
    lines = [" ".join(head)]
    for name, p in zip(names, probs.tolist(), strict=True):
        best = classes[int(np.argmax(p))]
        cells = [f"{name:<{width}}  {best:<{expression}}"]
        cells += [f"{v:>{w}.3f}" for v, w in zip(p, columns, strict=True)]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def as_json(names: list[str], classes: tuple[str, ...], probs: torch.Tensor) -> str:
    return json.dumps(
        [
            {
                "image": name,
                "expression": classes[int(np.argmax(p))],
                "probabilities": dict(zip(classes, p, strict=True)),
            }
            for name, p in zip(names, probs.tolist(), strict=True)
        ],
        indent=1,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m fermodel.predict",
        description="Name the expression of each face with a trained model, and print the class\n"
        "probabilities (one line per image). Faces are expected cropped; an image that is not\n"
        "48x48 grey is converted to grey and resized to 48x48. No test-time augmentation.",
        epilog="examples:\n"
        "  python -m fermodel.predict runs/20261124-231500-synthetic-resnet50-psa-island face.png\n"
        "  python -m fermodel.predict models:/table4@best faces/ test.csv --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a run folder of python -m fermodel.train, runs:/<run id>/model or "
        "models:/<name>@<alias> (an MLflow model a study logged)",
    )
    parser.add_argument(
        "images",
        metavar="IMAGES",
        nargs="+",
        help="image files (PNG, JPEG, BMP), folders of them, or FER2013-format "
        "CSV files (a pixels column; emotion and Usage optional)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list, not the table. Default: the table"
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store of runs:/ and models:/ URIs. Default: "
        "MLFLOW_TRACKING_URI if set, else sqlite:///<cwd>/mlflow.db",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # read when mlflow is first imported
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    try:
        names, images = read_images(args.images)
        predictor = load_predictor(args.model)
    except (ModelError, CheckpointError, ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    probs = predictor.probabilities(images)
    show = as_json if args.json else format_table
    print(show(names, predictor.classes, probs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
