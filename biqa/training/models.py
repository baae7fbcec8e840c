"""Backbones for the distortion perception model (DPM): ``tiny``, ``resnet18``, ``resnet50``
and ``botnet50``, written in plain torch (no torchvision) with torchvision's parameter names,
so ImageNet weights in torchvision's file format load by name.

Every model exposes the same small surface, which the fine-tuning code builds on:

* ``forward_features(x) -> list[Tensor]``: the feature map after each of the four stages;
* ``feature_channels``: the channels of those maps;
* ``forward_head(last_map) -> Tensor``: logits (or pooled features when ``num_classes == 0``);
* ``forward(x) = forward_head(forward_features(x)[-1])``;
* ``num_classes``.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from biqa.shards.writer import atomic_write

from ._stages import FourStages
from .botnet_vipnet import ARCH as VIPNET_ARCH, BoTNetVIPNet

log = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = (384, 288)  # (width, height), VIPNet's 0.75 x 512x384


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """The projection shortcut, named ``downsample.0/1`` as torchvision does."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3).  ``spatial`` replaces the 3x3 convolution:
    BoTNet puts self-attention (and an average pool for stride 2) there."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, spatial: nn.Module | None = None):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = spatial if spatial is not None else conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def _relative_to_absolute_index(n: int) -> torch.Tensor:
    """index[i, j] = j - i + n - 1: where the offset of key j from query i sits in a table of
    the 2n-1 relative offsets."""
    pos = torch.arange(n)
    return pos[None, :] - pos[:, None] + n - 1


def _resized_table(table: torch.Tensor, n: int) -> torch.Tensor:
    """A (2m-1, d) relative-offset table stretched to 2n-1 offsets, so a model built for one
    input size still runs (approximately) at another, e.g. fine-tuning on patches."""
    if table.shape[0] == 2 * n - 1:
        return table
    return F.interpolate(table.t()[None], size=2 * n - 1, mode="linear",
                         align_corners=True)[0].t()


class RelPosSelfAttention(nn.Module):
    """Multi-head self-attention over a 2-D feature map with relative position logits
    (BoTNet, after Bello et al. / Ramachandran et al.): the logit of query (y, x) and key
    (y', x') is q·k/sqrt(d) + q·r_h[y'-y] + q·r_w[x'-x], so positions enter only as
    offsets and non-square maps (9x12 at 288x384 input) are handled directly."""

    def __init__(self, dim: int, feat_hw: tuple[int, int], heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"channels {dim} not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        h, w = feat_hw
        scale = self.head_dim ** -0.5
        self.rel_height = nn.Parameter(torch.randn(2 * h - 1, self.head_dim) * scale)
        self.rel_width = nn.Parameter(torch.randn(2 * w - 1, self.head_dim) * scale)
        # Buffers (not in the state dict) so they live on the model's device: building them
        # per forward would copy them host-to-device on every step.
        self.register_buffer("index_h", _relative_to_absolute_index(h), persistent=False)
        self.register_buffer("index_w", _relative_to_absolute_index(w), persistent=False)

    def _rel_logits(self, q: torch.Tensor, table: torch.Tensor,
                    index: torch.Tensor) -> torch.Tensor:
        """q: (B, rows, n, d) -> logits (B, rows, n, n) along the last spatial axis."""
        n = q.shape[2]
        rel = q @ _resized_table(table, n).to(q.dtype).t()  # (B, rows, n, 2n-1)
        if index.shape[0] != n:  # another input size than the model was built for
            index = _relative_to_absolute_index(n).to(q.device)
        return rel.gather(-1, index.expand(*rel.shape[:2], n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b * self.heads, 3, self.head_dim, h * w).unbind(1)
        q = q * self.head_dim ** -0.5
        logits = q.transpose(1, 2) @ k  # (BH, hw, hw)
        q_map = q.transpose(1, 2).reshape(-1, h, w, self.head_dim)
        rel_w = self._rel_logits(q_map, self.rel_width, self.index_w)  # (BH, h, w, w)
        rel_h = self._rel_logits(q_map.transpose(1, 2), self.rel_height,
                                 self.index_h)  # (BH, w, h, h)
        rel = rel_w[:, :, :, None, :] + rel_h.transpose(1, 2)[:, :, :, :, None]
        logits = logits + rel.reshape(-1, h * w, h * w)
        out = v @ logits.softmax(dim=-1).transpose(1, 2)  # (BH, d, hw)
        return out.reshape(b, c, h, w)


class ResNet(FourStages):
    """ResNet with torchvision's parameter names (``conv1``, ``bn1``, ``layer1..4``, ``fc``).
    ``attention_input_hw`` turns the last stage into BoTNet's: attention replaces the 3x3
    convolution of its three bottlenecks."""

    def __init__(self, block: type, layers: list[int], num_classes: int,
                 attention_input_hw: tuple[int, int] | None = None, heads: int = 16,
                 head_pool: int = 1, dropout: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._cin = 64
        widths = (64, 128, 256, 512)
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2)
        if attention_input_hw is None:
            self.layer4 = self._make_layer(block, widths[3], layers[3], 2)
        else:
            self.layer4 = self._make_attention_layer(widths[3], layers[3], attention_input_hw,
                                                     heads)
        self.feature_channels = [w * block.expansion for w in widths]
        self.head_pool = nn.AdaptiveAvgPool2d(head_pool)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        head_in = self.feature_channels[-1] * head_pool * head_pool
        self.fc = nn.Linear(head_in, num_classes) if num_classes > 0 else None
        _init_weights(self)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(block(self._cin, planes, stride if i == 0 else 1))
            self._cin = planes * block.expansion
        return nn.Sequential(*layers)

    def _make_attention_layer(self, planes: int, blocks: int, input_hw: tuple[int, int],
                              heads: int) -> nn.Sequential:
        """BoTNet's stage 5: the first block attends at the stage-4 resolution, then average
        pools by 2 (the stride), the others attend at the halved resolution."""
        h, w = input_hw
        layers = []
        for i in range(blocks):
            attention = RelPosSelfAttention(planes, (h, w), heads)
            spatial = nn.Sequential(attention, nn.AvgPool2d(2, 2)) if i == 0 else attention
            layers.append(Bottleneck(self._cin, planes, 2 if i == 0 else 1, spatial))
            self._cin = planes * Bottleneck.expansion
            if i == 0:
                h, w = h // 2, w // 2
        return nn.Sequential(*layers)

    def forward_head(self, last_map: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(self.head_pool(last_map), 1)
        return pooled if self.fc is None else self.fc(self.dropout(pooled))


def _init_weights(model: nn.Module) -> None:
    """He init for convolutions (as torchvision), unit BN scale, small linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


class TinyNet(nn.Module):
    """A four-stage CNN for CPU smoke runs, tests and benchmarks; same interface as the
    ResNets.  A full-resolution 3x3 stem (16 channels) comes first, then four stages of one
    stride-2 3x3 convolution each (16-32-64-128 channels).  The stem is there because
    distortions live at the pixel: a first layer that already subsamples sees only every
    other pixel, so it cannot count pixelation's repeated rows or a JPEG block's edge --
    without it the toy chain's DPM reached top-1 0.45 on unseen contents, with it 0.75
    (benchmarks/bench_chain.py, docs/finetune.md)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.feature_channels = [16, 32, 64, 128]
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(inplace=True))
        stages, cin = [], 16
        for cout in self.feature_channels:
            stages.append(nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else None
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward_head(self, last_map: torch.Tensor) -> torch.Tensor:
        pooled = last_map.mean(dim=(2, 3))
        return pooled if self.fc is None else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x)[-1])


def _stage4_hw(input_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the stage-4 map (stride 16) for a (width, height) input."""
    w, h = input_size
    for _ in range(4):  # conv1, maxpool, layer2, layer3: each ceil-halves
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def _botnet50(num_classes: int, input_size: tuple[int, int] = DEFAULT_INPUT_SIZE,
              heads: int = 16) -> ResNet:
    """VIPNet's DPM: BoTNet-50 with 16 heads, a 2x2 average pool and dropout 0.4 before the
    classifier (as VIPNet's pre-training)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, attention_input_hw=_stage4_hw(input_size),
                  heads=heads, head_pool=2, dropout=0.4)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "tiny": lambda num_classes, **kw: TinyNet(num_classes),
    "resnet18": lambda num_classes, **kw: ResNet(BasicBlock, [2, 2, 2, 2], num_classes),
    "resnet50": lambda num_classes, **kw: ResNet(Bottleneck, [3, 4, 6, 3], num_classes),
    "botnet50": _botnet50,
    VIPNET_ARCH: BoTNetVIPNet,  # the VIPNet authors' BoTNet, for their released DPM
}

ARCHS = tuple(_REGISTRY)


def create_model(name: str, num_classes: int = 0, **kwargs) -> nn.Module:
    """Build a backbone by name.  ``num_classes=0`` gives a feature extractor whose
    ``forward`` returns pooled features.  ``botnet50`` takes ``input_size=(W, H)`` (sizes its
    relative-position tables; other sizes still run) and ``heads``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    return _REGISTRY[name](num_classes, **kwargs)


def write_torch_file(path, obj) -> None:
    """``torch.save`` through a temporary file and a rename (a crash or a full disk never
    leaves a torn file).  torch reports a failed write as RuntimeError; it becomes the
    OSError it is."""
    def save(f):
        try:
            torch.save(obj, f)
        except RuntimeError as exc:
            raise OSError(f"cannot write {path}: {exc}") from None

    atomic_write(path, save)


def read_torch_file(path, what: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)``, with a ``ValueError`` naming the file and
    what was expected when it is missing, truncated or not a torch file at all."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as exc:  # unpickling raises many types; all mean "not that file"
        # torch's own message for a weights-only refusal suggests weights_only=False, which
        # would run whatever code the file carries: never pass that advice on.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights_only" in str(exc):
            reason = ("it holds objects other than tensors and plain containers, which "
                      "biqa never unpickles (it is not a file biqa wrote, or it was changed)")
        raise ValueError(f"{path}: cannot read it as {what}: {type(exc).__name__}: {reason}") \
            from None


def load_saved_weights(model: nn.Module, state_dict: dict, path) -> None:
    """``model.load_state_dict`` for a file biqa wrote, with a ``ValueError`` when the
    weights do not fit (another architecture, or a file from an older biqa: the ``tiny``
    CNN has since gained a full-resolution stem, so older tiny checkpoints need retraining)."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()
        raise ValueError(f"{path}: its weights do not fit this biqa's model "
                         f"({' '.join(line.strip() for line in reason[:3])[:300]}); was it "
                         "written by another biqa version? (tiny checkpoints from before the tiny "
                         "CNN had its stem must be retrained)") from None


def load_subset(model: nn.Module, loaded: dict, source: dict) -> dict[str, list[str]]:
    """Load ``loaded`` (the usable part of the state dict ``source``) into ``model``; returns
    the model keys left at their initialisation and the source keys not used."""
    model.load_state_dict(loaded, strict=False)
    return {"missing": sorted(set(model.state_dict()) - set(loaded)),
            "unexpected": sorted(set(source) - set(loaded))}


def load_torchvision_weights(model: nn.Module, path: str) -> dict[str, list[str]]:
    """Load a torchvision-format ImageNet state dict (``resnet50-*.pth``) by parameter name.

    Every parameter of ``model`` outside the classifier and BoTNet's attention must be found
    with the right shape (else ``ValueError``: the file is for another architecture).  The
    classifier is loaded only when its shape matches.  Returns the model keys left at their
    initialisation (``missing``) and the file keys not used (``unexpected``)."""
    if isinstance(model, TinyNet):
        raise ValueError("the tiny model has no torchvision counterpart")
    source = read_torch_file(path, "a torchvision-format state dict")
    if not isinstance(source, dict):
        raise ValueError(f"{path}: not a state dict")
    source = source.get("state_dict", source)
    target = model.state_dict()
    optional = {k for k in target if k.startswith("fc.") or ".rel_" in k or ".qkv." in k}
    loaded, problems = {}, []
    for key, value in target.items():
        found = source.get(key)
        if found is not None and found.shape == value.shape:
            loaded[key] = found
        elif key not in optional:
            problems.append(key if found is None else
                            f"{key} (shape {tuple(found.shape)} != {tuple(value.shape)})")
    if problems:
        raise ValueError(f"{path}: {len(problems)} required parameters missing or mis-shaped, "
                         f"e.g. {problems[:5]}")
    report = load_subset(model, loaded, source)
    log.info("loaded %d tensors from %s; left at init: %s; unused: %s", len(loaded), path,
             report["missing"], report["unexpected"])
    return report
