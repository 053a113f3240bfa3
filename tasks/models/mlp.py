"""A multi-layer perceptron classifier over flattened features."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MLPConfig:
    in_features: int = 64
    num_classes: int = 10
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.0


class MLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_features
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1).float() if not x.is_floating_point() else x.flatten(1)))


def build(**kwargs) -> MLP:
    return MLP(MLPConfig(**kwargs))
