"""What a pack of a trial config trains per second on a device, as the engine trains it:
``--pack auto`` (``orchestrate.plan.packing``) and ``bench/gpu.py`` measure with it."""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from fermodel import engine
from fermodel.graphs import GraphedStep
from fermodel.pack import PACK_NOTES, LoopedStep


class Throughput(NamedTuple):
    rate: float  # training images/s
    how: str  # "graphed" or "eager", with the notes of how it packed or why graphs were off
    packed: bool  # False when the pack failed its check and its members ran one after another


def pack_throughput(config, data, k: int, steps: int = 8, warmup: int = 3) -> Throughput:
    """Training images/s of a pack of ``k`` members of ``config`` (seeds 0 to k - 1) on the
    config's device, as the engine trains them (k = 1: a trial alone), and how the step ran.
    MemoryError when the pack does not fit."""
    device = engine.resolve_device(config.device)
    members = step = None
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not config.deterministic  # as training sets it
    try:
        members = [engine.make_member(config.replace(seed=s), data, device) for s in range(k)]
        step = engine.make_step(members, device)
        step.train()
        n, b = len(members[0].splits.train), config.batch_size
        idx = torch.stack([torch.randperm(n, device=device)[:b] for _ in range(k)])
        for _ in range(warmup):
            step(idx)
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            step(idx)
        _sync(device)
        rate = k * idx.shape[1] * steps / (time.perf_counter() - started)
        graphed = isinstance(step, GraphedStep)
        kinds = ("CUDA graphs off", *PACK_NOTES)
        refused = [n for n in members[0].notes if n.startswith(kinds)]
        looped = isinstance(step.step if graphed else step, LoopedStep)
        return Throughput(
            rate, "; ".join(["graphed" if graphed else "eager", *refused]), not looped
        )
    except torch.cuda.OutOfMemoryError as err:
        raise MemoryError(f"a pack of {k} does not fit: {str(err).splitlines()[0]}") from None
    finally:
        torch.backends.cudnn.benchmark = benchmark
        del members, step
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
