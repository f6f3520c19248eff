"""Checkpoints: one file of tensors and plain values, written atomically, read safely.

Everything a run needs to continue exactly sits in one ``state.pt``: model, optimiser, lr
scheduler, loss centers, epoch, best-so-far metrics, history, the RNG states, and the best
model. No weights are stored twice: when the best epoch is the checkpoint's own epoch,
``best_model`` is the marker ``SAME_AS_MODEL`` and the reader takes ``model`` for it;
otherwise it is the best epoch's weights alone (a state dict of tensors, no optimiser state).
It is written to a temporary file beside the target and renamed, so a crash never leaves a
half-written checkpoint, and read with ``weights_only=True``, so loading cannot run code. It
carries a checksum of its contents (``CHECKSUM``: every tensor's bytes, every value), checked on
reading: damage that still unpickles (a flipped bit in the weights, which torch's own reader
does not notice) is refused like a truncated file. Checkpoints written before it are read
unchecked.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

from fermodel.files import write_atomically

STATE_FILE = "state.pt"
SAME_AS_MODEL = "model"  # ``best_model`` when the best epoch is the checkpointed one
CHECKSUM = "checksum"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or refused."""


def save_checkpoint(directory, state: dict) -> Path:
    # on the host once: the checksum reads the bytes that torch.save then writes (a GPU
    # trial's tensors would otherwise be copied off the device twice)
    state = _on_host(state)
    state[CHECKSUM] = content_digest(state)
    return write_atomically(Path(directory) / STATE_FILE, lambda f: torch.save(state, f))


def _on_host(value):
    """``value`` with every tensor on the CPU (a CPU tensor is kept as it is)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_host(v) for v in value)
    return value


def content_digest(value) -> str:
    """A SHA-256 of a checkpoint's contents as loaded: keys, values and each tensor's dtype,
    shape and bytes, in order (a checkpoint's dicts keep their order through a save)."""
    digest = hashlib.sha256()

    def walk(v) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().contiguous()  # on the host (saved and loaded states are)
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(v, dict):
            digest.update(f"D{len(v)}".encode())
            for key, item in v.items():
                digest.update(repr(key).encode())
                walk(item)
        elif isinstance(v, (list, tuple)):
            digest.update(f"L{len(v)}".encode())
            for item in v:
                walk(item)
        else:
            digest.update(repr(v).encode())

    walk(value)
    return digest.hexdigest()


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
    written = state.pop(CHECKSUM, None)
    if written is not None and written != content_digest(state):
        raise CheckpointError(
            f"{file}: damaged checkpoint (its contents do not match the checksum written with them)"
        )
    return state


def best_model(state: dict) -> dict | None:
    """The best model's weights of a loaded checkpoint (``model`` itself when they are it)."""
    best = state.get("best_model")
    return state["model"] if isinstance(best, str) and best == SAME_AS_MODEL else best
