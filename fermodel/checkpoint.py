"""Checkpoints: one file of tensors and plain values, written atomically, read safely.

Everything a run needs to continue exactly sits in one ``state.pt``: model, optimiser, lr
scheduler, loss centers, epoch, best-so-far metrics, history, the RNG states, and the best
model. No weights are stored twice: when the best epoch is the checkpoint's own epoch,
``best_model`` is the marker ``SAME_AS_MODEL`` and the reader takes ``model`` for it;
otherwise it is the best epoch's weights alone (a state dict of tensors, no optimiser state).
It is written to a temporary file beside the target and renamed, so a crash never leaves a
half-written checkpoint, and read with ``weights_only=True``, so loading cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from fermodel.files import write_atomically

STATE_FILE = "state.pt"
SAME_AS_MODEL = "model"  # ``best_model`` when the best epoch is the checkpointed one


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or refused."""


def save_checkpoint(directory, state: dict) -> Path:
    return write_atomically(Path(directory) / STATE_FILE, lambda f: torch.save(state, f))


def load_checkpoint(path) -> dict:
    """Read a checkpoint from its folder or its ``state.pt``."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{file}: no checkpoint there")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{file}: refused, it would need unpickling of arbitrary objects "
            f"({str(err).splitlines()[-1][:200]})"
        ) from None
    except Exception as err:
        raise CheckpointError(f"{file}: unreadable checkpoint ({err})") from None
    if not isinstance(state, dict) or "config" not in state or "epoch" not in state:
        raise CheckpointError(f"{file}: not a checkpoint of this project")
    return state


def best_model(state: dict) -> dict | None:
    """The best model's weights of a loaded checkpoint (``model`` itself when they are it)."""
    best = state.get("best_model")
    return state["model"] if isinstance(best, str) and best == SAME_AS_MODEL else best
