"""The trial config: defaults, flat-dict round trip, and clear errors."""

import json

import pytest

from fermodel.config import ConfigError, TrialConfig


def test_defaults_are_the_papers():
    c = TrialConfig()
    assert (c.backbone, c.attention, c.loss) == ("resnet50", "psa", "island")
    assert (c.optimizer, c.lr, c.batch_size, c.epochs) == ("adam", 0.001, 32, 200)
    assert (c.schedule, c.plateau_factor, c.plateau_patience) == ("plateau", 0.1, 30)
    assert (c.lam, c.lam1, c.alpha) == (0.01, 10.0, 0.5)
    assert c.checkpoint_every == 0  # auto: checkpoint time near 5% of the trial's


@pytest.mark.parametrize("every", [0, 1, 7])
def test_checkpoint_every_is_auto_or_a_number_of_epochs(every):
    assert TrialConfig(checkpoint_every=every).checkpoint_every == every
    assert TrialConfig.from_dict({"checkpoint_every": str(every)}).checkpoint_every == every


def test_round_trip_through_a_flat_dict_of_plain_values():
    c = TrialConfig(attention="eca", loss="center", lam=0.003, augment=False, fold=3)
    flat = c.to_dict()
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    assert TrialConfig.from_dict(flat) == c
    # MLflow gives params back as strings
    assert TrialConfig.from_dict({k: str(v) for k, v in flat.items()}) == c
    assert TrialConfig.from_dict(json.loads(json.dumps(flat))) == c


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": 0.1}, "learning_rate: unknown config key"),
        ({"lr": "fast"}, "lr: expected float, got 'fast'"),
        ({"epochs": 2.5}, "epochs: expected int, got 2.5"),
        ({"augment": "yes"}, "augment: expected bool, got 'yes'"),
        ({"epochs": True}, "epochs: expected int, got True"),
        ({"attention": "sk"}, "attention: 'sk' is not one of none, se, cbam, eca, aff, psa"),
        ({"loss": "arcface"}, "loss: 'arcface' is not one of ce, center, island"),
        ({"dataset": "fer2013"}, "data_path: dataset 'fer2013' needs the path"),
        ({"lr": -1}, "lr: must be > 0, got -1"),
        ({"fold": 10}, r"fold: 10 is not below folds \(10\)"),
        ({"alpha": 2}, r"alpha: must be in \(0, 1\]"),
        ({"scale_min": 1.2}, "scale_min/scale_max"),
        ({"device": "tpu"}, "device: 'tpu' is not auto, cpu, cuda or cuda:N"),
        ({"tta": "fivecrop"}, "tta: 'fivecrop' is not one of none, flip, tencrop"),
        ({"image_size": 24}, "image_size: must be >= 32, got 24"),
        ({"checkpoint_every": -1}, "checkpoint_every: must be >= 0, got -1"),
        ({"checkpoint_every": 1.5}, "checkpoint_every: expected int, got 1.5"),
        ({"synthetic_difficulty": 0}, r"synthetic_difficulty: must be in \(0, 1\], got 0"),
        ({"hflip": 1.5}, r"hflip: must be in \[0, 1\], got 1.5"),
        ({"lam": float("nan")}, "lam: must be >= 0, got nan"),
        ({"in_chans": 2}, "in_chans: 2 is not one of 1, 3"),
        ({"backbone": "shufflenet"}, "backbone: 'shufflenet' is not one of resnet50, vgg16, "),
        ({"backbone": "timm:"}, "backbone: 'timm:' is not one of .* or timm:<model name>"),
        (
            {"backbone": "vgg16"},
            "attention: psa sits in ResNet-50's bottlenecks; backbone vgg16 takes attention none",
        ),
        ({"repetition": 1}, "repetition: 1 re-draws the kfold protocol's folds"),
    ],
)
def test_bad_configs_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        TrialConfig.from_dict(values)


def test_config_files_json_and_toml(tmp_path):
    (tmp_path / "a.json").write_text('{"attention": "cbam", "epochs": 5}')
    (tmp_path / "b.toml").write_text('attention = "aff"\nlr = 3e-4\n')
    assert TrialConfig.from_file(tmp_path / "a.json") == TrialConfig(attention="cbam", epochs=5)
    assert TrialConfig.from_file(tmp_path / "b.toml") == TrialConfig(attention="aff", lr=3e-4)
    (tmp_path / "c.json").write_text('{"epochs": "many"}')
    with pytest.raises(ConfigError, match="c.json: epochs: expected int"):
        TrialConfig.from_file(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(ConfigError, match="d.json: not valid json"):
        TrialConfig.from_file(tmp_path / "d.json")
    with pytest.raises(ConfigError, match="missing.json: cannot read config"):
        TrialConfig.from_file(tmp_path / "missing.json")


def test_the_backbone_names_are_the_models_and_each_builds():
    from fermodel.backbones import TIMM_PREFIX
    from fermodel.config import BACKBONE_NAMES, TIMM
    from fermodel.models import BACKBONES

    assert set(BACKBONE_NAMES) == set(BACKBONES) and TIMM == TIMM_PREFIX
    for name in BACKBONE_NAMES:  # a name the config accepts is one the models know
        assert TrialConfig(backbone=name, attention="none").backbone == name
