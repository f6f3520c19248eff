"""FER2013 and FER+ readers against files written in the real formats."""

import os

import numpy as np
import pytest
import torch

from fermodel.data import DatasetError, load_dataset, make_splits, make_synthetic
from fermodel.data.fakes import write_fer2013_csv, write_fer2013_folders, write_ferplus_csv
from fermodel.data.fer2013 import (
    FERPLUS_CLASSES,
    ferplus_majority,
    read_fer2013,
)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_subjects=9, images_per_class=2, seed=1)


def same(a, b):
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert (a.split == b.split).all() and a.classes == b.classes


@pytest.mark.parametrize(
    ("form", "name"), [("fer2013", "fer2013.csv"), ("icml", "icml_face_data.csv")]
)
def test_csv_forms_read_back_exactly(tmp_path, data, form, name):
    write_fer2013_csv(data, tmp_path / name, form)
    if form == "icml":
        assert (tmp_path / name).read_text().startswith("emotion, Usage, pixels")
    back = load_dataset("fer2013", tmp_path)  # the folder: the file is found inside
    same(back, data)
    assert back.ids[0] == f"{name}:line 2"


def test_kaggle_train_csv_reads_the_labeled_training_rows(tmp_path, data):
    write_fer2013_csv(data, tmp_path / "train.csv", "kaggle")
    assert (tmp_path / "test.csv").read_text().startswith("pixels\n")
    back = read_fer2013(tmp_path)
    same(back, data.subset(data.split == "train"))


@pytest.mark.parametrize("prefixes", [True, False])
def test_image_folders_read_back(tmp_path, data, prefixes):
    write_fer2013_folders(data, tmp_path / "fer", prefixes=prefixes)
    back = read_fer2013(tmp_path / "fer")
    key = lambda d: sorted(zip(d.labels.tolist(), d.images.flatten(1).sum(1).tolist(), strict=True))  # noqa: E731
    assert key(back) == key(data)
    expected = data.split if prefixes else np.where(data.split == "train", "train", "test")
    assert sorted(back.split) == sorted(expected)


def test_a_csv_one_level_down_is_found(tmp_path, data):
    write_fer2013_csv(data, tmp_path / "fer2013" / "fer2013.csv")
    same(read_fer2013(tmp_path), data)


def test_the_cache_is_used_and_invalidated_when_the_source_changes(tmp_path, data):
    csv = write_fer2013_csv(data, tmp_path / "fer2013.csv")
    cache = tmp_path / "cache"
    same(read_fer2013(csv, cache_dir=cache), data)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    same(read_fer2013(csv, cache_dir=cache), data)  # a hit: no second file
    assert list(cache.iterdir()) == files
    changed = data.subset(np.arange(len(data) - 7))
    write_fer2013_csv(changed, csv)
    os.utime(csv, ns=(1, 10**18))  # a new mtime even on coarse clocks
    same(read_fer2013(csv, cache_dir=cache), changed)
    assert len(list(cache.iterdir())) == 2


def test_a_failed_parse_leaves_no_cache_file(tmp_path):
    csv = tmp_path / "fer2013.csv"
    csv.write_text("emotion,pixels,Usage\n0,1 2 3,Training\n")
    with pytest.raises(DatasetError):
        read_fer2013(csv, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


# FER+ columns: neutral happiness surprise sadness anger disgust fear contempt unknown NF
VOTES = np.array(
    [
        [0, 10, 0, 0, 0, 0, 0, 0, 0, 0],  # clear happiness
        [4, 1, 1, 4, 0, 0, 0, 0, 0, 0],  # single votes dropped: 4 vs 4 of 8, no majority
        [6, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # single votes dropped: 6 of 6 -> neutral
        [5, 0, 0, 0, 0, 0, 0, 5, 0, 0],  # 5 of 10 is not more than half -> unknown
        [2, 0, 0, 0, 0, 0, 0, 6, 2, 0],  # contempt 6 of 10
        [0, 0, 0, 0, 0, 0, 0, 0, 3, 7],  # NF holds the majority -> dropped
        [0, 0, 0, 0, 7, 3, 0, 0, 0, 0],  # anger 7 of 10
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # no votes
    ]
)


EXPECTED = [1, -1, 0, -1, 7, -1, 4, -1]  # worked by hand from the rule


def test_ferplus_majority_rule_on_a_hand_written_table():
    assert ferplus_majority(VOTES.astype(float)).tolist() == EXPECTED
    assert FERPLUS_CLASSES[7] == "contempt" and FERPLUS_CLASSES[4] == "anger"


UNKNOWN = [5, 0, 0, 0, 0, 0, 0, 5, 0, 0]  # 5 of 10: no majority
NONFACE = [0, 0, 0, 0, 0, 0, 0, 0, 2, 8]  # NF holds the majority


@pytest.fixture
def with_ferplus(tmp_path):
    """35 rows: training rows vote clearly for FER+ class k % 8, the hand table sits on val/test
    rows, and one val/test row is a non-face (empty image name). Every split has flagged rows:
    two training rows (a non-face by its empty image name, an unknown), and in val and in test
    a non-face (one by name, one by NF votes) and an unknown."""
    base = make_synthetic(num_subjects=5, images_per_class=1, seed=2)
    train, other = np.flatnonzero(base.split == "train"), np.flatnonzero(base.split != "train")
    votes = np.zeros((len(base), 10), dtype=int)
    expected = np.full(len(base), -1)
    for k, row in enumerate(train):
        votes[row, k % 8], expected[row] = 10, k % 8
    votes[other[:8]], expected[other[:8]] = VOTES, EXPECTED
    votes[other[8:], 0], expected[other[8:]] = 10, 0
    nonface = np.zeros(len(base), dtype=bool)
    nonface[other[0]], expected[other[0]] = True, -1
    val, test = np.flatnonzero(base.split == "val"), np.flatnonzero(base.split == "test")
    nonface[[train[0], val[-1]]] = True
    votes[[train[1], val[-2], test[-2]]] = UNKNOWN
    votes[test[-1]] = NONFACE
    expected[[train[0], train[1], val[-1], val[-2], test[-1], test[-2]]] = -1
    write_fer2013_csv(base, tmp_path / "fer2013.csv")
    usage = [
        "Training" if s == "train" else "PublicTest" if s == "val" else "PrivateTest"
        for s in base.split
    ]
    write_ferplus_csv(tmp_path / "fer2013new.csv", usage, votes, nonface)
    return tmp_path, base, expected


def test_ferplus_eight_classes_relabel_and_drop(with_ferplus):
    path, base, expected = with_ferplus
    got = read_fer2013(path, labels="ferplus")
    assert got.classes == FERPLUS_CLASSES
    assert got.labels.tolist() == expected[expected >= 0].tolist()
    assert torch.equal(got.images, base.images[torch.from_numpy(expected >= 0)])
    assert (got.split == base.split[expected >= 0]).all()


def test_ferplus_mapped_to_seven_classes_drops_contempt(with_ferplus):
    path, base, expected = with_ferplus
    got = read_fer2013(path, labels="ferplus7")
    keep = (expected >= 0) & (expected != 7)
    to_fer2013 = [6, 3, 5, 4, 0, 1, 2]  # neutral happiness surprise sadness anger disgust fear
    assert got.classes == base.classes
    assert got.labels.tolist() == [to_fer2013[e] for e in expected[keep]]
    assert torch.equal(got.images, base.images[torch.from_numpy(keep)])


def test_paper_cleaning_drops_flagged_training_rows_and_keeps_every_val_and_test_image(
    with_ferplus,
):
    path, base, expected = with_ferplus
    train = base.split == "train"
    flagged = expected < 0
    assert flagged[train].sum() == 2
    assert flagged[base.split == "val"].sum() >= 2 and flagged[base.split == "test"].sum() >= 2
    got = read_fer2013(path, clean=True)
    # FER2013's labels, the two flagged training rows gone, val and test untouched
    same(got, base.subset(~(flagged & train)))
    assert (got.split == "train").sum() == train.sum() - 2
    for part in ("val", "test"):
        rows = np.flatnonzero(base.split == part)
        assert got.ids[got.split == part].tolist() == [f"fer2013.csv:line {r + 2}" for r in rows]
    assert any(
        "dropped 2 non-face/unknown training images; val and test kept whole "
        f"({int(flagged[~train].sum())} of their images are flagged)" in n
        for n in got.notes
    )
    # balancing after cleaning adds to train only: val and test stay the full sets
    splits = make_splits(got, "official", balance="minority")
    assert len(splits.val) == (base.split == "val").sum()
    assert len(splits.test) == (base.split == "test").sum()


def test_mislabeled_training_images_are_those_whose_ferplus_majority_disagrees(tmp_path):
    """The paper's "delete mislabeled images": a training image whose FER+ majority, read as a
    FER2013 class, is not its FER2013 label goes (contempt has no FER2013 class: it always
    disagrees); images without a majority are the cleaning's to drop; val and test stay."""
    base = make_synthetic(num_subjects=5, images_per_class=2, seed=2)
    to_ferplus = {6: 0, 3: 1, 5: 2, 4: 3, 0: 4, 1: 5, 2: 6}  # FER2013 label -> FER+ class
    labels = base.labels.numpy()
    votes = np.zeros((len(base), 10), dtype=int)
    votes[np.arange(len(base)), [to_ferplus[y] for y in labels]] = 10  # all agree ...
    train = np.flatnonzero(base.split == "train")
    other = np.flatnonzero(base.split != "train")
    wrong = train[[0, 5, 9]]  # ... but these: another expression, and one contempt
    for row in wrong[:2]:
        votes[row] = 0
        votes[row, (to_ferplus[labels[row]] + 1) % 7] = 10
    votes[wrong[2]] = 0
    votes[wrong[2], 7] = 10
    votes[train[3]] = UNKNOWN  # no majority: not "mislabeled", the cleaning's
    votes[other[0]] = 0
    votes[other[0], (to_ferplus[labels[other[0]]] + 1) % 7] = 10  # disagrees, but in val/test
    write_fer2013_csv(base, tmp_path / "fer2013.csv")
    usage = [
        "Training" if s == "train" else "PublicTest" if s == "val" else "PrivateTest"
        for s in base.split
    ]
    write_ferplus_csv(tmp_path / "fer2013new.csv", usage, votes, np.zeros(len(base), bool))
    dropped = np.isin(np.arange(len(base)), wrong)
    got = read_fer2013(tmp_path, mislabeled=True)
    same(got, base.subset(~dropped))  # FER2013's labels kept, val and test whole
    assert any("dropped 3 mislabeled training images" in n for n in got.notes)
    both = read_fer2013(tmp_path, clean=True, mislabeled=True)
    same(both, base.subset(~(dropped | (np.arange(len(base)) == train[3]))))
    # FER+'s 7-class labels: the same three go, the unknown image too (no FER+ label)
    plus = read_fer2013(tmp_path, labels="ferplus7", mislabeled=True)
    assert len(plus) == len(base) - 4 and (plus.split != "train").sum() == len(other)


def test_ferplus_rows_in_another_order_are_refused_with_the_line(with_ferplus):
    path, base, _ = with_ferplus
    ferplus = path / "fer2013new.csv"
    lines = ferplus.read_text().splitlines(keepends=True)
    a = int(np.flatnonzero(base.split == "train")[3])  # row a is file line a + 2
    b = int(np.flatnonzero(base.split == "val")[0])
    assert a < b  # so line a + 2 is the first that differs
    lines[a + 1], lines[b + 1] = lines[b + 1], lines[a + 1]
    ferplus.write_text("".join(lines))
    message = (
        f"fer2013new.csv, line {a + 2}: Usage 'PublicTest', but line {a + 2} of fer2013.csv "
        f"has Usage 'Training'"
    )
    for options in ({"clean": True}, {"labels": "ferplus"}, {"labels": "ferplus7"}):
        with pytest.raises(DatasetError, match=message):
            read_fer2013(path, **options)


def test_ferplus_needs_a_csv_with_usage(with_ferplus):
    path, base, _ = with_ferplus
    (path / "fer2013.csv").unlink()
    write_fer2013_csv(base, path / "train.csv", "kaggle")
    with pytest.raises(DatasetError, match=r"train\.csv: has no Usage column"):
        read_fer2013(path, clean=True)


HEADER = "emotion,pixels,Usage\n"
GOOD = " ".join(["7"] * 2304)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("emotion;pixels\n", r"wrong header \['emotion;pixels'\]"),
        (
            HEADER + f"0,{GOOD},Training\n3,{' '.join(['1'] * 2303)},Training\n",
            r"line 3: 2303 pixel values, expected 2304",
        ),
        (
            HEADER + f"0,{GOOD},Training\n0,{GOOD.replace('7', 'x', 1)},Training\n",
            r"line 3: non-numeric pixel 'x'",
        ),
        (HEADER + f"9,{GOOD},Training\n", r"line 2: emotion '9' is not a label 0-6"),
        (HEADER + f"0,{GOOD},Validation\n", r"line 2: Usage 'Validation' is not one of"),
        (HEADER + f"0,{GOOD.replace('7', '300', 1)},Training\n", r"line 2: pixel value 300"),
        (HEADER, r"has a header but no rows"),
        (HEADER + f"0,{GOOD},Training\n0,{GOOD},PublicTest\n", r"no PrivateTest rows"),
        ("pixels\n" + GOOD + "\n", r"has no emotion column"),
    ],
)
def test_bad_csv_input_names_file_line_and_problem(tmp_path, text, message):
    csv = tmp_path / "fer2013.csv"
    csv.write_text(text)
    with pytest.raises(DatasetError, match=f"fer2013.csv.*{message}"):
        read_fer2013(csv)


def test_an_empty_training_class_is_an_error(tmp_path, data):
    write_fer2013_csv(data.subset((data.labels != 1).numpy()), tmp_path / "fer2013.csv")
    with pytest.raises(
        DatasetError, match="fer2013.csv: the train split has no image of class 'disgust'"
    ):
        read_fer2013(tmp_path)


def test_missing_paths_and_folders(tmp_path, data):
    with pytest.raises(DatasetError, match="nowhere: no such file or folder"):
        read_fer2013(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: holds no FER2013 data"):
        read_fer2013(tmp_path / "empty")
    with pytest.raises(DatasetError, match="fer2013new.csv: not found"):
        write_fer2013_csv(data, tmp_path / "x" / "fer2013.csv")
        read_fer2013(tmp_path / "x", labels="ferplus")


def test_folder_errors_name_the_file(tmp_path, data):
    root = write_fer2013_folders(data, tmp_path / "fer")
    (root / "train" / "sad" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"broken\.png: unreadable image"):
        read_fer2013(root)
    (root / "train" / "sad" / "broken.png").unlink()
    (root / "train" / "contempt").mkdir()
    with pytest.raises(DatasetError, match="contempt: unknown class folder"):
        read_fer2013(root)
    (root / "train" / "contempt").rmdir()
    for f in (root / "train" / "fear").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"train/fear: empty class folder"):
        read_fer2013(root)


def test_ferplus_errors(tmp_path, data):
    write_fer2013_csv(data, tmp_path / "fer2013.csv")
    (tmp_path / "fer2013new.csv").write_text("Usage,Image name,neutral\nTraining,a.png,3\n")
    with pytest.raises(DatasetError, match="fer2013new.csv: wrong header"):
        read_fer2013(tmp_path, labels="ferplus")
    write_ferplus_csv(tmp_path / "fer2013new.csv", ["Training"] * 3, VOTES[:3], np.zeros(3, bool))
    with pytest.raises(
        DatasetError, match=f"fer2013new.csv: 3 rows, but the FER2013 CSV has {len(data)}"
    ):
        read_fer2013(tmp_path, labels="ferplus")
