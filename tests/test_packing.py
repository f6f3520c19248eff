"""Which grid trials share a pack (orchestrate.plan.packing), and --pack on the command line."""

import pytest

from fermodel.config import TrialConfig
from fermodel.data import make_synthetic
from fermodel.engine import data_key
from orchestrate.ablation import main
from orchestrate.plan.ledger import Fate
from orchestrate.plan.packing import best_size, pack_fates
from search_spaces.study import TrialSpec, trial_identity


@pytest.fixture(scope="module")
def datasets():
    config = TrialConfig(synthetic_subjects=10, synthetic_images_per_class=2)
    return {data_key(config): make_synthetic(num_subjects=10, images_per_class=2, seed=0)}


def fate(cell: str, seed: int, epoch: int = 0, **changes) -> Fate:
    config = TrialConfig(synthetic_subjects=10, synthetic_images_per_class=2, seed=seed, **changes)
    spec = TrialSpec(cell, seed, 0, config, trial_identity("s", config))
    if epoch:
        return Fate(spec, "continue", "interrupted", f"/ckpt/{cell}{seed}", "run", epoch)
    return Fate(spec, "run", "new")


def names(packs) -> list[list[str]]:
    return [[f.spec.key for f in pack] for pack in packs]


def test_trials_that_differ_only_in_member_keys_share_packs_of_at_most_k(datasets):
    fates = [fate("ce", s, loss="ce") for s in range(3)]
    fates += [fate("island", s, loss="island", lr=3e-4) for s in range(3)]
    packs = pack_fates(fates, 4, datasets)
    assert names(packs) == [
        ["ce-seed0-fold0", "ce-seed1-fold0", "ce-seed2-fold0", "island-seed0-fold0"],
        ["island-seed1-fold0", "island-seed2-fold0"],
    ]
    assert names(pack_fates(fates, 1, datasets)) == [[f.spec.key] for f in fates]


def test_other_architectures_and_other_checkpoint_epochs_go_to_other_packs(datasets):
    fates = [
        fate("psa", 0),
        fate("eca", 0, attention="eca"),
        fate("psa", 1),
        fate("psa", 2, epoch=3),
        fate("psa", 3, epoch=3),
        fate("psa", 4, epoch=2),
    ]
    packs = pack_fates(fates, 8, datasets)
    assert names(packs) == [
        ["psa-seed0-fold0", "psa-seed1-fold0"],
        ["eca-seed0-fold0"],
        ["psa-seed2-fold0", "psa-seed3-fold0"],
        ["psa-seed4-fold0"],
    ]


def test_auto_takes_the_smallest_pack_within_five_percent_of_the_best():
    assert best_size({1: 1000.0, 2: 1900.0, 4: 3500.0, 8: 3600.0, 16: 3650.0}) == 4
    assert best_size({1: 1000.0, 2: 1900.0, 4: 3000.0, 8: 3600.0, 16: 3650.0}) == 8
    assert best_size({1: 1000.0, 2: 900.0}) == 1
    assert best_size({}) == 1


@pytest.mark.parametrize("value", ["0", "two", "1.5"])
def test_a_bad_pack_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, value):
    monkeypatch.chdir(tmp_path)
    assert main(["--study", "table4", "--pack", value, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --pack must be a whole number >= 1 or auto, got {value!r}\n"
    assert not list(tmp_path.iterdir())  # nothing made


def test_trials_sharing_a_gpu_are_bounded_to_their_share_of_its_memory():
    from orchestrate.run.trainable import memory_fraction

    assert memory_fraction(0.25) == 0.25 and memory_fraction(0.5) == 0.5
    assert memory_fraction(1.0) is None and memory_fraction(0.0) is None  # whole device, CPU


def test_auto_measures_packs_of_growing_size_until_they_stop_paying(ray_cluster, datasets):
    """The measurement --pack auto runs on a GPU node, here as a Ray task on the CPU."""
    from orchestrate.plan.packing import SIZES
    from orchestrate.run.trainable import measure_size

    config = TrialConfig(
        backbone="shufflenet_v2_x0_5",
        attention="none",
        batch_size=16,
        synthetic_subjects=10,
        synthetic_images_per_class=2,
        device="cpu",
    )
    k, measured = measure_size(config.to_dict(), next(iter(datasets.values())), 0, 4)
    assert set(measured) <= {s for s in SIZES if s <= 4} and 1 in measured
    assert k == best_size(measured) and all(v > 0 for v in measured.values())
