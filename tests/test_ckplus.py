"""CK+ readers against synthetic trees written in the real layouts, and every bad input."""

import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fermodel.data.ckplus import (
    crop_face,
    detect_ckplus_format,
    read_ckplus,
    read_landmarks,
)
from fermodel.data.dataset import CKPLUS_CLASSES, DatasetError
from fermodel.data.fakes import write_ckplus48, write_ckplus_original

# a correct crop differs from the render by resampling only (under 0.3 grey levels on average
# for every synthetic face); a crop off by a tenth of the face side differs by 6 or more
FACE_TOLERANCE = 2.0
WRONG_CROP = 5.0


def mad(a, b) -> float:
    """Mean absolute difference of two images, in grey levels."""
    a, b = (x.double().numpy() if torch.is_tensor(x) else np.asarray(x, float) for x in (a, b))
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The default synthetic tree: 6 subjects, 4 labeled + 1 unlabeled sequences of 8 frames."""
    return write_ckplus_original(tmp_path_factory.mktemp("ckplus") / "CK+")


@pytest.fixture(scope="module")
def ck48(tmp_path_factory):
    return write_ckplus48(tmp_path_factory.mktemp("ck48") / "CK+48", neutral=True)


@pytest.fixture(scope="module")
def small_original(tmp_path_factory):
    """2 subjects (S005, S007), sequences 001 and 002 labeled, 003 unlabeled, 4 frames each."""
    return write_ckplus_original(
        tmp_path_factory.mktemp("small") / "CK+",
        num_subjects=2,
        sequences_per_subject=2,
        frames_per_sequence=4,
        unlabeled_sequences=1,
    )


@pytest.fixture(scope="module")
def small_ck48(tmp_path_factory):
    # 8 labeled sequences: every class has a folder
    return write_ckplus48(tmp_path_factory.mktemp("small48") / "CK+48", num_subjects=2)


@pytest.fixture
def tree(small_original, tmp_path) -> Path:
    """A private copy of the small original tree, to break."""
    return Path(shutil.copytree(small_original["root"], tmp_path / "CK+"))


@pytest.fixture
def tree48(small_ck48, tmp_path) -> Path:
    return Path(shutil.copytree(small_ck48["root"], tmp_path / "CK+48"))


def labeled(meta):
    return [s for s in meta["sequences"] if s["emotion"] is not None]


def by_sequence(ds):
    """ids grouped by (subject, sequence), from the frame file names."""
    groups = defaultdict(list)
    for i, name in enumerate(ds.ids):
        subject, seq, _ = Path(name).stem.split("_")
        groups[subject, seq].append(i)
    return groups


# --------------------------------------------------------------------------- writers, read back


def test_detect_format(original, ck48):
    assert detect_ckplus_format(original["root"]) == "original"
    assert detect_ckplus_format(ck48["root"]) == "ck48"


def test_ck48_reads_back_exactly_the_written_images(ck48):
    ds = read_ckplus(ck48["root"])
    written = {m["path"]: m for m in ck48["images"] if m["class"] != "neutral"}
    assert ds.name == "ckplus"
    assert ds.classes == CKPLUS_CLASSES
    assert sorted(ds.ids.tolist()) == sorted(written)
    for i, path in enumerate(ds.ids):
        assert torch.equal(ds.images[i, 0], torch.from_numpy(written[path]["image"]))
        assert ds.labels[i].item() == written[path]["label"]
        assert ds.subjects[i] == written[path]["subject"]
    assert (ds.split == "").all()
    assert any("neutral/ ignored" in note for note in ds.notes)


def test_original_reads_back_labels_subjects_and_last_three_frames(original):
    ds = read_ckplus(original["root"])
    sequences = labeled(original)
    assert len(sequences) == 24 and len(original["sequences"]) == 30
    assert len(ds) == 24 * 3
    assert ds.classes == CKPLUS_CLASSES and ds.name == "ckplus"
    assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (1, 48, 48)
    assert (ds.split == "").all()
    index = {name: i for i, name in enumerate(ds.ids)}
    for seq in sequences:
        for frame in seq["frames"][-3:]:
            i = index.pop(frame)
            assert ds.labels[i].item() == seq["emotion"] - 1
            assert ds.subjects[i] == seq["subject"]
    assert not index  # nothing from unlabeled sequences or earlier frames
    assert "6 unlabeled skipped" in ds.notes[0]


def test_original_faces_match_the_rendered_faces(original):
    ds = read_ckplus(original["root"])
    expected = {}
    for seq in original["sequences"]:
        expected.update(zip(seq["frames"], seq["faces"][:, 0], strict=True))
    errors = [mad(ds.images[i, 0], expected[name]) for i, name in enumerate(ds.ids)]
    assert max(errors) < FACE_TOLERANCE


def test_both_layouts_of_one_seed_agree(original, ck48):
    a, b = read_ckplus(original["root"]), read_ckplus(ck48["root"])
    assert [Path(i).name for i in a.ids] == [Path(i).name for i in b.ids]
    assert torch.equal(a.labels, b.labels)
    assert (a.subjects == b.subjects).all()
    assert mad(a.images, b.images) < FACE_TOLERANCE


def test_every_subject_shows_several_emotions(original):
    ds = read_ckplus(original["root"])
    for subject in np.unique(ds.subjects):
        assert len(set(ds.labels[torch.from_numpy(ds.subjects == subject)].tolist())) >= 3
    assert set(ds.labels.tolist()) == set(range(7))


def test_original_writer_uses_the_real_file_formats(original):
    root = original["root"]
    seq = labeled(original)[0]
    text = (root / seq["emotion_file"]).read_text()
    assert re.fullmatch(r" {3}\d\.0{7}e\+00\n", text)
    assert seq["emotion_file"].endswith(f"_{len(seq['frames']):08d}_emotion.txt")
    lines = (root / seq["landmarks"][0]).read_text().splitlines()
    assert len(lines) == 68
    assert all(re.fullmatch(r"( {3}\d\.\d{7}e\+0[0-9]){2}", line) for line in lines)
    with Image.open(root / seq["frames"][0]) as frame:
        assert frame.size == (640, 490) and frame.mode == "L"
    unlabeled = [s for s in original["sequences"] if s["emotion"] is None]
    assert len(unlabeled) == 6
    for s in unlabeled:
        folder = root / "Emotion" / s["subject"] / s["sequence"]
        assert folder.is_dir() and not any(folder.iterdir())


def test_writers_are_deterministic(tmp_path):
    a = write_ckplus48(tmp_path / "a", num_subjects=1, sequences_per_subject=2, seed=3)
    b = write_ckplus48(tmp_path / "b", num_subjects=1, sequences_per_subject=2, seed=3)
    c = write_ckplus48(tmp_path / "c", num_subjects=1, sequences_per_subject=2, seed=4)
    assert all(
        np.array_equal(x["image"], y["image"])
        for x, y in zip(a["images"], b["images"], strict=True)
    )
    assert not all(
        np.array_equal(x["image"], y["image"])
        for x, y in zip(a["images"], c["images"], strict=True)
    )


# --------------------------------------------------------------------------- frame selection


@pytest.mark.parametrize("k", [1, 3, 5])
def test_last_k_frames_by_frame_number(original, k):
    ds = read_ckplus(original["root"], k=k)
    groups = by_sequence(ds)
    for seq in labeled(original):
        assert [ds.ids[i] for i in groups[seq["subject"], seq["sequence"]]] == seq["frames"][-k:]
    assert len(ds) == 24 * k


def test_ck48_last_k_takes_the_latest_frames(ck48):
    ds = read_ckplus(ck48["root"], k=1)
    assert len(ds) == 24
    assert all(name.endswith("_00000008.png") for name in ds.ids)


@pytest.fixture(scope="module")
def long_original(tmp_path_factory):
    """Sequences of 12 frames, so the second half (frames 7..12) leaves room for a draw of 4."""
    return write_ckplus_original(
        tmp_path_factory.mktemp("long") / "CK+",
        num_subjects=2,
        sequences_per_subject=3,
        frames_per_sequence=12,
        unlabeled_sequences=0,
    )


def test_paper_frames_are_four_distinct_frames_from_the_second_half(long_original):
    ds = read_ckplus(long_original["root"], frames="paper", seed=0)
    groups = by_sequence(ds)
    assert len(ds) == 6 * 4
    for seq in labeled(long_original):
        chosen = [ds.ids[i] for i in groups[seq["subject"], seq["sequence"]]]
        assert len(set(chosen)) == 4
        assert set(chosen) <= set(seq["frames"][6:])
        assert {ds.labels[i].item() for i in groups[seq["subject"], seq["sequence"]]} == {
            seq["emotion"] - 1
        }


def test_paper_frames_are_deterministic_per_seed(long_original):
    root = long_original["root"]
    first = read_ckplus(root, frames="paper", seed=0)
    again = read_ckplus(root, frames="paper", seed=0)
    other = read_ckplus(root, frames="paper", seed=1)
    assert (first.ids == again.ids).all() and torch.equal(first.images, again.images)
    assert not (first.ids == other.ids).all()


# --------------------------------------------------------------------------- neutral


def test_include_neutral_adds_first_frames_as_class_zero(original):
    ds = read_ckplus(original["root"], include_neutral=True)
    assert ds.classes == ("neutral", *CKPLUS_CLASSES)
    assert len(ds) == 24 * 4
    neutral = {ds.ids[i] for i in torch.nonzero(ds.labels == 0).flatten().tolist()}
    assert neutral == {seq["frames"][0] for seq in labeled(original)}
    index = {name: i for i, name in enumerate(ds.ids)}
    for seq in labeled(original):
        first = index[seq["frames"][0]]
        assert mad(ds.images[first, 0], seq["faces"][0, 0]) < FACE_TOLERANCE
        # expressive labels shift by one: code 3 (disgust) is label 3 = classes[3]
        assert ds.labels[index[seq["frames"][-1]]].item() == seq["emotion"]
        assert ds.classes[seq["emotion"]] == CKPLUS_CLASSES[seq["emotion"] - 1]


def test_include_neutral_never_reuses_the_first_frame(small_original):
    ds = read_ckplus(small_original["root"], k=4, include_neutral=True)
    assert len(ds.ids) == len(set(ds.ids)) == 4 * 4  # 4 labeled sequences: 1 neutral + 3 frames


def test_include_neutral_reads_the_ck48_neutral_folder(ck48):
    ds = read_ckplus(ck48["root"], include_neutral=True)
    written = {m["path"]: m for m in ck48["images"]}
    assert ds.classes == ("neutral", *CKPLUS_CLASSES)
    assert sorted(ds.ids.tolist()) == sorted(written)
    for i, path in enumerate(ds.ids):
        expected = 0 if written[path]["class"] == "neutral" else written[path]["label"] + 1
        assert ds.labels[i].item() == expected
    assert (ds.labels == 0).sum().item() == 24


def test_code_zero_is_neutral_when_asked_for(tree):
    emotion = next((tree / "Emotion/S005/001").iterdir())
    emotion.write_text("   0.0000000e+00\n")
    ds = read_ckplus(tree, include_neutral=True)
    rows = [i for i, name in enumerate(ds.ids) if "/S005/001/" in name]
    assert [ds.labels[i].item() for i in rows] == [0, 0, 0, 0]


# --------------------------------------------------------------------------- landmark cropping


def test_landmark_crop_is_centred_on_the_face(original):
    root = original["root"]
    for seq in labeled(original)[::5]:
        frame = Image.open(root / seq["frames"][-1]).convert("L")
        points = read_landmarks(root / seq["landmarks"][-1])
        face = crop_face(frame, points)
        assert face.shape == (48, 48) and face.dtype == np.uint8
        assert mad(face, seq["faces"][-1, 0]) < FACE_TOLERANCE
        side = seq["face_box"][2]
        for shift in ([side / 10, 0], [0, side / 10], [-side / 4, -side / 4]):
            wrong = crop_face(frame, points + np.array(shift))
            assert mad(wrong, seq["faces"][-1, 0]) > WRONG_CROP


def test_landmark_box_is_squared_with_the_margin():
    # a gradient frame: every crop box gives a different image
    x, y = np.meshgrid(np.arange(640), np.arange(490))
    frame = Image.fromarray(((x * 7 + y * 13) % 256).astype(np.uint8))
    # points spanning a 100 x 50 box centred on (300, 200): the square is 120 wide
    points = np.array([[250.0, 175.0], [350.0, 225.0]] + [[300.0, 200.0]] * 66)
    expected = frame.resize((48, 48), Image.Resampling.LANCZOS, box=(240, 140, 360, 260))
    assert np.array_equal(crop_face(frame, points), np.asarray(expected))


def test_a_face_over_the_frame_edge_is_shifted_inside_not_stretched():
    x, y = np.meshgrid(np.arange(640), np.arange(490))
    frame = Image.fromarray(((x * 7 + y * 13) % 256).astype(np.uint8))
    points = np.array([[-20.0, -30.0], [80.0, 70.0]] + [[30.0, 20.0]] * 66)  # square 120
    expected = frame.resize((48, 48), Image.Resampling.LANCZOS, box=(0, 0, 120, 120))
    assert np.array_equal(crop_face(frame, points), np.asarray(expected))


@pytest.mark.parametrize("mode", ["RGB", "16-bit"])
def test_rgb_and_16_bit_frames_are_read_as_8_bit_gray(tree, mode):
    frame = tree / "cohn-kanade-images/S005/001/S005_001_00000004.png"
    gray = Image.open(frame).convert("L")
    before = read_ckplus(tree)
    if mode == "RGB":
        gray.convert("RGB").save(frame)
    else:
        Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(frame)
    after = read_ckplus(tree)
    assert torch.equal(before.images, after.images)


def test_short_sequences_keep_what_they_have_and_say_so(tmp_path):
    meta = write_ckplus_original(
        tmp_path / "CK+", num_subjects=1, sequences_per_subject=1, frames_per_sequence=2
    )
    ds = read_ckplus(meta["root"], frames="paper")
    # the second half is too short for 4 frames, so the last 4 frames (here all) are the pool
    assert ds.ids.tolist() == meta["sequences"][0]["frames"]
    assert any("2 frames, so 2 expressive frames instead of 4" in note for note in ds.notes)


def test_missing_landmarks_borrow_the_nearest_frame(tree, small_original):
    (tree / "Landmarks/S005/001/S005_001_00000004_landmarks.txt").unlink()
    ds = read_ckplus(tree)
    note = next(n for n in ds.notes if "S005_001_00000004.png" in n)
    assert "S005_001_00000003_landmarks.txt" in note
    seq = small_original["sequences"][0]
    i = ds.ids.tolist().index(seq["frames"][-1])
    assert mad(ds.images[i, 0], seq["faces"][-1, 0]) < FACE_TOLERANCE


# --------------------------------------------------------------------------- bad input


def raises_naming(*parts: str):
    """pytest.raises(DatasetError) whose message contains every one of ``parts``, in order."""
    return pytest.raises(DatasetError, match=".*".join(re.escape(p) for p in parts))


def test_missing_path(tmp_path):
    with raises_naming("no-such-ck"):
        read_ckplus(tmp_path / "no-such-ck")


def test_path_is_a_file(tmp_path):
    path = tmp_path / "ck.zip"
    path.write_bytes(b"PK")
    with raises_naming("ck.zip", "not a folder"):
        read_ckplus(path)


def test_neither_layout(tmp_path):
    (tmp_path / "photos").mkdir()
    with raises_naming(str(tmp_path), "neither CK+ layout"):
        detect_ckplus_format(tmp_path)


def test_both_layouts(tree):
    (tree / "anger").mkdir()
    with raises_naming(str(tree), "both layouts"):
        read_ckplus(tree)


@pytest.mark.parametrize("folder", ["cohn-kanade-images", "Emotion", "Landmarks"])
def test_original_tree_missing_a_folder(tree, folder):
    shutil.rmtree(tree / folder)
    with raises_naming(folder, "missing"):
        read_ckplus(tree)


def test_labeled_sequence_without_image_folder(tree):
    shutil.rmtree(tree / "cohn-kanade-images/S007/002")
    with raises_naming("S007/002", "sequence without frames", "S007_002_00000004_emotion.txt"):
        read_ckplus(tree)


def test_labeled_sequence_with_an_empty_image_folder(tree):
    for frame in (tree / "cohn-kanade-images/S005/002").iterdir():
        frame.unlink()
    with raises_naming("S005/002", "sequence without frames"):
        read_ckplus(tree)


@pytest.mark.parametrize(
    "text", ["", "\n", "   3.0000000e+00   4.0000000e+00\n", "anger\n", "   3.0e+00\n1\n"]
)
def test_emotion_file_that_is_not_one_number(tree, text):
    (tree / "Emotion/S007/001/S007_001_00000004_emotion.txt").write_text(text)
    with raises_naming("S007_001_00000004_emotion.txt"):
        read_ckplus(tree)


@pytest.mark.parametrize(
    "code", ["   8.0000000e+00", "   0.0000000e+00", "   2.5000000e+00", "  -1.0000000e+00"]
)
def test_emotion_code_outside_1_to_7(tree, code):
    (tree / "Emotion/S005/002/S005_002_00000004_emotion.txt").write_text(code + "\n")
    with raises_naming("S005_002_00000004_emotion.txt", "line 1", "not an integer in 1..7"):
        read_ckplus(tree)


def test_emotion_code_outside_0_to_7_with_neutral(tree):
    (tree / "Emotion/S005/002/S005_002_00000004_emotion.txt").write_text("   9.0e+00\n")
    with raises_naming("S005_002_00000004_emotion.txt", "0..7"):
        read_ckplus(tree, include_neutral=True)


def test_two_emotion_files_for_one_sequence(tree):
    (tree / "Emotion/S005/001/S005_001_00000003_emotion.txt").write_text("   1.0e+00\n")
    with raises_naming("S005/001", "2 emotion files"):
        read_ckplus(tree)


def test_emotion_file_naming_a_frame_that_does_not_exist(tree):
    folder = tree / "Emotion/S005/001"
    (folder / "S005_001_00000004_emotion.txt").rename(folder / "S005_001_00000009_emotion.txt")
    with raises_naming("S005_001_00000009_emotion.txt", "frame 9"):
        read_ckplus(tree)


def _edit_line(lines, number, text):
    lines[number - 1] = text
    return lines


@pytest.mark.parametrize(
    ("edit", "line"),
    [
        (lambda lines: lines[:67], 68),
        (lambda lines: lines[:10], 11),
        (lambda lines: [*lines, "   1.0e+00   2.0e+00"], 69),
        (lambda lines: _edit_line(lines, 10, "   1.0e+00   2.0e+00   3.0e+00"), 10),
        (lambda lines: _edit_line(lines, 5, "x y"), 5),
        (lambda lines: _edit_line(lines, 1, "   nan   2.0e+00"), 1),
        (lambda lines: _edit_line(lines, 40, ""), 40),
    ],
    ids=["67 lines", "10 lines", "69 lines", "three numbers", "text", "nan", "blank"],
)
def test_bad_landmarks_file(tree, edit, line):
    path = tree / "Landmarks/S005/001/S005_001_00000004_landmarks.txt"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with raises_naming("S005_001_00000004_landmarks.txt", f"line {line}:"):
        read_ckplus(tree)


def test_sequence_without_any_landmarks(tree):
    shutil.rmtree(tree / "Landmarks/S007/001")
    with raises_naming("Landmarks/S007/001", "no landmarks"):
        read_ckplus(tree)


def test_landmarks_that_coincide(tree):
    path = tree / "Landmarks/S005/001/S005_001_00000004_landmarks.txt"
    path.write_text("   1.0e+02   1.0e+02\n" * 68)
    with raises_naming("S005_001_00000004_landmarks.txt", "coincide"):
        read_ckplus(tree)


@pytest.mark.parametrize("layout", ["original", "ck48"])
def test_unreadable_image(tree, tree48, layout):
    if layout == "original":
        root, frame = tree, tree / "cohn-kanade-images/S007/001/S007_001_00000003.png"
    else:
        root, frame = tree48, next((tree48 / "happy").iterdir())
    frame.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with raises_naming(frame.name, "unreadable image"):
        read_ckplus(root)


@pytest.mark.parametrize("name", ["S005_001_3.png", "S005_001_00000003.jpg", "notes.txt"])
def test_original_frame_name_not_matching(tree, name):
    (tree / "cohn-kanade-images/S005/001" / name).write_bytes(b"")
    with raises_naming(name, "does not match"):
        read_ckplus(tree)


def test_original_frame_of_another_sequence(tree):
    folder = tree / "cohn-kanade-images/S005/001"
    shutil.copy(folder / "S005_001_00000002.png", folder / "S005_002_00000002.png")
    with raises_naming("S005_002_00000002.png", "S005/001"):
        read_ckplus(tree)


def test_no_labeled_sequence(tree):
    for emotion in (tree / "Emotion").glob("*/*/*_emotion.txt"):
        emotion.unlink()
    with raises_naming("Emotion", "no labeled sequence"):
        read_ckplus(tree)


def test_ck48_empty_class_folder(tree48):
    for image in (tree48 / "fear").iterdir():
        image.unlink()
    with raises_naming("fear", "empty class folder"):
        read_ckplus(tree48)


@pytest.mark.parametrize("name", ["angry", "Anger", "train"])
def test_ck48_unknown_folder_name(tree48, name):
    (tree48 / name).mkdir()
    with raises_naming(name, "unknown folder name"):
        read_ckplus(tree48)


def test_ck48_stray_file(tree48):
    (tree48 / "labels.csv").write_text("x\n")
    with raises_naming("labels.csv", "a file where"):
        read_ckplus(tree48)


def test_ck48_missing_class_folder(tree48):
    shutil.rmtree(tree48 / "contempt")
    with raises_naming("contempt", "missing"):
        read_ckplus(tree48)


@pytest.mark.parametrize("name", ["img001.png", "S5_1_1.png", "S005_001_00000008.jpg"])
def test_ck48_file_name_not_matching(tree48, name):
    Image.new("L", (48, 48)).save(tree48 / "surprise" / "x.png")
    (tree48 / "surprise" / "x.png").rename(tree48 / "surprise" / name)
    with raises_naming(name, "S###_###_########.png"):
        read_ckplus(tree48)


def test_ck48_image_of_the_wrong_size(tree48):
    path = next((tree48 / "sadness").iterdir())
    Image.new("L", (64, 64)).save(path)
    with raises_naming(path.name, "64x64"):
        read_ckplus(tree48)


def test_ck48_sequence_in_two_classes(tree48):
    source = next((tree48 / "anger").iterdir())
    shutil.copy(source, tree48 / "happy" / source.name)
    with raises_naming(source.name, "anger/", "happy/"):
        read_ckplus(tree48)


def test_ck48_neutral_requested_but_absent(tree48):
    with raises_naming("neutral", "missing"):
        read_ckplus(tree48, include_neutral=True)


def test_ck48_refuses_more_than_its_three_frames_per_sequence(tree48):
    with raises_naming(str(tree48), "k=4", "only the last 3 frames of each sequence"):
        read_ckplus(tree48, k=4)
    assert len(read_ckplus(tree48, k=3)) == 3 * len(read_ckplus(tree48, k=1))


def test_ck48_sequence_with_fewer_frames_than_k_says_so(tree48):
    victim = sorted((tree48 / "anger").iterdir())[0]
    victim.unlink()
    ds = read_ckplus(tree48)
    subject, sequence = victim.name.split("_")[:2]
    note = f"{subject}/{sequence}: 2 frames in anger/, so 2 frames instead of 3"
    assert any(note in n for n in ds.notes)
    assert len(ds) == len(read_ckplus(tree48, k=1)) * 3 - 1


def test_ck48_has_no_whole_sequences_for_paper_frames(tree48):
    with raises_naming(str(tree48), "frames='paper'"):
        read_ckplus(tree48, frames="paper")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"frames": "first"},
        {"k": 0},
        {"k": 2.5},
        {"frames": "paper", "seed": -1},
        {"frames": "paper", "k": 4},
    ],
)
def test_bad_arguments(small_original, kwargs):
    with pytest.raises(ValueError, match="frames|k|seed"):
        read_ckplus(small_original["root"], **kwargs)
