"""The forward pass shared by the ResNet-shaped backbones (biqa's ResNets and BoTNet, the
VIPNet authors' BoTNet): a stem, four stages, a head.  Torch only, so both model modules
import it without importing each other."""

from __future__ import annotations

import torch
from torch import nn


class FourStages(nn.Module):
    """``forward_features`` (the map after each of ``layer1..4``) and ``forward`` for a module
    with torchvision's stem names (``conv1``, ``bn1``, ``relu``, ``maxpool``) and a
    ``forward_head``."""

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x)[-1])
