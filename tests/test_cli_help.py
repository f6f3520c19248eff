"""Both command lines explain every flag (meaning, allowed values, default), and the flags that
set trial config keys take that text from one place: the config's field metadata."""

import argparse
from dataclasses import fields

import pytest

from fermodel.config import FIELDS, ConfigError, TrialConfig, allowed_values
from fermodel.train import build_parser as train_parser
from orchestrate.ablation import build_parser as ablation_parser

# orchestrate's flags that set a config key
ABLATION_KEYS = {
    "--dataset": "dataset",
    "--data": "data_path",
    "--epochs": "epochs",
    "--protocol": "protocol",
    "--pretrained": "pretrained",
}


def flags(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("parser", [train_parser, ablation_parser])
def test_every_flag_has_meaning_allowed_values_and_default(parser):
    for action in flags(parser()):
        text = action.help or ""
        assert "Default:" in text, action.option_strings
        takes_value = action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if takes_value and action.option_strings[0] not in ("--config", "--out", "--resume"):
            assert "Allowed:" in text, action.option_strings
        meaning = text.split(". Allowed:")[0].split(". Default:")[0]
        assert len(meaning) > 12, action.option_strings  # a meaning, not just a name


def test_train_flags_are_the_config_keys_with_their_metadata():
    by_dest = {a.dest: a for a in flags(train_parser())}
    for f in fields(TrialConfig):
        action = by_dest[f.name]
        assert action.help.replace("%%", "%").startswith(f.metadata["help"])
        assert allowed_values(f) in action.help.replace("%%", "%")
        if f.metadata["choices"]:  # the metavar lists what validation accepts
            assert action.metavar.split("|") == [str(c) for c in f.metadata["choices"]]


def test_ablation_flags_for_config_keys_reuse_the_metadata():
    by_flag = {a.option_strings[0]: a for a in flags(ablation_parser())}
    for flag, name in ABLATION_KEYS.items():
        assert by_flag[flag].help.startswith(FIELDS[name].metadata["help"]), flag


@pytest.mark.parametrize("name", [f.name for f in fields(TrialConfig) if f.metadata["choices"]])
def test_the_help_lists_exactly_what_validation_accepts(name):
    f = FIELDS[name]
    needs_path = {"data_path": "/data/copy"}
    for choice in f.metadata["choices"]:
        TrialConfig.from_dict({name: choice, **(needs_path if name == "dataset" else {})})
    wrong = 2 if f.type in (int, "int") else "nonsense"
    with pytest.raises(ConfigError, match=f"{name}: {wrong!r} is not one of"):
        TrialConfig.from_dict({name: wrong})


@pytest.mark.parametrize("main_module", ["fermodel.train", "orchestrate.ablation"])
def test_help_prints(main_module, capsys):
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(main_module).main(["--help"])
    assert done.value.code == 0
    assert "Default:" in capsys.readouterr().out


def test_the_study_commands_help_lists_its_exit_codes():
    """What a job system reads: every code the command returns, with its meaning."""
    from orchestrate.ablation import TRIALS_FAILED

    text = ablation_parser().format_help()
    codes = text.split("exit codes:")[1]
    for code in ("0", "2", str(TRIALS_FAILED), "130", "143"):
        assert f"  {code} " in codes or f"; {code} " in codes, code
    assert "failed by an error after its" in codes and "diverged" in codes
