"""``python -m fermodel.train``: outputs, one-line errors with exit code 2, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fermodel.train import main

TINY = [
    "--synthetic-subjects",
    "5",
    "--synthetic-images-per-class",
    "2",
    "--batch-size",
    "16",
    "--attention",
    "eca",
    "--quiet",
]


def test_a_run_writes_metrics_figures_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["history"]) == 2 and 0 <= results["test"]["accuracy"] <= 1
    assert json.loads((out / "config.json").read_text())["attention"] == "eca"
    for png in ("confusion_matrix.png", "curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoint" / "state.pt").is_file()
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "best epoch" in printed


def test_a_config_file_with_flags_on_top(tmp_path):
    (tmp_path / "trial.toml").write_text('attention = "se"\nepochs = 1\nloss = "center"\n')
    out = tmp_path / "run"
    assert (
        main(
            [
                *TINY,
                "--config",
                str(tmp_path / "trial.toml"),
                "--loss",
                "ce",
                "--out",
                str(out),
                "--pretrained",
                "none",
            ]
        )  # as the study CLI's none: random initialisation
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert (config["attention"], config["loss"], config["epochs"]) == ("eca", "ce", 1)
    assert config["pretrained"] == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "fast"], "error: lr: expected float, got 'fast'"),
        (["--attention", "sk"], "error: attention: 'sk' is not one of"),
        (["--bogus"], "error: unrecognized arguments: --bogus"),
        (
            ["--dataset", "fer2013", "--data", "/no/such/place"],
            "error: /no/such/place: no such file",
        ),
        (["--dataset", "ckplus"], "error: data_path: dataset 'ckplus' needs the path"),
        (["--pretrained", "/no/such/weights.pth"], "error: pretrained file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fermodel.train", *argv, "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_inputs_found_bad_after_parsing_leave_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.pth").write_bytes(b"not a torch file")
    assert main([*TINY, "--epochs", "1", "--pretrained", str(tmp_path / "weights.pth")]) == 2
    assert "weights.pth: not a file saved by torch.save" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "results.json").write_text("{}")
    assert main([*TINY, "--out", str(tmp_path / "used")]) == 2
    assert "used: already exists and is not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fermodel.train", *TINY, "--epochs", "4", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoint" / "state.pt"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (out / "results.json").exists()
    assert main(["--resume", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3, 4]
    assert main(["--resume", str(out), "--lr", "0.1"]) == 2
