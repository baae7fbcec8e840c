"""The VIPNet authors' DPM in biqa: ``botnet50-vipnet`` loads a state dict with the original's
keys and shapes strictly and computes what the original computes; ``biqa-convert-dpm``
turns such a file into a biqa checkpoint that load_dpm, build_vipnet and --init-weights use.

Test data (tests/data/):
* ``vipnet_dpm_state_dict.json``: the original's state-dict keys and shapes (its
  ``derivation`` field says from which file and configuration);
* ``vipnet_dpm_reference_logits.json``: the original code's logits (XiaoqiWang/VIPNet,
  ``pretraining/BoTNet.py``, run outside this project, eval mode) for the weights of
  ``original_state()`` and the input of ``original_input()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from biqa.cli_convert import convert_dpm
from biqa.training.botnet_vipnet import BoTNetVIPNet
from biqa.training.data import NORMALISATION
from biqa.training.dpm_weights import (class_table, convert_vipnet_checkpoint,
                                       load_init_weights, read_vipnet_state_dict,
                                       vipnet_dpm_from_state_dict)
from biqa.training.models import create_model
from biqa.training.pretrain import load_dpm
from biqa.training.vipnet import build_vipnet

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"
ORIGINAL_KEYS = {k: tuple(v) for k, v in
                 json.loads((DATA / "vipnet_dpm_state_dict.json").read_text())["keys"].items()}
REFERENCE = json.loads((DATA / "vipnet_dpm_reference_logits.json").read_text())
INPUT_HW = (288, 384)  # the published DPM's input; the embeddings allow no other


def original_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for every key of the original (from numpy's generator, so the reference
    logits do not depend on torch's RNG): scaled normal weights, BatchNorm statistics away
    from 0/1 so that they matter, position embeddings of the original's order of size."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in ORIGINAL_KEYS.items():
        name = key.rsplit(".", 1)[-1]
        if name == "num_batches_tracked":
            state[key] = torch.tensor(100)
            continue
        draw = rng.standard_normal(shape).astype(np.float32)
        if name in ("rel_h", "rel_w"):
            value = 0.1 * draw
        elif name == "running_var":
            value = 1 + 0.2 * np.abs(draw)
        elif name == "weight" and len(shape) == 1:  # BatchNorm scale
            value = 1 + 0.1 * draw
        elif len(shape) == 1:  # biases, BatchNorm shift and mean
            value = 0.1 * draw
        else:
            value = draw / np.sqrt(np.prod(shape[1:]))
        state[key] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return state


def original_input() -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(1).standard_normal((1, 3, *INPUT_HW)).astype(np.float32))


def as_saved_by_multi_gpu_train(state: dict) -> dict:
    """What the authors' multi_gpu_train.py writes (their published file): DDP's prefix."""
    return {"epoch": 40, "arch": "botnet",
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "best_acc": torch.tensor(91.5), "optimizer": {"state": {}, "param_groups": []}}


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return original_state()


@pytest.fixture(scope="module")
def original_file(tmp_path_factory, state) -> Path:
    path = tmp_path_factory.mktemp("vipnet") / "botnet_model_best.pth.tar"
    torch.save(as_saved_by_multi_gpu_train(state), path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, original_file) -> Path:
    path = tmp_path_factory.mktemp("converted") / "vipnet_dpm.pt"
    convert_vipnet_checkpoint(original_file, path)
    return path


def test_keys_and_shapes_are_the_originals():
    model = create_model("botnet50-vipnet", num_classes=150)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == ORIGINAL_KEYS
    assert len(ORIGINAL_KEYS) == 345


@pytest.mark.parametrize("wrap", ["bare", "module.", "model_state_dict", "state_dict+module."])
def test_original_files_load_strictly(tmp_path, state, wrap):
    """Every way the authors' code saves the model: bare, DataParallel's prefix, train.py's
    and multi_gpu_train.py's wrappers."""
    saved = {f"module.{k}": v for k, v in state.items()} if "module." in wrap else dict(state)
    if wrap == "model_state_dict":
        saved = {"model_state_dict": saved, "global_epoch": 12, "best_acc": 88.0}
    elif wrap.startswith("state_dict"):
        saved = as_saved_by_multi_gpu_train(state)
    path = tmp_path / "dpm.pth"
    torch.save(saved, path)
    loaded, meta = read_vipnet_state_dict(path)
    model = vipnet_dpm_from_state_dict(loaded, str(path))
    assert model.num_classes == 150 and model.input_size == (384, 288)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    if wrap.startswith("state_dict"):
        assert meta == {"epoch": 40, "arch": "botnet", "best_acc": pytest.approx(91.5)}


def test_outputs_are_the_original_codes(state):
    """The attention (position term p_i·q_j, no scaling), shortcut biases and head compute
    exactly what the original does, to float rounding."""
    model = vipnet_dpm_from_state_dict(state, "test").eval()
    with torch.no_grad():
        logits = model(original_input())[0]
    expected = torch.tensor(REFERENCE["logits"])
    assert logits.shape == (150,)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("change, message", [
    ("drop", "1 missing: ['layer3.5.bn2.running_var']"),
    ("rename", "1 unexpected: ['layer3.5.bn2.running_variance']"),
    ("reshape", "layer3.5.bn2.running_var (128,) (expected (256,))"),
    ("no_fc", "has no 'fc.1.weight'"),
])
def test_a_wrong_state_dict_is_refused_by_name(state, change, message):
    bad = dict(state)
    key = "layer3.5.bn2.running_var"
    if change == "drop":
        del bad[key]
    elif change == "rename":
        bad[key + "iance"] = bad.pop(key)
    elif change == "reshape":
        bad[key] = bad[key][:128]
    else:
        del bad["fc.1.weight"]
    with pytest.raises(ValueError) as error:
        vipnet_dpm_from_state_dict(bad, "dpm.pth")
    assert message in str(error.value) and "dpm.pth" in str(error.value)


@pytest.mark.parametrize("size", [(300, 192), (400, 288)])  # the original fails on both
def test_sizes_the_original_cannot_run_are_refused(size):
    with pytest.raises(ValueError, match=f"input size {size[0]}x{size[1]} must be a multiple "
                                         "of 32"):
        BoTNetVIPNet(150, input_size=size)


def test_other_input_sizes_are_refused_clearly():
    model = BoTNetVIPNet(10, input_size=(64, 64)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
        with pytest.raises(ValueError, match="position embeddings for a 4x4 feature map here, "
                                             "got 6x4"):
            model(torch.randn(1, 3, 96, 64))


def test_feature_extractor_surface():
    model = BoTNetVIPNet(0, input_size=(64, 96)).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 96, 64))
        pooled = model(torch.randn(2, 3, 96, 64))
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, 96 // s, 64 // s) for c, s in zip(model.feature_channels, (4, 8, 16, 32))]
    assert model.fc is None and pooled.shape == (2, 4 * 2048)
    assert not any(k.startswith("fc.") for k in model.state_dict())


def test_conversion_round_trip(tmp_path):
    """A faithful model with trained BatchNorm statistics, saved as the authors' code saves
    it, converted, loaded with weights_only and by load_dpm: the same outputs."""
    torch.manual_seed(0)
    original = BoTNetVIPNet(150).train()
    with torch.no_grad():
        original(torch.randn(2, 3, *INPUT_HW))  # BatchNorm running statistics move
    original.eval()
    source, target = tmp_path / "botnet_model_best.pth.tar", tmp_path / "dpm.pt"
    torch.save(as_saved_by_multi_gpu_train(original.state_dict()), source)
    convert_vipnet_checkpoint(source, target)

    raw = torch.load(target, weights_only=True)
    assert set(raw) == {"model", "config"}
    config = raw["config"]
    assert config["arch"] == "botnet50-vipnet" and config["num_classes"] == 150
    assert config["input_size"] == [384, 288] and config["levels"] == 5
    assert config["normalisation"] == NORMALISATION
    assert config["converted_from"] == {"file": source.name, "epoch": 40, "arch": "botnet",
                                        "best_acc": pytest.approx(91.5)}
    model, loaded_config = load_dpm(target)
    assert loaded_config == config and not model.training
    x = torch.randn(1, 3, *INPUT_HW)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_default_class_table_is_vipnets_label_order():
    """VIPNet's loader: label = (type - 1) * 5 + level - 1 for types 1..30."""
    table = class_table()
    assert [t["id"] for t in table] == list(range(1, 31))
    assert all(t["class_base"] == (t["id"] - 1) * 5 for t in table)
    assert table[0]["name"] == "gaussian_blur" and table[25]["name"] == "pink_noise"


def test_converted_dpm_drives_vipnet(converted):
    model, config = build_vipnet(cpm_arch="tiny", dpm=converted, patch_size=(384, 288))
    assert config["dpm_arch"] == "botnet50-vipnet"
    assert not any(p.requires_grad for p in model.dpm.parameters())
    model.eval()
    with torch.no_grad():
        score = model(torch.randint(0, 256, (1, 3, *INPUT_HW), dtype=torch.uint8))
    assert score.shape == (1,) and torch.isfinite(score).all()
    with pytest.raises(ValueError, match="runs only at the input size it was built for"):
        build_vipnet(cpm_arch="tiny", dpm=converted, patch_size=(224, 224))


def test_init_weights_from_a_converted_checkpoint(converted, state):
    vipnet_table = class_table("vipnet")
    model = create_model("botnet50-vipnet", 150)
    report = load_init_weights(model, converted, "botnet50-vipnet", vipnet_table)
    assert report == {"missing": [], "unexpected": []}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    # another type table: same body, the classifier starts afresh
    kadid = create_model("botnet50-vipnet", 125)
    report = load_init_weights(kadid, converted, "botnet50-vipnet", class_table("kadid"))
    assert report["missing"] == ["fc.1.bias", "fc.1.weight"]
    assert torch.equal(kadid.state_dict()["layer4.2.conv2.0.rel_h"],
                       state["layer4.2.conv2.0.rel_h"])

    with pytest.raises(ValueError, match="is a 'botnet50-vipnet' checkpoint; this run trains "
                                         "'botnet50'"):
        load_init_weights(create_model("botnet50", 150), converted, "botnet50")
    with pytest.raises(ValueError, match="does not fit this model: .*mis-shaped.*rel_h"):
        load_init_weights(BoTNetVIPNet(150, input_size=(512, 384)), converted,
                          "botnet50-vipnet")


def test_init_weights_still_takes_torchvision_files(tmp_path):
    donor = create_model("resnet18", 1000)
    path = tmp_path / "resnet18.pth"
    torch.save(donor.state_dict(), path)
    model = create_model("resnet18", 20)
    report = load_init_weights(model, path, "resnet18")
    assert report["missing"] == ["fc.bias", "fc.weight"]
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"],
                       donor.state_dict()["layer4.1.conv2.weight"])


def test_cli_converts_and_refuses_bad_input(tmp_path, original_file):
    runner = CliRunner()
    out = tmp_path / "dpm.pt"
    done = runner.invoke(convert_dpm, [str(original_file), str(out)])
    assert done.exit_code == 0, done.output
    assert "botnet50-vipnet, 150 classes (30 types), input 384x288" in done.output
    assert load_dpm(out)[1]["arch"] == "botnet50-vipnet"

    again = runner.invoke(convert_dpm, [str(original_file), str(out)])
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.output

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    biqa_botnet = tmp_path / "biqa_botnet.pth"
    torch.save(create_model("botnet50", 150).state_dict(), biqa_botnet)
    for source, extra, message in [
            (garbage, [], "cannot read it as a VIPNet DPM file"),
            (biqa_botnet, [], "not the VIPNet authors' BoTNet-50 DPM: it has no 'fc.1.weight'"),
            (out, [], "is already a biqa checkpoint (botnet50-vipnet)"),
            (original_file, ["--distortions", "kadid"], "classifies 150 classes, but "
                                                        "--distortions 'kadid' gives 25 types")]:
        target = tmp_path / "refused.pt"
        result = runner.invoke(convert_dpm, [str(source), str(target), *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not target.exists()
