"""Normalisation and training augmentation as batched tensor ops on the training device.

``spec`` reproduces the pFedLoRA authors' pipeline (spec A.1): Normalize -> RandomHorizontalFlip ->
RandomErasing(p=0.5, scale 0.04-0.2, ratio 0.5-2, value 0) -> RandomCrop(32, padding=4). Because
padding and erasing happen after normalisation, both fill with 0, i.e. the channel mean. With
scale <= 0.2 and ratio <= 2 the erased box always fits a 32x32 image on torchvision's first try, so
sampling it once per image is the same distribution. ``flip-crop`` drops the erasing; ``none`` trains
on normalised images only.

Two implementations, bit-identical (tested): ``train`` composes the steps as written above (the
plain path, kept as the reference); ``train_gather`` draws the same random numbers in the same order,
folds flip, crop, erasing and the batch gather into one index computation, and reads each output
pixel once from the uint8 store (3-4x faster per batch on the CPU, see benchmarks/speed.py).
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
        self._grid: dict[tuple, tuple[torch.Tensor, ...]] = {}  # (H, W, C) -> aranges, built once
        self._tiles: dict[tuple, tuple[torch.Tensor, ...]] = {}  # (H, W, C) -> mean, 1/std tiled to H*W*C

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float NHWC."""
        return (x_u8.to(self.dtype) - self.mean) * self.inv_std

    def to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW view; a permuted NHWC tensor already is channels-last in memory."""
        x = x.permute(0, 3, 1, 2)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def _planes(self, x_u8_nchw: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise a uint8 NCHW tensor over whole planes (an NHWC loop over C = 3 vectorises badly),
        zero the ``drop`` pixels (n, H, W), and give it the configured layout (one copy if channels-last).
        The same float ops in the same order as ``normalize``: bit-identical."""
        C = x_u8_nchw.shape[1]
        x = x_u8_nchw.to(self.dtype, memory_format=torch.contiguous_format)
        x.sub_(self.mean.view(1, C, 1, 1)).mul_(self.inv_std.view(1, C, 1, 1))
        if drop is not None:
            x.masked_fill_(drop[:, None], 0.0)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def eval(self, x_u8: torch.Tensor) -> torch.Tensor:
        """``to_nchw(normalize(x_u8))``, bit for bit."""
        if self.channels_last:
            return self._nhwc_rows(x_u8)
        return self._planes(x_u8.permute(0, 3, 1, 2))

    def _nhwc_rows(self, x_u8_nhwc: torch.Tensor) -> torch.Tensor:
        """Normalise uint8 NHWC images as rows of H*W*C values against the per-channel constants tiled
        to that length (long vectorised loops, no transpose); the NHWC result, seen as NCHW, already is
        channels-last. The same float ops as ``normalize``: bit-identical."""
        n, H, W, C = x_u8_nhwc.shape
        tiles = self._tiles.get((H, W, C))
        if tiles is None:
            tiles = self._tiles[(H, W, C)] = (self.mean.repeat(H * W), self.inv_std.repeat(H * W))
        x = x_u8_nhwc.reshape(n, H * W * C).to(self.dtype)
        x.sub_(tiles[0]).mul_(tiles[1])
        return x.view(n, H, W, C).permute(0, 3, 1, 2)

    def train(self, x_u8: torch.Tensor, mode: str, g: torch.Generator) -> torch.Tensor:
        """The plain path: normalise, flip, erase, pad and crop, step by step."""
        x = self.normalize(x_u8)
        if mode != "none":
            x = hflip(x, g)
            if mode == "spec":
                x = random_erase(x, g)
            x = random_crop(x, g, pad=4)
        return self.to_nchw(x)

    def train_gather(self, images: torch.Tensor, idx: torch.Tensor, mode: str, g: torch.Generator,
                     pad: int = 4) -> torch.Tensor:
        """``train(images[idx], mode, g)``, bit for bit, in one gather.

        Output pixel (r, c) of image i is source pixel (r + oy - pad, c + ox - pad) of the flipped image
        (column mirrored when flipped), or 0 where that lies in the padding or in the erased box.
        """
        if mode == "none":
            return self.eval(images[idx])
        n = idx.shape[0]
        _, H, W, C = images.shape
        dev = images.device
        grid = self._grid.get((H, W, C))
        if grid is None:
            grid = self._grid[(H, W, C)] = (torch.arange(H, device=dev), torch.arange(W, device=dev),
                                            torch.arange(C, device=dev).view(1, C, 1, 1))
        ar_h, ar_w, ar_c = grid
        flip = _rand(n, g, dev) < 0.5  # the draws of hflip, random_erase, random_crop, in their order
        if mode == "spec":
            top, left, h, w, do = _erase_box(n, H, W, g, dev)
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=dev)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=dev)
        rows = oy[:, None] - pad + ar_h  # (n, H) rows of the flipped image
        cols = ox[:, None] - pad + ar_w  # (n, W)
        out_r, out_c = (rows < 0) | (rows >= H), (cols < 0) | (cols >= W)
        drop = out_r[:, :, None] | out_c[:, None, :]  # (n, H, W): padding, or erased below
        if mode == "spec":
            er = (rows >= top[:, None]) & (rows < (top + h)[:, None]) & do[:, None]
            ec = (cols >= left[:, None]) & (cols < (left + w)[:, None])
            drop |= er[:, :, None] & ec[:, None, :]
        src_c = torch.where(flip[:, None], W - 1 - cols, cols).clamp_(0, W - 1)
        src_r = rows.clamp_(0, H - 1)
        pix = idx[:, None, None] * (H * W * C) + src_r[:, :, None] * (W * C) + src_c[:, None, :] * C  # (n, H, W)
        return self._planes(torch.take(images, pix[:, None] + ar_c), drop)  # gathered in NCHW order


def _rand(n, g, device):
    return torch.rand(n, generator=g, device=device)


def hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = _rand(x.shape[0], g, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(2), x)


def _erase_box(n: int, H: int, W: int, g: torch.Generator, dev, p: float = 0.5, scale=(0.04, 0.2),
               ratio=(0.5, 2.0)):
    """Random-erasing boxes (top, left, h, w, do) of n images, torchvision's distribution."""
    area = H * W * (scale[0] + (scale[1] - scale[0]) * _rand(n, g, dev))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(n, g, dev)
    r = torch.exp(log_r)
    h = torch.sqrt(area * r).round().long()
    w = torch.sqrt(area / r).round().long()
    fits = (h < H) & (w < W)
    top = (_rand(n, g, dev) * (H - h + 1).clamp(min=1)).floor().long()
    left = (_rand(n, g, dev) * (W - w + 1).clamp(min=1)).floor().long()
    do = (_rand(n, g, dev) < p) & fits
    return top, left, h, w, do


def random_erase(x: torch.Tensor, g: torch.Generator, p: float = 0.5, scale=(0.04, 0.2),
                 ratio=(0.5, 2.0)) -> torch.Tensor:
    n, H, W, _ = x.shape
    dev = x.device
    top, left, h, w, do = _erase_box(n, H, W, g, dev, p, scale, ratio)
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
