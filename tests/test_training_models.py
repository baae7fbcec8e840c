"""Backbones: shapes at VIPNet's 288x384 input, the feature-extractor interface, relative
position attention against a direct computation, torchvision-format weight loading."""

from __future__ import annotations

import pytest
import torch

from biqa.training.models import (ARCHS, RelPosSelfAttention, create_model,
                                  load_torchvision_weights)

torch.set_num_threads(1)

# torchvision's ResNet-50 state dict: a few of its exact keys and shapes.
TORCHVISION_RESNET50 = {
    "conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer1.0.downsample.1.bias": (256,),
    "layer3.5.conv2.weight": (256, 256, 3, 3), "layer4.2.bn3.num_batches_tracked": (),
    "fc.weight": (1000, 2048), "fc.bias": (1000,),
}
STAGE_STRIDES = (4, 8, 16, 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_at_288x384(arch):
    model = create_model(arch, num_classes=150).eval()
    batch = 2 if arch in ("tiny", "resnet18") else 1
    x = torch.randn(batch, 3, 288, 384)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features[-1])
    assert model.num_classes == 150 and logits.shape == (batch, 150)
    strides = (2, 4, 8, 16) if arch == "tiny" else STAGE_STRIDES
    assert [tuple(f.shape) for f in features] == [
        (batch, c, 288 // s, 384 // s) for c, s in zip(model.feature_channels, strides)]
    if arch == "botnet50":
        assert features[-1].shape[2:] == (9, 12)


def test_feature_extractor_without_head():
    model = create_model("resnet18", num_classes=0).eval()
    with torch.no_grad():
        pooled = model(torch.randn(2, 3, 64, 96))
    assert pooled.shape == (2, 512) and model.fc is None


def test_botnet_runs_at_another_input_size():
    """Relative tables built for 288x384 are stretched for other sizes (fine-tuning patches)."""
    model = create_model("botnet50", 10, input_size=(384, 288)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_relative_attention_matches_direct_computation():
    torch.manual_seed(0)
    h, w, heads, dim = 3, 4, 2, 8
    attention = RelPosSelfAttention(dim, (h, w), heads)
    x = torch.randn(1, dim, h, w)
    out = attention(x)
    d = dim // heads
    q, k, v = attention.qkv(x).reshape(heads, 3, d, h * w).unbind(1)
    q = q * d ** -0.5
    expected = torch.zeros(heads, d, h * w)
    for head in range(heads):
        logits = torch.zeros(h * w, h * w)
        for i in range(h * w):
            y, xx = divmod(i, w)
            for j in range(h * w):
                y2, x2 = divmod(j, w)
                logits[i, j] = (q[head, :, i] @ k[head, :, j]
                                + q[head, :, i] @ attention.rel_height[y2 - y + h - 1]
                                + q[head, :, i] @ attention.rel_width[x2 - xx + w - 1])
        expected[head] = v[head] @ logits.softmax(-1).T
    assert torch.allclose(out, expected.reshape(1, dim, h, w), atol=1e-5)


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        create_model("vgg", 10)


def _torchvision_file(tmp_path, arch: str) -> tuple[str, dict]:
    """A torchvision-format file made from another model's weights: same keys, 1000-way fc,
    and the 'module.'-free names torchvision uses."""
    donor = create_model(arch, num_classes=1000)
    state = {k: v.clone() for k, v in donor.state_dict().items()}
    path = tmp_path / f"{arch}-imagenet.pth"
    torch.save(state, path)
    return str(path), state


def test_torchvision_resnet50_keys_match_ours():
    state = create_model("resnet50", 1000).state_dict()
    for key, shape in TORCHVISION_RESNET50.items():
        assert tuple(state[key].shape) == shape
    assert len(state) == 320  # torchvision's resnet50 state dict has 320 entries


def test_loads_torchvision_weights_into_resnet(tmp_path):
    path, state = _torchvision_file(tmp_path, "resnet18")
    model = create_model("resnet18", num_classes=20)
    report = load_torchvision_weights(model, path)
    assert report["missing"] == ["fc.bias", "fc.weight"]  # 1000-way head does not fit
    assert report["unexpected"] == ["fc.bias", "fc.weight"]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state if not k.startswith("fc."))


def test_loads_resnet50_weights_into_botnet_stages(tmp_path):
    path, state = _torchvision_file(tmp_path, "resnet50")
    model = create_model("botnet50", num_classes=20)
    report = load_torchvision_weights(model, path)
    assert set(report["unexpected"]) == {"fc.weight", "fc.bias", "layer4.0.conv2.weight",
                                         "layer4.1.conv2.weight", "layer4.2.conv2.weight"}
    assert all(".rel_" in k or ".qkv." in k or k.startswith("fc.") for k in report["missing"])
    loaded = model.state_dict()
    assert torch.equal(loaded["layer3.5.conv2.weight"], state["layer3.5.conv2.weight"])
    assert torch.equal(loaded["layer4.0.conv1.weight"], state["layer4.0.conv1.weight"])


def test_wrong_weights_are_refused(tmp_path):
    path, _ = _torchvision_file(tmp_path, "resnet18")
    with pytest.raises(ValueError, match="required parameters missing or mis-shaped"):
        load_torchvision_weights(create_model("resnet50", 10), path)


def test_the_torch_free_architecture_list_is_the_registry():
    from biqa.training.config import ARCHS as FLAG_ARCHS
    from biqa.training.models import ARCHS
    assert sorted(FLAG_ARCHS) == sorted(ARCHS)


def test_tiny_sees_every_pixel_and_old_tiny_checkpoints_are_refused_clearly(tmp_path):
    """The tiny CNN's first layer works at full resolution (stride 1: pixel-level distortions
    reach it whole), and a checkpoint of the older stem-less tiny CNN is refused with a
    reason instead of a raw state-dict error."""
    from biqa.training.pretrain import load_dpm, save_checkpoint
    model = create_model("tiny", num_classes=4).eval()
    assert isinstance(model.stem[0], torch.nn.Conv2d) and model.stem[0].stride == (1, 1)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("stem.")}
    old["stages.0.0.weight"] = torch.zeros(16, 3, 3, 3)
    path = tmp_path / "old_tiny.pt"
    save_checkpoint(path, {"model": old, "config": {"arch": "tiny", "num_classes": 4,
                                                   "input_size": [64, 48]}})
    with pytest.raises(ValueError, match="its weights do not fit.*retrain"):
        load_dpm(path)
