"""python -m fermodel.predict on a real run folder of python -m fermodel.train and on a real MLflow
model (logged by the study's own code into a SQLite store), with images the synthetic generator
drew, written as PNGs and as FER2013 CSVs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fermodel.checkpoint import best_model, load_checkpoint
from fermodel.config import TrialConfig
from fermodel.data import make_synthetic
from fermodel.data.fakes import write_fer2013_csv
from fermodel.predict import main, selected_model

TRAIN = [
    "--epochs",
    "1",
    "--backbone",
    "shufflenet_v2_x0_5",
    "--attention",
    "none",
    "--synthetic-subjects",
    "5",
    "--synthetic-images-per-class",
    "1",
    "--batch-size",
    "16",
    "--quiet",
]


@pytest.fixture(autouse=True)
def _own_store(monkeypatch):
    """--tracking-uri sets the process's MLFLOW_TRACKING_URI (MLflow's model API reads the
    process's store only): unset during each test and put back after it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # records what to put back
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A finished one-epoch run folder, and its test images as PNG files and CSVs."""
    from fermodel.train import main as train

    root = tmp_path_factory.mktemp("predict")
    assert train([*TRAIN, "--out", str(root / "run")]) == 0
    results = json.loads((root / "run" / "results.json").read_text())
    data = make_synthetic(num_subjects=5, images_per_class=1, seed=0)
    test = data.subset(data.split == "test")
    assert [str(i) for i in test.ids] == results["test_ids"]  # the run's own test images
    faces = root / "faces"
    faces.mkdir()
    for i, image in enumerate(test.images[:, 0].numpy()):
        Image.fromarray(image).save(faces / f"{i:02d}.png")
    write_fer2013_csv(data, root / "fer2013.csv")
    write_fer2013_csv(data, root / "kaggle" / "train.csv", form="kaggle")  # + unlabeled test.csv
    return root, results, test


def predicted(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.xdist_group("predict-run")
def test_a_run_folder_predicts_its_test_images_as_the_run_tested_them(run, capsys):
    root, results, test = run
    out = predicted(capsys, [str(root / "run"), str(root / "faces"), "--json"])
    assert [p["image"] for p in out] == [
        str(root / "faces" / f"{i:02d}.png") for i in range(len(test))
    ]
    classes = results["classes"]
    for p in out:
        assert set(p["probabilities"]) == set(classes)
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert p["expression"] == max(p["probabilities"], key=p["probabilities"].get)
    # the run's own test predictions (its selected epoch), wherever they are no near-tie: the
    # engine tested in channels-last memory, which may tip a tie the other way
    config = TrialConfig.from_file(root / "run" / "config.json")
    net = selected_model(
        config, len(classes), best_model(load_checkpoint(root / "run" / "checkpoint"))
    )
    with torch.inference_mode():
        top2 = net(test.images.float() / 255).topk(2, dim=1).values
    gaps = (top2[:, 0] - top2[:, 1]).tolist()
    for p, trial, gap in zip(out, results["test_predictions"], gaps, strict=True):
        if gap > 1e-3:
            assert p["expression"] == classes[trial]


@pytest.mark.slow
@pytest.mark.xdist_group("predict-run")
def test_csv_files_predict_as_the_images_do_and_the_table_is_aligned(run, capsys):
    root, results, test = run
    pngs = predicted(capsys, [str(root / "run"), str(root / "faces"), "--json"])
    rows = predicted(capsys, [str(root / "run"), str(root / "fer2013.csv"), "--json"])
    data = make_synthetic(num_subjects=5, images_per_class=1, seed=0)
    on_test = [r for r, split in zip(rows, data.split, strict=True) if split == "test"]
    assert [r["expression"] for r in on_test] == [p["expression"] for p in pngs]
    assert rows[0]["image"] == f"{root / 'fer2013.csv'}:line 2"
    # Kaggle's unlabeled test.csv: a pixels column alone (here the val and test images)
    unlabeled = predicted(capsys, [str(root / "run"), str(root / "kaggle" / "test.csv"), "--json"])
    held_out = [r for r, split in zip(rows, data.split, strict=True) if split != "train"]
    assert [r["expression"] for r in unlabeled] == [r["expression"] for r in held_out]
    assert main([str(root / "run"), str(root / "faces" / "00.png"), str(root / "faces")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "expression", *results["classes"]]
    assert len(lines) == 2 + len(test)
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert lines[1].split()[0].endswith("00.png") and lines[1].split()[1] in results["classes"]


@pytest.mark.slow
@pytest.mark.xdist_group("predict-run")
def test_an_mlflow_model_predicts_as_the_run_folder(run, capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrate.store.tracking import log_model

    root, results, _ = run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("p", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    config = TrialConfig.from_file(root / "run" / "config.json")
    weights = best_model(load_checkpoint(root / "run" / "checkpoint"))
    info = log_model(uri, run_id, config, results["classes"], weights, step=1)
    client.create_registered_model("p")
    model = client.get_logged_model(info.model_id)
    client.create_model_version("p", model.artifact_location, run_id, model_id=info.model_id)
    client.set_registered_model_alias("p", "best", "1")
    folder = predicted(capsys, [str(root / "run"), str(root / "faces"), "--json"])
    for model in ("models:/p@best", f"runs:/{run_id}/model"):
        logged = predicted(capsys, [model, str(root / "faces"), "--json", "--tracking-uri", uri])
        for a, b in zip(logged, folder, strict=True):
            assert a["image"] == b["image"]
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    err = _error(capsys, ["models:/p@nope", str(root / "faces"), "--tracking-uri", uri])
    assert err.startswith("error: models:/p@nope: ")


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


def test_bad_models_and_images_are_one_line_errors(tmp_path, capsys):
    face = tmp_path / "face.png"
    Image.fromarray(np.zeros((60, 50), dtype=np.uint8)).save(face)  # not 48x48: resized
    assert "no such run folder" in _error(capsys, [str(tmp_path / "nothing"), str(face)])
    assert str(tmp_path / "nothing") in _error(capsys, [str(tmp_path / "nothing"), str(face)])
    assert "no config.json" in _error(capsys, [str(tmp_path), str(face)])
    err = _error(
        capsys,
        ["models:/absent@best", str(face), "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"],
    )
    assert "models:/absent@best: no MLflow store at" in err
    assert not (tmp_path / "none.db").exists()  # no store is made by looking
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert f"{broken}: unreadable image" in _error(capsys, [str(tmp_path), str(broken)])
    assert "no such file or folder" in _error(capsys, [str(tmp_path), str(tmp_path / "x.jpg")])
    csv = tmp_path / "bad.csv"
    csv.write_text("emotion,pixels\n3," + " ".join(["7"] * 2304) + "\n3,1 2 3\n")
    err = _error(capsys, [str(tmp_path), str(csv)])
    assert f"{csv}, line 3: 3 pixel values, expected 2304" in err
    csv.write_text("emotion,image\n3,1\n")
    assert "no pixels column" in _error(capsys, [str(tmp_path), str(csv)])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: no images" in _error(capsys, [str(tmp_path), str(empty)])
