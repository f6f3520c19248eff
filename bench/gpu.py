"""Packed trials on one device: what they gain, measured in one run.

Prints, for PSA-ResNet-50 at 48x48, batch 32, Island loss (the paper's trial):

- the step's cost in ops, counted op by op (``fermodel.ops``, any device): host syncs in a
  training step (target 0), and non-view ops per trained image for one trial and for packs of
  K (target for K = 8: at most a quarter of one trial's);
- training images/s of the plain reference pipeline (bench/throughput.py's: PIL, per-sample
  transforms, a DataLoader, an eager NCHW model), of one trial as the engine trains it (eager,
  and on CUDA graphed), and of packs of K (graphed on CUDA), with each pack's memory per member;
- the best pack and the projected device-hours of Table 4 with 3 seeds at the paper's 200
  epochs on FER2013 (12 trials x 200 epochs x 28,709 training images) with it, against one
  trial per device.

On the CPU it runs small (``--small``: ShuffleNetV2 x0.5; its test asks for packs of 1, 2, 8)
so that the test runs in seconds. On a GPU (bench/device_check.sh runs it there) it takes about
a minute. On an H200 with torch 2.11 the bf16 packs ("auto") failed their check with torch's
batch norm (docs/benchmarks.md); a pack now retries with plain BatchNorms, and each line
prints the note of how its step ran. ``--precision fp32`` measures fp32 packs.

    .venv/bin/python bench/gpu.py [--device cuda] [--steps 20] [--packs 1,2,4,8,16,32]
                                  [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import argparse
import time

import torch

from fermodel import engine, pack
from fermodel.config import TrialConfig
from fermodel.data import make_synthetic
from fermodel.ops import OpCounter
from fermodel.pack import PACK_NOTES
from fermodel.speed import pack_throughput

TABLE4_IMAGES = 12 * 200 * 28_709  # 4 cells x 3 seeds, 200 epochs, FER2013's training split


def step_ops(config: TrialConfig, data, k: int) -> tuple[int, int, str]:
    """(non-view ops, host syncs, "" or the note of how the pack's step ran) of one training
    step of a pack of ``k`` (1: alone)."""
    device = engine.resolve_device(config.device)
    eager = config.replace(cuda_graphs=False)  # a graph's replay would hide the ops
    members = [engine.make_member(eager.replace(seed=s), data, device) for s in range(k)]
    step = engine.make_step(members, device)
    step.train()
    idx = torch.arange(config.batch_size, device=device).repeat(k, 1)
    step(idx)  # the optimiser's state exists from the second step on
    with OpCounter() as ops:
        step(idx)
    how = [n for n in members[0].notes if n.startswith(PACK_NOTES)]
    return ops.kernels, len(ops.host_syncs), "; ".join(how)


def reference_rate(config: TrialConfig, data, steps: int) -> float:
    """The plain pipeline of bench/throughput.py, at this config's batch size."""
    import throughput

    throughput.BATCH = config.batch_size
    device = engine.resolve_device(config.device)
    return throughput.reference(
        data.images, data.labels, device, steps, config.backbone, config.attention
    )


def measure(config: TrialConfig, data, k: int, steps: int) -> tuple[float, float, str]:
    """(images/s, peak GiB per member, how the step ran) of a pack of ``k``; memory on CUDA
    only (nan elsewhere)."""
    device = engine.resolve_device(config.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rate, how, _ = pack_throughput(config, data, k, steps=steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return rate, peak / k, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument(
        "--packs", default="1,2,4,8,16,32", help="pack sizes to measure, comma-separated"
    )
    parser.add_argument("--small", action="store_true", help="ShuffleNetV2 x0.5 (the CPU test)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="the trials' arithmetic (fermodel's precision key); default "
        "auto: bf16 on CUDA (vmap packs refused it on an H200)",
    )
    parser.add_argument(
        "--vmap",
        action="store_true",
        help="pack by torch.vmap where packs would be fused (fermodel.fused)",
    )
    args = parser.parse_args()
    pack.FUSION = not args.vmap
    packs = [int(k) for k in args.packs.split(",")]
    device = engine.resolve_device(args.device)
    model = dict(backbone="shufflenet_v2_x0_5", attention="none") if args.small else {}
    config = TrialConfig(
        **model,
        batch_size=32,
        loss="island",
        device=str(device),
        precision=args.precision,
        synthetic_subjects=20,
        synthetic_images_per_class=4,
    )
    data = make_synthetic(num_subjects=20, images_per_class=4)  # 560 images
    name = "ShuffleNetV2 x0.5" if args.small else "PSA-ResNet-50"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {device} ({gpu}), torch {torch.__version__}, {name}, 48x48x1, batch 32, "
        f"Island loss, precision {args.precision}, {args.steps} timed steps"
    )

    alone_ops, alone_syncs, _ = step_ops(config, data, 1)
    print(
        f"ops per step, alone     : {alone_ops:6d} non-view ({alone_ops / 32:6.1f} per image), "
        f"{alone_syncs} host syncs",
        flush=True,
    )
    for k in (k for k in packs if k in (4, 8, 16)):
        ops, syncs, how = step_ops(config, data, k)
        print(
            f"ops per step, pack of {k:2d}: {ops:6d} non-view ({ops / alone_ops:.2f}x one "
            f"trial's step, {ops / (32 * k):6.1f} per image), {syncs} host syncs; {how}",
            flush=True,
        )

    started = time.perf_counter()
    reference = reference_rate(config, data, args.steps)
    print(f"reference pipeline      : {reference:10,.0f} images/s")
    if device.type == "cuda":  # one trial without graphs, for what the graphs give
        rate, _, _ = measure(config.replace(cuda_graphs=False), data, 1, args.steps)
        print(
            f"one trial, eager        : {rate:10,.0f} images/s ({rate / reference:5.1f}x the "
            f"reference)"
        )
    rates = {}
    for k in packs:
        try:
            rate, gib, how = measure(config, data, k, args.steps)
        except MemoryError as err:
            print(f"pack of {k:2d}             : {err}")
            break
        rates[k] = rate
        label = "one trial (engine)" if k == 1 else f"pack of {k:2d}"
        memory = f", {gib:5.2f} GiB per member" if gib == gib else ""  # nan off CUDA
        # Table 4's estimate after every size: the run may be cut off before the last
        print(
            f"{label:24s}: {rate:10,.0f} images/s ({rate / reference:5.1f}x the "
            f"reference){memory}; Table 4: {TABLE4_IMAGES / rate / 3600:.2f} device-hours; "
            f"{how}",
            flush=True,
        )
    best = max(rates, key=rates.get)
    hours = {k: TABLE4_IMAGES / rates[k] / 3600 for k in (1, best)}
    print(
        f"best pack: {best} ({rates[best]:,.0f} images/s, {rates[best] / rates[1]:.1f}x one trial)"
    )
    print(
        f"Table 4 with this model, 3 seeds, 200 epochs on FER2013: {hours[best]:.2f} "
        f"device-hours packed by {best}, against {hours[1]:.2f} with one trial per "
        f"device"
    )
    print(f"(measured in {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
