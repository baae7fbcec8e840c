"""DPM weights from outside a biqa-train-dpm run: the VIPNet authors' released DPM
(``convert_vipnet_checkpoint``: their file -> a biqa checkpoint) and ``--init-weights``
(``load_init_weights``: a biqa DPM checkpoint or a torchvision ImageNet state dict).

The authors' pre-training code (``XiaoqiWang/VIPNet``, ``pretraining/``) saves the model in
one of two wrappers -- ``multi_gpu_train.py``: ``{"state_dict": ..., "epoch", "arch",
"best_acc", "optimizer"}`` with DataParallel/DDP's ``module.`` prefix on every key (their
published ``botnet_model_best.pth.tar``); ``train.py``: ``{"model_state_dict": ...,
"global_epoch", "optimizer_state_dict", "best_acc"}`` -- or a bare state dict may have been
saved by hand.  All three are read; the prefix is dropped, as their own loader does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from biqa.distortions import resolve_distortions

from .botnet_vipnet import ARCH, MAP_STRIDE, VIPNET_HEADS, BoTNetVIPNet
from .data import LEVELS, NORMALISATION
from .models import load_subset, load_torchvision_weights, read_torch_file, write_torch_file

log = logging.getLogger(__name__)

VIPNET_WRAPPERS = ("state_dict", "model_state_dict")  # multi_gpu_train.py, train.py
_SHOWN = 8  # keys listed per kind of mismatch in an error


def class_table(distortions: str = "vipnet") -> list[dict]:
    """[{id, name, class_base}] for a ``--distortions`` spec, as ``biqa-gen`` numbers the
    classes (class = index * 5 + level - 1).  For ``vipnet`` (ids 1..30 in order) this is
    VIPNet's own label, (type - 1) * 5 + level - 1; their type 30 was "lossy compression"
    from files they distributed, biqa's type 30 (AVIF) stands in for it."""
    return [{"id": spec.id, "name": spec.name, "class_base": LEVELS * i}
            for i, spec in enumerate(resolve_distortions(distortions))]


def _is_biqa_checkpoint(obj) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("config"), dict)
            and isinstance(obj.get("model"), dict))


def read_vipnet_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict without ``module.`` prefixes, {epoch, best_acc, arch} where the file has
    them) of a file written by the VIPNet authors' pre-training code."""
    what = "a VIPNet DPM file (torch.save of a state dict)"
    obj = read_torch_file(path, what)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not {what}, it holds a {type(obj).__name__}")
    if _is_biqa_checkpoint(obj):
        raise ValueError(f"{path} is already a biqa checkpoint ({obj['config'].get('arch')}); "
                         "use it as it is")
    wrapper = next((key for key in VIPNET_WRAPPERS if isinstance(obj.get(key), dict)), None)
    state = obj[wrapper] if wrapper else obj
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not {what}: expected tensors under "
                         f"{' or '.join(VIPNET_WRAPPERS)} or at the top, found keys "
                         f"{sorted(map(str, obj))[:_SHOWN]}")
    meta = {}
    if wrapper:
        for key, name in (("epoch", "epoch"), ("global_epoch", "epoch"), ("best_acc", "best_acc"),
                          ("arch", "arch")):
            value = obj.get(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float, str)):
                meta[name] = value
    return {str(k).removeprefix("module."): v for k, v in state.items()}, meta


def _shape(state: dict, key: str, what: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"{what} is not the VIPNet authors' BoTNet-50 DPM: it has no {key!r} "
                         f"(its first keys: {list(state)[:_SHOWN]})")
    return tuple(state[key].shape)


def _mismatch(expected: dict, found: dict) -> str:
    """'' when ``found`` has exactly the keys and shapes of ``expected``, else what differs."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} (expected {tuple(v.shape)})"
              for k, v in expected.items() if k in found and found[k].shape != v.shape]
    parts = [f"{len(keys)} {kind}: {keys[:_SHOWN]}{' ...' if len(keys) > _SHOWN else ''}"
             for kind, keys in (("missing", missing), ("unexpected", unexpected),
                                ("mis-shaped", shapes)) if keys]
    return "; ".join(parts)


def vipnet_dpm_from_state_dict(state: dict[str, torch.Tensor], what: str) -> BoTNetVIPNet:
    """The ``botnet50-vipnet`` model a state dict describes (classes from ``fc.1``, input size
    and heads from the first block's position embeddings), loaded with strict checking."""
    num_classes = _shape(state, "fc.1.weight", what)[0]
    rel_h = _shape(state, "layer4.0.conv2.0.rel_h", what)  # (1, heads, d, 1, W/16)
    rel_w = _shape(state, "layer4.0.conv2.0.rel_w", what)  # (1, heads, d, H/16, 1)
    if len(rel_h) != 5 or len(rel_w) != 5:
        raise ValueError(f"{what}: position embeddings of shape {rel_h} and {rel_w}, "
                         "expected (1, heads, d, 1, W/16) and (1, heads, d, H/16, 1)")
    if rel_h[1] != VIPNET_HEADS:
        raise ValueError(f"{what} has {rel_h[1]} attention heads; {ARCH} is the published "
                         f"configuration, {VIPNET_HEADS} heads")
    input_size = (rel_h[4] * MAP_STRIDE, rel_w[3] * MAP_STRIDE)
    model = BoTNetVIPNet(num_classes, input_size=input_size)
    problems = _mismatch(model.state_dict(), state)
    if problems:
        raise ValueError(f"{what} does not match the VIPNet authors' BoTNet-50 ({ARCH}, "
                         f"{num_classes} classes, {input_size[0]}x{input_size[1]} input): "
                         f"{problems}")
    model.load_state_dict(state, strict=True)
    return model


def convert_vipnet_checkpoint(src: str | Path, dst: str | Path,
                              distortions: str = "vipnet") -> dict:
    """Write the VIPNet authors' DPM file ``src`` as a biqa checkpoint ``dst`` (``model`` and
    ``config``, readable with ``weights_only=True``) for ``pretrain.load_dpm``,
    ``biqa-finetune --dpm`` and ``biqa-train-dpm --init-weights``.  ``distortions`` names the
    types it was trained on in class order (default: VIPNet's 30).  Returns the config."""
    state, meta = read_vipnet_state_dict(src)
    model = vipnet_dpm_from_state_dict(state, str(src))
    table = class_table(distortions)
    if LEVELS * len(table) != model.num_classes:
        raise ValueError(f"{src} classifies {model.num_classes} classes, but --distortions "
                         f"{distortions!r} gives {len(table)} types x {LEVELS} levels = "
                         f"{LEVELS * len(table)}")
    config = {"arch": ARCH, "num_classes": model.num_classes,
              "input_size": list(model.input_size), "class_table": table,
              "normalisation": dict(NORMALISATION), "levels": LEVELS,
              "converted_from": {"file": Path(src).name, **meta}}
    write_torch_file(dst, {"model": model.state_dict(), "config": config})
    return config


def load_init_weights(model: nn.Module, path: str | Path, arch: str,
                      class_table: list[dict] | None = None) -> dict[str, list[str]]:
    """``biqa-train-dpm --init-weights``: start from a biqa DPM checkpoint of architecture
    ``arch`` (from biqa-train-dpm, or converted by ``biqa-convert-dpm``), else from a
    torchvision-format ImageNet state dict (``models.load_torchvision_weights``).

    From a DPM checkpoint every parameter must be there with its shape (the input size
    included: it sizes the attention's position tables), except the classifier, which is
    taken only when the checkpoint's ``class_table`` equals this run's (when given) and its
    shape fits.  Returns the model keys left at their initialisation (``missing``) and the
    file keys not used (``unexpected``)."""
    obj = read_torch_file(path, "a biqa DPM checkpoint or a torchvision-format state dict")
    if not _is_biqa_checkpoint(obj):
        return load_torchvision_weights(model, str(path))
    config, source = obj["config"], obj["model"]
    if config.get("arch") != arch:
        raise ValueError(f"{path} is a {config.get('arch')!r} checkpoint; this run trains "
                         f"{arch!r} (pass --arch {config.get('arch')})")
    same_classes = class_table is None or config.get("class_table") == class_table
    target = model.state_dict()
    classifier = {k for k in target if k.startswith("fc.")}
    loaded = {k: v for k, v in source.items() if k in target and v.shape == target[k].shape
              and (k not in classifier or same_classes)}
    body = {k: v for k, v in target.items() if k not in classifier}
    problems = _mismatch(body, {k: v for k, v in source.items() if k not in classifier})
    if problems:
        raise ValueError(f"{path} ({config.get('arch')}, input {config.get('input_size')}) does "
                         f"not fit this model: {problems}")
    report = load_subset(model, loaded, source)
    log.info("initialised from %s (%s); left at init: %s", path, config.get("arch"),
             report["missing"])
    return report
