"""``python -m fermodel.train``: one trial from flags or a config file.

Every key of ``TrialConfig`` is a flag (``--attention psa``, ``--loss island``, ``--lr 3e-4``,
``--no-augment``); ``--data`` is short for ``--data-path``. A ``--config`` file (flat JSON or
TOML) sets keys first and flags override it. The output folder receives ``config.json``,
``checkpoint/state.pt`` (atomically; how often: ``checkpoint_every``), and at the end
``results.json``, ``confusion_matrix.png`` and ``curves.png``. ``--resume DIR`` continues an
interrupted run from its saved config and checkpoint. Bad flags, configs or data: one line on
stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import typing
from dataclasses import fields
from pathlib import Path

from fermodel.checkpoint import STATE_FILE, CheckpointError
from fermodel.cli import OneLineParser
from fermodel.config import ConfigError, TrialConfig, describe
from fermodel.data import DatasetError
from fermodel.pretrained import PretrainedError, check_source

USER_ERRORS = (ConfigError, DatasetError, PretrainedError, CheckpointError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m fermodel.train",
        description="Train and evaluate one FER trial (defaults: the paper's PSA-ResNet-50 with "
        "Island loss, on the built-in synthetic set).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a flat JSON or TOML file of config keys, applied first; flags "
        "override it. Default: none",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="FOLDER",
        help="output folder, new or empty; made once the first epoch ends. "
        "Default: runs/<time>-<dataset>-<backbone>-<attention>-<loss>",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="FOLDER",
        help="continue the interrupted run in this output folder, with its "
        "saved config (no other keys). Default: a new run",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar. Default: a progress bar on stderr"
    )
    hints = typing.get_type_hints(TrialConfig)
    for f in fields(TrialConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, "--data"] if f.name == "data_path" else [flag]
        kind, text = hints[f.name], describe(f.name).replace("%", "%%")  # argparse formats help
        if kind is bool:
            parser.add_argument(
                *names, dest=f.name, action=argparse.BooleanOptionalAction, help=text
            )
        else:
            metavar = "|".join(map(str, f.metadata["choices"])) or kind.__name__.upper()
            parser.add_argument(*names, dest=f.name, type=str, metavar=metavar, help=text)
    return parser


def _config(args: dict) -> tuple[TrialConfig, Path]:
    keys = {f.name for f in fields(TrialConfig)}
    flags = {k: v for k, v in args.items() if k in keys}
    if "resume" in args:
        out = args["resume"]
        if flags or "config" in args or "out" in args:
            raise ConfigError("--resume continues a run with its saved config; give no other keys")
        return TrialConfig.from_file(out / "config.json"), out
    values = {}
    if "config" in args:
        values = TrialConfig.from_file(args["config"]).to_dict()
    if flags.get("data_path"):
        flags["data_path"] = str(Path(flags["data_path"]).expanduser().resolve())
    if str(flags.get("pretrained", "")).lower() == "none":  # as the study CLI's none
        flags["pretrained"] = ""
    config = TrialConfig.from_dict({**values, **flags})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{config.dataset}-{config.backbone}-{config.attention}-{config.loss}"
    return config, args.get("out", Path("runs") / name)


def _keep_checkpoint(out: Path, config: TrialConfig):
    """A report callback that moves each epoch's checkpoint into ``out/checkpoint`` (the engine
    deletes its temporary folder after the report, so the file need not be copied). The folder
    and its ``config.json`` are made at the first report: by then data, model and pretrained
    weights have all been read, so a bad input leaves no half-made run folder behind."""
    target = out / "checkpoint" / STATE_FILE

    def keep(folder: str | None) -> None:
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True)
            (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if folder is not None:
            tmp = target.with_suffix(".tmp")
            shutil.move(Path(folder) / STATE_FILE, tmp)  # a rename on one filesystem
            os.replace(tmp, target)

    return keep


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        config, out = _config(args)
        return run(config, out, resume="resume" in args, quiet="quiet" in args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(config: TrialConfig, out: Path, resume: bool = False, quiet: bool = False) -> int:
    from tqdm import tqdm

    from fermodel.engine import TrainingDiverged, fit, load_trial_data
    from fermodel.plots import plot_trial

    checkpoint = None
    if resume:
        checkpoint = out / "checkpoint"
        if not (checkpoint / STATE_FILE).is_file():
            raise CheckpointError(f"{checkpoint}: no checkpoint to resume from")
    elif out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ConfigError(f"--out {out}: already exists and is not empty; name a new folder")
    if config.pretrained:
        check_source(config.pretrained, config.backbone)  # before a data cache is written
    data = load_trial_data(config, cache_dir=Path.home() / ".cache" / "fer-ablation")
    keep = _keep_checkpoint(out, config)
    bar = tqdm(total=config.epochs, desc="epochs", unit="ep", disable=quiet, file=sys.stderr)

    def report(metrics: dict, folder: str | None) -> None:
        keep(folder)
        bar.n = metrics["epoch"]
        bar.set_postfix(
            loss=f"{metrics['train_loss']:.3f}",
            val_acc=f"{metrics['val_accuracy']:.3f}",
            best=f"{metrics['best_val_accuracy']:.3f}",
        )

    try:
        result = fit(config, data, report=report, checkpoint=checkpoint)
    except TrainingDiverged as err:
        bar.close()
        print(f"error: {err}", file=sys.stderr)
        return 1
    bar.close()
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    plot_trial(result, out, title=f"test, {config.attention} / {config.loss}")
    print(summary(result, out))
    return 0


def summary(result, out: Path) -> str:
    c = result.config
    lines = [
        f"{c['backbone']} + {c['attention']}, loss {c['loss']}, on {c['dataset']} "
        f"({c['protocol']}, fold {c['fold']}), seed {c['seed']}",
        f"best epoch {result.best_epoch} of {len(result.history)} "
        f"(validation accuracy {result.val.get('accuracy', float('nan')):.4f})",
        f"test accuracy {result.test['accuracy']:.4f}   macro F1 {result.test['macro_f1']:.4f}"
        f"   ({len(result.test_labels)} images, TTA {c['tta']})",
        "test recall per class:",
    ]
    for name in result.classes:
        lines.append(f"  {name:>10s}  {result.test[f'recall_{name}']:.3f}")
    lines += [
        f"{result.images_per_second:.0f} training images/s, "
        f"{result.train_seconds:.0f} s of training",
        f"written to {out}: results.json, confusion_matrix.png, curves.png, checkpoint/",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
