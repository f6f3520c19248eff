"""What a trained model costs to run, measured on the device it trained on (``model_cost``).

- ``params``: its parameters (BatchNorm's running statistics are buffers, not counted).
- ``gflops``: floating-point operations of one forward pass on one image, in GFLOP, counted by
  torch's ``FlopCounterMode``: a multiply-add is 2 FLOPs, and a grouped convolution is counted
  with its grouped weight, so its groups divide its count (a depthwise convolution counts as
  one). Operations torch does not count (activations, pooling, elementwise gates) are left
  out, as in the papers' figures.
- ``latency_ms``: milliseconds per image at batch 1; ``throughput``: images per second at batch
  64. The model in eval mode under ``torch.inference_mode``, as ``predict`` runs it (the input
  normalisation included), eager: each the median of repeated timed runs after untimed warm-up
  runs (``WARMUP`` and at least ``MIN_RUNS`` timed ones at batch 1; one and three at batch 64,
  each as long as 64 single images), synchronised on a GPU, on the CPU with the process's torch
  threads (``latency_threads``).
- ``peak_memory_mb`` (training, ``peak_memory_mb``): on CUDA the peak torch allocated while the
  trial (or its pack, shared by its members) trained; on the CPU the process's peak resident
  set, an upper bound in a worker that trained other trials before.

A model's figures depend on its architecture, input and device, not on its weights: they are
measured once per process for each (``cost_key``) and reused, so a grid's seeds cost one
measurement.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time

import torch
from torch import nn

WARMUP = 2
MIN_RUNS = 5
BUDGET_S = 0.25  # timed runs stop after this long (and at least MIN_RUNS)
BATCH = 64
_MEASURED: dict[tuple, dict] = {}


def model_cost(
    net: nn.Module,
    shape: tuple[int, int, int],
    device,
    key: tuple | None = None,
    context=contextlib.nullcontext,
) -> dict:
    """The figures above for ``net`` on images of ``shape`` (channels, height, width), each run
    inside ``context()`` (the trial's autocast); with a ``key``, measured once per process."""
    if key is not None and key in _MEASURED:
        return dict(_MEASURED[key])
    was_training = net.training
    net.eval()
    try:
        one = torch.zeros(1, *shape, device=device)
        batch = torch.zeros(BATCH, *shape, device=device)
        with torch.inference_mode(), context():
            runs = timed_runs(lambda: net(one), device)
            # a batch takes BATCH times longer: fewer runs give as steady a median
            per_batch = statistics.median(
                timed_runs(lambda: net(batch), device, warmup=1, min_runs=3, budget=0.0)
            )
            gflops = forward_flops(net, one) / 1e9
    finally:
        net.train(was_training)
    cost = {
        "params": _params(net),
        "gflops": gflops,
        "latency_ms": 1000 * statistics.median(runs),
        "throughput": BATCH / per_batch,
        "latency_threads": torch.get_num_threads(),
    }
    if key is not None:
        _MEASURED[key] = dict(cost)
    return cost


def _params(net: nn.Module) -> int:
    """The parameters as the state dict holds them: the architecture's count, PSA's kernels
    whole however they were cropped for the input size (``PSA.crop_to``)."""
    state = net.state_dict()
    return sum(state[name].numel() for name, _ in net.named_parameters())


def timed_runs(
    run, device, warmup: int = WARMUP, min_runs: int = MIN_RUNS, budget: float = BUDGET_S
) -> list[float]:
    """Seconds of each timed call of ``run`` after ``warmup`` untimed ones: at least
    ``min_runs``, more while ``budget`` seconds have not passed."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        run()
    if cuda:
        torch.cuda.synchronize(device)
    times, started = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < budget:
        t = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
        if len(times) >= 1000:
            break
    return times


def forward_flops(net: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        net(x)
    return counter.get_total_flops()


def start_peak_memory(device) -> None:
    """Count the peak from now (CUDA; the CPU's resident peak cannot be reset)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device, members: int = 1) -> float:
    """The training peak since ``start_peak_memory``: a pack's members share it equally."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 / members
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
