"""VIPNet: a content branch, a distortion branch and a transformer that lets them interact.

* Content perception (CPM): an ImageNet backbone, frozen; its four stage maps are
  each projected by a trainable 1x1 convolution (stages 1-3 to half their
  channels, the last to what is left of its own width) and pooled to the grid of
  the last stage, then concatenated.
* Distortion perception (DPM): a ``biqa-train-dpm`` checkpoint, frozen; its last
  stage map.  Without a checkpoint the branch is trained from scratch.
* Interaction: the concatenated maps become tokens (1x1 patch embedding to 128
  dims), a CLS token and learned positions are added, two pre-norm transformer
  blocks (16 heads of 64 dims, MLP x4, dropout 0.4) mix them, and a linear head
  reads the score from the normalised CLS token.

Frozen means ``requires_grad=False`` *and* BatchNorm kept in eval mode even when
the parent is put in ``train()``: the published code let the running statistics
of its frozen branches drift during fine-tuning, which silently changes them.

The model takes uint8 RGB patches (B, 3, H, W) and does its own normalisation
(ImageNet statistics for the CPM, YCbCr with the DPM checkpoint's statistics for
the DPM), so training, evaluation and ``biqa-score`` cannot disagree about it.
Its output is a quality score, higher = better, in standardised training units.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import YCBCR_MEAN, YCBCR_STD, dpm_input
from .models import create_model, load_torchvision_weights
from .pretrain import load_dpm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_PATCH_SIZE = (384, 288)  # (width, height)



class FrozenBranch(nn.Module):
    """A backbone whose weights and BatchNorm statistics never change: no gradients,
    always in eval mode, run without autograd bookkeeping."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenBranch":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return self.backbone.forward_features(x)


class TrainableBranch(nn.Module):
    """A backbone trained with the rest (the distortion branch without a DPM)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.forward_features(x)


def side_channels(stage_channels: list[int]) -> list[int]:
    """Projected widths of the CPM stages: half of each early stage, and for the last
    what remains of its own width (VIPNet: 128+256+512+1152 = 2048 for ResNet-50)."""
    early = [c // 2 for c in stage_channels[:-1]]
    return early + [max(stage_channels[-1] - sum(early), stage_channels[-1] // 2)]


class MultiScaleContent(nn.Module):
    """Trainable 1x1 projections of the CPM's stage maps, pooled to one grid and stacked."""

    def __init__(self, stage_channels: list[int], grid_hw: tuple[int, int]):
        super().__init__()
        self.grid_hw = grid_hw
        self.sides = nn.ModuleList(nn.Conv2d(c, o, 1, bias=False)
                                   for c, o in zip(stage_channels, side_channels(stage_channels)))
        self.out_channels = sum(side_channels(stage_channels))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.adaptive_avg_pool2d(side(m), self.grid_hw)
                          for side, m in zip(self.sides, maps)], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention with its own head width (16 x 64 over 128-dim tokens)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN x), then x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Interaction(nn.Module):
    """Tokens from the stacked content+distortion maps, a CLS token, and the blocks."""

    def __init__(self, channels: int, grid_hw: tuple[int, int], dim: int, depth: int,
                 heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.embed = nn.Conv2d(channels, dim, 1)
        bound = (6.0 / (3 + dim)) ** 0.5  # VIPNet's Xavier-style range for the embedding
        nn.init.uniform_(self.embed.weight, -bound, bound)
        nn.init.zeros_(self.embed.bias)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, grid_hw[0] * grid_hw[1] + 1, dim))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, dim_head, dropout) for _ in range(depth)))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(maps).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1)
        return self.blocks(self.dropout(tokens + self.pos))


def _buffer(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)


class VIPNet(nn.Module):
    """The fine-tuning model; ``forward(uint8 RGB patches) -> quality (B,)``."""

    def __init__(self, cpm: nn.Module, dpm: nn.Module, patch_size: tuple[int, int],
                 freeze_dpm: bool, dpm_mean=YCBCR_MEAN, dpm_std=YCBCR_STD, embed_dim: int = 128,
                 depth: int = 2, heads: int = 16, dim_head: int = 64, dropout: float = 0.4):
        super().__init__()
        self.cpm = FrozenBranch(cpm)
        self.dpm = FrozenBranch(dpm) if freeze_dpm else TrainableBranch(dpm)
        self.register_buffer("rgb_mean", _buffer(IMAGENET_MEAN))
        self.register_buffer("rgb_std", _buffer(IMAGENET_STD))
        # the DPM's statistics travel in the state dict (buffers) and, as plain floats, to
        # dpm_input, whose constants are then made once per device (no sync per forward)
        self.register_buffer("dpm_mean", _buffer(dpm_mean))
        self.register_buffer("dpm_std", _buffer(dpm_std))
        self._dpm_stats = (tuple(map(float, dpm_mean)), tuple(map(float, dpm_std)))
        grid_hw, dpm_channels = self._probe(patch_size)
        self.content = MultiScaleContent(cpm.feature_channels, grid_hw)
        self.interaction = Interaction(self.content.out_channels + dpm_channels, grid_hw,
                                       embed_dim, depth, heads, dim_head, dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, 1)

    def _probe(self, patch_size: tuple[int, int]) -> tuple[tuple[int, int], int]:
        """Grid of the CPM's last stage and the DPM's last-stage width at this patch size."""
        w, h = patch_size
        with torch.no_grad():
            probe = torch.zeros(1, 3, h, w)
            grid_hw = tuple(self.cpm.backbone.forward_features(probe)[-1].shape[-2:])
            was_training = self.dpm.backbone.training
            self.dpm.backbone.eval()  # a probe must not touch BatchNorm statistics
            dpm_channels = self.dpm.backbone.forward_features(probe)[-1].shape[1]
            self.dpm.backbone.train(was_training)
        return grid_hw, dpm_channels

    def _inputs(self, rgb_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised RGB for the CPM and normalised YCbCr for the DPM."""
        rgb = (rgb_uint8.float() / 255.0 - self.rgb_mean) / self.rgb_std
        return rgb, dpm_input(rgb_uint8, *self._dpm_stats)

    def forward(self, rgb_uint8: torch.Tensor) -> torch.Tensor:
        rgb, ycbcr = self._inputs(rgb_uint8)
        content = self.content(self.cpm(rgb))
        distortion = F.adaptive_avg_pool2d(self.dpm(ycbcr)[-1], content.shape[-2:])
        tokens = self.interaction(torch.cat([content, distortion], dim=1))
        return self.head(self.norm(tokens[:, 0])).squeeze(1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


# ------------------------------------------------------------------ construction

def dpm_architecture(config: dict) -> nn.Module:
    """An untrained backbone shaped as a DPM checkpoint's config describes."""
    return create_model(config["arch"], int(config["num_classes"]),
                        input_size=tuple(config["input_size"]))


def dpm_statistics(config: dict | None) -> tuple[tuple, tuple]:
    """(mean, std) of the DPM's YCbCr input, from its checkpoint config when it has them."""
    norm = (config or {}).get("normalisation") or {}
    if isinstance(norm, dict) and "mean" in norm and "std" in norm:
        return tuple(map(float, norm["mean"])), tuple(map(float, norm["std"]))
    return YCBCR_MEAN, YCBCR_STD


def vipnet_from_config(config: dict) -> VIPNet:
    """An untrained VIPNet with the architecture ``config`` describes (no weight loading:
    fill it with ``load_state_dict``)."""
    cpm = create_model(config["cpm_arch"])
    dpm_config = config.get("dpm_config")
    dpm = dpm_architecture(dpm_config) if dpm_config else create_model(config["dpm_arch"])
    mean, std = dpm_statistics(dpm_config)
    head = config["head"]
    return VIPNet(cpm, dpm, tuple(config["patch_size"]), freeze_dpm=dpm_config is not None,
                  dpm_mean=mean, dpm_std=std, embed_dim=head["embed_dim"], depth=head["depth"],
                  heads=head["heads"], dim_head=head["dim_head"], dropout=head["dropout"])


def build_vipnet(cpm_arch: str = "resnet50", cpm_weights: str | Path | None = None,
                 dpm: str | Path | None = None, dpm_arch: str = "botnet50",
                 patch_size: tuple[int, int] = DEFAULT_PATCH_SIZE, embed_dim: int = 128,
                 depth: int = 2, heads: int = 16, dim_head: int = 64,
                 dropout: float = 0.4) -> tuple[VIPNet, dict]:
    """A VIPNet ready to fine-tune, and the config that rebuilds its architecture.

    ``cpm_weights``: a torchvision-format ImageNet state dict for the CPM (required
    for resnet18/50 to be meaningful; the ``tiny`` CPM has none and stays random).
    ``dpm``: a ``biqa-train-dpm`` checkpoint; its architecture comes from the
    checkpoint.  Without it, a ``dpm_arch`` branch is trained from scratch.
    """
    cpm_model = create_model(cpm_arch)
    if cpm_weights is not None:
        load_torchvision_weights(cpm_model, str(cpm_weights))
    dpm_config = None
    if dpm is not None:
        dpm_model, dpm_config = load_dpm(dpm, "cpu")
        dpm_arch = dpm_config["arch"]
    else:
        dpm_model = create_model(dpm_arch)
    mean, std = dpm_statistics(dpm_config)
    head = {"embed_dim": embed_dim, "depth": depth, "heads": heads, "dim_head": dim_head,
            "dropout": dropout}
    model = VIPNet(cpm_model, dpm_model, patch_size, freeze_dpm=dpm is not None, dpm_mean=mean,
                   dpm_std=std, **head)
    config = {"cpm_arch": cpm_arch, "cpm_weights": None if cpm_weights is None else str(cpm_weights),
              "dpm_arch": dpm_arch, "dpm": None if dpm is None else str(dpm),
              "dpm_config": dpm_config, "patch_size": list(patch_size), "head": head}
    return model, config
