"""``botnet50-vipnet``: the VIPNet authors' BoTNet-50 DPM, module for module, so that a state
dict saved by their pre-training code (``XiaoqiWang/VIPNet``, ``pretraining/BoTNet.py``; the
same class is in ``models/BoTNet.py``) loads key for key with strict checking.

It differs from biqa's ``botnet50`` (``models.py``) in ways no weight conversion can bridge:

* attention: separate ``query``/``key``/``value`` 1x1 convolutions *with* bias; absolute
  position embeddings ``rel_h`` (one per column) + ``rel_w`` (one per row) -- the original's
  names, swapped against the axes they run along; the logit of query position i for key
  position j is ``q_i·k_j + p_i·q_j`` (the embedding of the *query's* position against the
  *key's* query vector, as the original computes it), and no 1/sqrt(d) scaling;
* the projection shortcut is named ``shortcut`` and its convolution has a bias;
* the head is a 2x2 average pool, then ``fc = Sequential(Dropout(0.4), Linear(8192, n))``;
* initialisation as the original's ``weights_init`` (He-normal, fan-in, for every
  convolution and linear weight; default biases; BatchNorm bias 0) and ``randn`` embeddings.

Input size.  The embeddings are sized for one feature map: the original computes it as
``int(H/16) x int(W/16)`` (and half that after the first block), while the network produces
``ceil(H/16)``, and the first attention block halves its map with a 2x2 average pool (odd
sizes round down) but its shortcut with a strided convolution (odd sizes round up); so the
original runs only when both sides are multiples of 32, and only at the size it was built
for (anything else fails inside the network).  Here the same holds, with clear errors: the
constructor refuses a size that is not a multiple of 32, and ``forward`` refuses a feature
map the embeddings were not built for.  The published DPM was
trained at 384x288 (W x H; ``resolution=(384*0.75, 512*0.75)`` as (H, W)), so fine-tuning
patches must be 384x288 too -- as in VIPNet, whose DPM also only ever sees 288x384 patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._stages import FourStages

ARCH = "botnet50-vipnet"
VIPNET_INPUT_SIZE = (384, 288)  # (width, height) of the published DPM
VIPNET_HEADS = 16
MAP_STRIDE = 16  # the attention stage's input is 1/16 of the image on each side


class MHSA(nn.Module):
    """The original's multi-head self-attention over a fixed (h, w) feature map."""

    def __init__(self, dim: int, map_hw: tuple[int, int], heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"channels {dim} not divisible by heads {heads}")
        self.heads = heads
        self.map_hw = map_hw
        self.query = nn.Conv2d(dim, dim, 1)
        self.key = nn.Conv2d(dim, dim, 1)
        self.value = nn.Conv2d(dim, dim, 1)
        h, w = map_hw
        head_dim = dim // heads
        # shapes (and names) as saved by the original: rel_h varies along the width,
        # rel_w along the height; their broadcast sum is one embedding per position
        self.rel_h = nn.Parameter(torch.randn(1, heads, head_dim, 1, w))
        self.rel_w = nn.Parameter(torch.randn(1, heads, head_dim, h, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if (h, w) != self.map_hw:
            raise ValueError(
                f"{ARCH} (the VIPNet authors' BoTNet) has position embeddings for a "
                f"{self.map_hw[0]}x{self.map_hw[1]} feature map here, got {h}x{w}: it runs only "
                "at the input size it was built for (a converted DPM: its config's "
                "input_size, 384x288 for the published one)")
        split = (b, self.heads, c // self.heads, h * w)
        q, k, v = (conv(x).reshape(split) for conv in (self.query, self.key, self.value))
        position = (self.rel_h + self.rel_w).reshape(1, *split[1:])  # (1, heads, d, hw)
        logits = q.transpose(2, 3) @ k + position.transpose(2, 3) @ q  # [i, j]: q_i·k_j + p_i·q_j
        out = v @ logits.softmax(dim=-1).transpose(2, 3)
        return out.reshape(b, c, h, w)


class Bottleneck(nn.Module):
    """The original's bottleneck: ``conv2`` is a 3x3 convolution, or ``Sequential(MHSA)``
    (+ a 2x2 average pool when the block strides); ``shortcut`` projects with a biased 1x1
    convolution when the shape changes and is empty otherwise."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, attention_hw: tuple[int, int] | None,
                 heads: int):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        if attention_hw is None:
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        else:
            spatial = [MHSA(planes, attention_hw, heads)]
            if stride == 2:
                spatial.append(nn.AvgPool2d(2, 2))
            self.conv2 = nn.Sequential(*spatial)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class BoTNetVIPNet(FourStages):
    """The original ``ResNet(Bottleneck, [3, 4, 6, 3])`` with attention in ``layer4``, with
    biqa's backbone surface (``forward_features``, ``feature_channels``, ``forward_head``,
    ``num_classes``; ``num_classes=0``: no ``fc``, ``forward`` returns the 2x2-pooled
    features, 8192 values)."""

    def __init__(self, num_classes: int, input_size: tuple[int, int] = VIPNET_INPUT_SIZE,
                 heads: int = VIPNET_HEADS):
        super().__init__()
        width, height = input_size
        if width % (2 * MAP_STRIDE) or height % (2 * MAP_STRIDE) or min(width, height) <= 0:
            raise ValueError(
                f"{ARCH}: input size {width}x{height} must be a multiple of 32 on both sides, "
                "as in the original (position embeddings sized int(side/16) for a "
                "ceil(side/16) feature map; a 2x2 pool beside a strided shortcut)")
        self.num_classes = num_classes
        self.input_size = (width, height)
        self.feature_channels = [256, 512, 1024, 2048]
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._cin = 64
        self.layer1 = self._make_layer(64, 3, 1, None, heads)
        self.layer2 = self._make_layer(128, 4, 2, None, heads)
        self.layer3 = self._make_layer(256, 6, 2, None, heads)
        self.layer4 = self._make_layer(512, 3, 2, (height // MAP_STRIDE, width // MAP_STRIDE),
                                       heads)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc = (nn.Sequential(nn.Dropout(0.4), nn.Linear(4 * self.feature_channels[-1],
                                                            num_classes))
                   if num_classes > 0 else None)
        _init_like_original(self)

    def _make_layer(self, planes: int, blocks: int, stride: int,
                    attention_hw: tuple[int, int] | None, heads: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            block_stride = stride if i == 0 else 1
            layers.append(Bottleneck(self._cin, planes, block_stride, attention_hw, heads))
            self._cin = planes * Bottleneck.expansion
            if attention_hw is not None and block_stride == 2:  # the average pool halves it
                attention_hw = (attention_hw[0] // 2, attention_hw[1] // 2)
        return nn.Sequential(*layers)

    def forward_head(self, last_map: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(self.avgpool(last_map), 1)
        return pooled if self.fc is None else self.fc(pooled)


def _init_like_original(model: nn.Module) -> None:
    """The original's ``weights_init``: He-normal (fan-in) weights for every convolution and
    linear layer, their biases left at torch's default, BatchNorm bias 0 and scale 1."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
