"""``tiny-mixer``: 8x8 patches, one q/v projection pair, mean over tokens (a plugin backbone in one file;
its q_proj and v_proj are what the default --targets attn adapts)."""

from __future__ import annotations

from torch import nn

from fedbench.models.backbones import Backbone


class TinyMixer(Backbone):
    arch = {"dim": 16}
    about = "8x8 patches, dim 16, one q/v projection pair"

    def __init__(self, num_classes: int, dim: int = 16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, stride=8)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self._make_head(dim, num_classes)

    def features(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, 16, dim)
        return (self.v_proj(t) * self.q_proj(t).sigmoid()).mean(dim=1)
