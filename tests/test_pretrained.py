"""ImageNet initialisation from a torchvision state dict saved by the test."""

import logging

import pytest
import torch
import torchvision

from fermodel import PretrainedError, build_model, load_pretrained


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def test_psa_takes_304_of_320_tensors_and_leaves_exactly_the_3x3_convolutions(imagenet_file):
    model = build_model(attention="psa", num_classes=1000, in_chans=3)
    report = load_pretrained(model, imagenet_file)
    assert (len(report.transferred), report.source_total) == (304, 320)
    assert len(report.unmatched) == 16
    assert all(k.startswith("layer") and k.endswith(".conv2.weight") for k in report.unmatched)
    source = torch.load(imagenet_file, weights_only=True)
    own = model.state_dict()
    for key in report.transferred:
        torch.testing.assert_close(own[key], source[key], rtol=0, atol=0)


def test_fer_head_keeps_a_new_classifier_and_a_summed_grayscale_stem(imagenet_file, caplog):
    with caplog.at_level(logging.INFO, logger="fermodel.pretrained"):
        model = build_model(attention="psa", num_classes=7, in_chans=1, pretrained=imagenet_file)
    report = model.transfer_report
    assert len(report.transferred) == 302 and report.adapted == ["conv1.weight"]
    assert {"fc.weight", "fc.bias"} <= set(report.unmatched) and "fc.weight" in report.left_new
    assert "transferred 302 of 320 tensors" in caplog.text
    # a gray image through the summed stem equals the RGB stem on the image replicated 3 times
    rgb = torchvision.models.resnet50(weights=None)
    rgb.load_state_dict(torch.load(imagenet_file, weights_only=True))
    gray = torch.rand(2, 1, 48, 48)
    torch.testing.assert_close(model.conv1(gray), rgb.conv1(gray.expand(-1, 3, -1, -1)))


def test_every_attention_gets_the_whole_shared_backbone(imagenet_file):
    # none takes all 320; gates and merges add tensors but take the same 320 (fc included)
    for attention in ("none", "se", "cbam", "eca", "aff"):
        report = load_pretrained(
            build_model(attention=attention, num_classes=1000, in_chans=3), imagenet_file
        )
        assert len(report.transferred) == 320, attention


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PretrainedError, match=r"pretrained file not found: .*nothing\.pth"):
        build_model(pretrained=tmp_path / "nothing.pth")


def test_a_file_that_is_not_a_state_dict_is_a_clear_error(tmp_path):
    text = tmp_path / "weights.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(PretrainedError, match=r"weights\.txt: not a file saved by torch\.save"):
        build_model(pretrained=text)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(PretrainedError, match=r"tensor\.pth: holds a Tensor, not a state dict"):
        build_model(pretrained=tensor)


def test_a_file_with_no_matching_tensor_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(PretrainedError, match="no tensor matches the model by name and shape"):
        build_model(pretrained=path)


class Payload:
    pass


def test_a_pickle_of_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": Payload()}, path)
    with pytest.raises(
        PretrainedError, match="refused, loading it would unpickle arbitrary objects"
    ):
        build_model(pretrained=path)


def test_a_wrapped_checkpoint_is_unwrapped(tmp_path, imagenet_file):
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": torch.load(imagenet_file, weights_only=True), "epoch": 3}, path)
    report = load_pretrained(build_model(attention="none", num_classes=1000, in_chans=3), path)
    assert len(report.transferred) == 320


def test_torchvision_weights_names_are_resolved():
    with pytest.raises(PretrainedError, match="unknown torchvision weights"):
        build_model(pretrained="ResNet50_Weights.NO_SUCH_WEIGHTS")
