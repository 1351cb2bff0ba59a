"""Normalisation and training augmentation as batched tensor ops on the training device.

``spec`` reproduces the pFedLoRA authors' pipeline (spec A.1): Normalize -> RandomHorizontalFlip ->
RandomErasing(p=0.5, scale 0.04-0.2, ratio 0.5-2, value 0) -> RandomCrop(32, padding=4). Because
padding and erasing happen after normalisation, both fill with 0, i.e. the channel mean. With
scale <= 0.2 and ratio <= 2 the erased box always fits a 32x32 image on torchvision's first try, so
sampling it once per image is the same distribution. ``flip-crop`` drops the erasing; ``none`` trains
on normalised images only.
"""

from __future__ import annotations

import math

import torch

AUGMENTATIONS = ("spec", "flip-crop", "none")


class BatchTransform:
    def __init__(self, mean, std, device: torch.device, dtype=torch.float32, channels_last: bool = False):
        self.mean = torch.tensor(mean, device=device, dtype=dtype) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=device, dtype=dtype) * 255.0)
        self.dtype = dtype
        self.channels_last = channels_last

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float NHWC."""
        return (x_u8.to(self.dtype) - self.mean) * self.inv_std

    def to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW view; a permuted NHWC tensor already is channels-last in memory."""
        x = x.permute(0, 3, 1, 2)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def eval(self, x_u8: torch.Tensor) -> torch.Tensor:
        return self.to_nchw(self.normalize(x_u8))

    def train(self, x_u8: torch.Tensor, mode: str, g: torch.Generator) -> torch.Tensor:
        x = self.normalize(x_u8)
        if mode != "none":
            x = hflip(x, g)
            if mode == "spec":
                x = random_erase(x, g)
            x = random_crop(x, g, pad=4)
        return self.to_nchw(x)


def _rand(n, g, device):
    return torch.rand(n, generator=g, device=device)


def hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = _rand(x.shape[0], g, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(2), x)


def random_erase(x: torch.Tensor, g: torch.Generator, p: float = 0.5, scale=(0.04, 0.2),
                 ratio=(0.5, 2.0)) -> torch.Tensor:
    n, H, W, _ = x.shape
    dev = x.device
    area = H * W * (scale[0] + (scale[1] - scale[0]) * _rand(n, g, dev))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(n, g, dev)
    r = torch.exp(log_r)
    h = torch.sqrt(area * r).round().long()
    w = torch.sqrt(area / r).round().long()
    fits = (h < H) & (w < W)
    top = (_rand(n, g, dev) * (H - h + 1).clamp(min=1)).floor().long()
    left = (_rand(n, g, dev) * (W - w + 1).clamp(min=1)).floor().long()
    do = (_rand(n, g, dev) < p) & fits
    rows = torch.arange(H, device=dev)
    cols = torch.arange(W, device=dev)
    in_r = (rows[None] >= top[:, None]) & (rows[None] < (top + h)[:, None])
    in_c = (cols[None] >= left[:, None]) & (cols[None] < (left + w)[:, None])
    mask = in_r[:, :, None] & in_c[:, None, :] & do[:, None, None]
    return x.masked_fill(mask[..., None], 0.0)


def random_crop(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    n, H, W, C = x.shape
    dev = x.device
    xp = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=dev)
    rows = (oy[:, None] + torch.arange(H, device=dev))[:, :, None]
    cols = (ox[:, None] + torch.arange(W, device=dev))[:, None, :]
    b = torch.arange(n, device=dev)[:, None, None]
    return xp[b, rows, cols]
