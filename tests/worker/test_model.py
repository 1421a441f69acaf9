import hashlib
import re
import shutil

import pytest
import torch
from torchvision.models import resnet50
from torchvision.ops import FrozenBatchNorm2d

from pipeline.worker.model import build_model, load_backbone_state
from pipeline.worker.weights import IMAGENET_URL, WeightsError

TRAINABLE = ("layer2.", "layer3.", "layer4.")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A seeded random ResNet-50 state dict saved as a file, with non-trivial FrozenBatchNorm2d
    buffers (a fresh one holds only ones and zeros)."""
    torch.manual_seed(0)
    state = resnet50(norm_layer=FrozenBatchNorm2d).state_dict()
    state["bn1.running_mean"] = torch.randn(64)
    state["layer4.2.bn3.weight"] = torch.rand(2048) + 0.5
    path = tmp_path_factory.mktemp("weights") / "weights.pth"
    torch.save(state, path)
    return path, state


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_landed(body, state):
    landed = body.state_dict()
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.2.conv3.weight", "bn1.running_mean",
                "layer4.2.bn3.weight"):
        assert torch.equal(landed[key], state[key]), key


def assert_reference_backbone(model):
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    trainable = {name for name, p in body.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in body.named_parameters() if name.startswith(TRAINABLE)}
    assert not body.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for layer in (body.layer2, body.layer3, body.layer4) for p in layer.parameters())


def test_file_url_weights_land_in_the_backbone(weights):
    path, state = weights
    model = build_model("file://" + str(path), 64, 96, box_batch_size_per_image=32)
    assert_landed(model.backbone.body, state)
    assert_reference_backbone(model)
    assert model.roi_heads.box_predictor.cls_score.out_features == 91
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    assert model.transform.min_size == (64,) and model.transform.max_size == 96


def test_local_path_weights(weights):
    path, state = weights
    model = build_model(str(path), 64, 96)
    assert_landed(model.backbone.body, state)
    assert_reference_backbone(model)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 512


def test_hash_in_the_name_is_checked(weights, tmp_path):
    path, state = weights
    digest = sha256(path)
    good = tmp_path / f"resnet50-{digest[:8]}.pth"
    shutil.copyfile(path, good)
    assert torch.equal(load_backbone_state(str(good))["conv1.weight"], state["conv1.weight"])
    wrong_prefix = ("1" if digest[0] == "0" else "0") + digest[1:8]
    bad = tmp_path / f"resnet50-{wrong_prefix}.pth"
    shutil.copyfile(path, bad)
    with pytest.raises(WeightsError, match="SHA-256"):
        load_backbone_state(str(bad))
    with pytest.raises(WeightsError, match="SHA-256"):
        build_model("file://" + str(bad), 64, 96)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(WeightsError, match=f"no such file {re.escape(str(missing))}"):
        load_backbone_state(str(missing))
    with pytest.raises(WeightsError, match=f"no such file {re.escape(str(missing))}"):
        build_model("file://" + str(missing), 64, 96)


def test_the_model_never_downloads():
    """A worker given "imagenet" or a URL instead of the file the driver fetched refuses it: it
    must not download (see tests/worker/test_weights.py for the driver's fetch)."""
    assert IMAGENET_URL == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    for source in ("imagenet", IMAGENET_URL, "http://127.0.0.1:1/resnet50-0676ba61.pth"):
        with pytest.raises(WeightsError, match="a download, which only the driver makes"):
            build_model(source, 64, 96)


def test_no_weights_trains_everything():
    model = build_model("none", 64, 96, box_batch_size_per_image=32)
    body = model.backbone.body
    assert isinstance(body.bn1, torch.nn.BatchNorm2d)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert all(p.requires_grad for p in body.parameters())
    assert model.roi_heads.box_predictor.cls_score.out_features == 91
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 32
