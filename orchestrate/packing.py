"""Which grid trials train together as one pack (``fermodel.pack``), and how large a pack is.

A pack holds trials of one ``fermodel.engine.pack_group``: they share everything but their
member keys (seeds, learning rates, losses, folds may differ), continue from the same epoch (or
all start fresh) and train on splits of one size (folds of a protocol may differ by a few
images). They are taken in the plan's order, at most ``k`` to a pack.

``--pack auto`` (the command's default): on GPUs the size is measured at the start of the
study, on a GPU node, for the study's first trial config (``fermodel.speed.pack_throughput``:
packs of 1, 2, 4, ... trained for a few steps): the smallest pack within 5% of the best
throughput among those that fit in the trial's share of the device. Without GPUs it is 1: on
a CPU the members' convolutions are slower grouped (bench/gpu.py on this project's 2-core
machine: 64 images/s for a pack of 4 of PSA-ResNet-50 against 84 for one trial).
"""

from __future__ import annotations

SIZES = (1, 2, 4, 8, 16, 32)  # the pack sizes --pack auto measures
WITHIN = 0.05  # the smallest pack within this share of the best throughput is taken


def pack_fates(fates: list, k: int, datasets: dict) -> list[list]:
    """The fates to run, in plan order, grouped into packs of at most ``k``."""
    if k <= 1:
        return [[f] for f in fates]
    from fermodel.engine import data_key, pack_group

    groups: dict[tuple, list] = {}
    for fate in fates:
        config = fate.spec.config
        key = pack_group(config, datasets[data_key(config)], fate.epoch if fate.checkpoint else 0)
        groups.setdefault(key, []).append(fate)
    packs = []
    for members in groups.values():
        packs += [members[i : i + k] for i in range(0, len(members), k)]
    order = {id(f): n for n, f in enumerate(fates)}
    return sorted(packs, key=lambda pack: order[id(pack[0])])


def best_size(throughputs: dict[int, float]) -> int:
    """The smallest pack within ``WITHIN`` of the best measured images/s (packs that did not
    fit are absent)."""
    if not throughputs:
        return 1
    best = max(throughputs.values())
    return min(k for k, v in throughputs.items() if v >= (1 - WITHIN) * best)


def measure_size(config_values: dict, data, gpus: float, limit: int) -> tuple[int, dict]:
    """On a GPU node (a Ray task asking for the trials' GPUs): images/s of packs of the
    ``SIZES`` up to ``limit`` members, stopping at the first that does not fit, fails its
    check on the device (``fermodel.pack.checked_pack``) or gains less than ``WITHIN``;
    returns the size to use and what was measured."""
    import ray

    @ray.remote(num_gpus=gpus, num_cpus=1)
    def measure(values: dict, dataset) -> dict:
        from fermodel.config import TrialConfig
        from fermodel.speed import pack_throughput
        from orchestrate.trainable import prepare_worker

        prepare_worker(1, gpus)  # held to the trials' share of the device: a pack must fit it
        config = TrialConfig.from_dict(values)
        measured: dict[int, float] = {}
        for k in (s for s in SIZES if s <= max(limit, 1)):
            try:
                rate, _, packed = pack_throughput(config, dataset, k)
            except MemoryError:
                break
            if not packed:  # failed its check on this device: larger packs would too
                break
            measured[k] = rate
            previous = [v for size, v in measured.items() if size < k]
            if previous and measured[k] < (1 + WITHIN) * max(previous):
                break
        return measured

    measured = ray.get(measure.remote(config_values, data))
    return best_size(measured), measured
