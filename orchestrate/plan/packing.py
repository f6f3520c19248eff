"""Packs on the driver's side: which grid trials train together as one pack (``fermodel.pack``),
how large a pack is, and how a Tune trial's config and results name its members (the
trainable, ``orchestrate.run.trainable.run_pack``, reports each member under its index).

A pack holds trials of one ``fermodel.engine.pack_group``: they share everything but their
member keys (seeds, learning rates, losses, folds may differ), continue from the same epoch (or
all start fresh) and train on splits of one size (folds of a protocol may differ by a few
images). They are taken in the plan's order, at most ``k`` to a pack.

``--pack auto`` (the command's default): on GPUs the size is measured at the start of the
study, on a GPU node, for the study's first trial config (``orchestrate.run.trainable.measure_size``
with ``fermodel.speed.pack_throughput``:
packs of 1, 2, 4, ... trained for a few steps): the smallest pack within 5% of the best
throughput among those that fit in the trial's share of the device. Without GPUs it is 1: on
a CPU the members' convolutions are slower grouped (docs/benchmarks.md).
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


def member_specs(params: dict) -> list[dict]:
    """The grid trials a Tune trial trains as one pack (none for a tuning sample)."""
    return list(params.get("members") or [])


def members_of(config: dict) -> list:
    """The members of a Tune trial: a grid pack's indices, or [None] for a tuning sample."""
    specs = member_specs(config)
    return list(range(len(specs))) if specs else [None]


def member_results(result: dict) -> list[tuple]:
    """(member, its values) in a Tune result: a pack's by index, or the whole for a sample."""
    if "members" in result:
        return [(int(k), v) for k, v in result["members"].items()]
    return [(None, result)]
