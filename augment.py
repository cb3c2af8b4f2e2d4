"""Batched, per-sample SimCLR views made on the training device: random resized crop, flip, colour jitter,
grayscale and blur for images; time shift and stretch, mel shift, gain, noise and SpecAugment masks for log-mel
spectrograms. Every random parameter is drawn per sample from an explicit generator, so a client's views are a
pure function of (seed, round, client). No per-sample Python loop. Registered per modality in modality_specs.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from settings import ConfigError, check_range


@dataclass
class ImageAugConfig:
    crop_scale: tuple[float, float] = (0.2, 1.0)   # random resized crop, fraction of the area
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = -1.0          # gaussian blur probability; < 0 = 0.5 for inputs >= 64 px, else 0 (SimCLR)
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self):
        _check_pair("data.image_aug.crop_scale", self.crop_scale, 0.0, 1.0)
        check_range("data.image_aug.crop_scale[0]", self.crop_scale[0], lo=0.0, lo_open=True)
        _check_pair("data.image_aug.crop_ratio", self.crop_ratio, 0.0, 100.0)
        check_range("data.image_aug.crop_ratio[0]", self.crop_ratio[0], lo=0.0, lo_open=True)
        _check_pair("data.image_aug.blur_sigma", self.blur_sigma, 0.0, 100.0)
        for i, (name, hi) in enumerate((("brightness", 1.0), ("contrast", 1.0), ("saturation", 1.0), ("hue", 0.5))):
            check_range(f"data.image_aug.jitter[{i}] ({name})", self.jitter[i], lo=0.0, hi=hi)
        for k in ("flip_p", "jitter_p", "gray_p"):
            check_range(f"data.image_aug.{k}", getattr(self, k), lo=0.0, hi=1.0)
        check_range("data.image_aug.blur_p", self.blur_p, hi=1.0)  # below 0: the size rule


@dataclass
class AudioAugConfig:
    time_shift: float = 0.15      # max shift as a fraction of the clip
    time_stretch: float = 1.2     # stretch factor drawn log-uniformly in [1/s, s]
    freq_shift: float = 0.05      # max shift along the mel axis as a fraction of n_mels (~ pitch)
    gain_db: float = 6.0          # random gain in [-g, g] dB
    noise_p: float = 0.5          # probability of adding noise ...
    noise_snr_db: tuple[float, float] = (5.0, 30.0)  # ... at an SNR (dB below the clip's peak bin) in this range
    freq_masks: int = 2           # SpecAugment
    freq_mask_frac: float = 0.1875  # max width as a fraction of n_mels (24 of 128 bins)
    time_masks: int = 2
    time_mask_frac: float = 0.125   # max width as a fraction of frames

    def __post_init__(self):
        check_range("data.audio_aug.time_stretch", self.time_stretch, lo=1.0, hi=10.0)
        check_range("data.audio_aug.noise_p", self.noise_p, lo=0.0, hi=1.0)
        check_range("data.audio_aug.gain_db", self.gain_db, lo=0.0, hi=60.0)
        _check_pair("data.audio_aug.noise_snr_db", self.noise_snr_db, -60.0, 120.0)
        for k in ("freq_masks", "time_masks"):
            check_range(f"data.audio_aug.{k}", getattr(self, k), lo=0, hi=100)
        for k in ("time_shift", "freq_shift", "freq_mask_frac", "time_mask_frac"):
            check_range(f"data.audio_aug.{k}", getattr(self, k), lo=0.0, hi=1.0)


def _check_pair(key, pair, lo, hi):
    if len(pair) != 2 or not (lo <= pair[0] <= pair[1] <= hi):
        raise ConfigError(f"{key}={list(pair)}: expected [low, high] with {lo} <= low <= high <= {hi}")


def _uniform(g, n, lo, hi, device):
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _bernoulli(g, n, p, device):
    return torch.rand(n, generator=g, device=device) < p


def _gray(x):
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def random_resized_crop(x: torch.Tensor, g: torch.Generator, scale, ratio, flip_p: float) -> torch.Tensor:
    """Per-sample random resized crop and horizontal flip of float (B, C, H, W) as one batched affine
    resample: the crop's box becomes the sampling grid, so no per-sample Python loop."""
    B, dev = x.shape[0], x.device
    area = _uniform(g, B, scale[0], scale[1], dev)
    logr = _uniform(g, B, math.log(ratio[0]), math.log(ratio[1]), dev)
    w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(B, generator=g, device=dev) - 1)  # box centre in [-1, 1] coords
    cy = (1 - h) * (2 * torch.rand(B, generator=g, device=dev) - 1)
    flip = torch.where(_bernoulli(g, B, flip_p, dev), -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
YIQ_INV = ((1.0, 0.956170685404, 0.621432566347), (1.0, -0.27268860233, -0.64681323702), (1.0, -1.103744082176, 1.700623094677))
_YIQ_CACHE: dict = {}


def _yiq(device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB->YIQ and its inverse on `device`, made once: a new host tensor every step would be a blocking copy
    (and torch.linalg.inv checks its result on the host), both of which stall a CUDA stream."""
    key = (str(device), dtype)
    if key not in _YIQ_CACHE:
        _YIQ_CACHE[key] = (torch.tensor(YIQ, device=device, dtype=dtype), torch.tensor(YIQ_INV, device=device, dtype=dtype))
    return _YIQ_CACHE[key]


def color_jitter(x: torch.Tensor, g: torch.Generator, strengths, p: float) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation and hue jitter on float (B, C, H, W) in [0, 1],
    applied to a random p-fraction of the batch (SimCLR; fixed order b, c, s, h)."""
    B, dev = x.shape[0], x.device
    b, c, s, h = strengths
    on = _bernoulli(g, B, p, dev).view(B, 1, 1, 1)

    def factor(k):
        return _uniform(g, B, max(0.0, 1 - k), 1 + k, dev).view(B, 1, 1, 1)
    y = (x * factor(b)).clamp(0, 1)
    m = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - m) * factor(c) + m).clamp(0, 1)
    if x.shape[1] == 3:
        gr = _gray(y)
        y = ((y - gr) * factor(s) + gr).clamp(0, 1)
        # hue: rotate the chroma plane of YIQ by a per-sample angle
        ang = _uniform(g, B, -h, h, dev) * 2 * math.pi
        yiq, yiq_inv = _yiq(dev, y.dtype)
        t = torch.einsum("ij,bjhw->bihw", yiq, y)
        cos, sin = torch.cos(ang).view(B, 1, 1), torch.sin(ang).view(B, 1, 1)
        i2 = t[:, 1] * cos - t[:, 2] * sin
        q2 = t[:, 1] * sin + t[:, 2] * cos
        t = torch.stack([t[:, 0], i2, q2], dim=1)
        y = torch.einsum("ij,bjhw->bihw", yiq_inv, t).clamp(0, 1)
    return torch.where(on, y, x)


def gaussian_blur(x: torch.Tensor, g: torch.Generator, p: float, sigma) -> torch.Tensor:
    """Per-sample gaussian blur (sigma ~ U(sigma)) of a random p-fraction, as one grouped separable conv."""
    B, C, H, W = x.shape
    dev = x.device
    sig = _uniform(g, B, sigma[0], sigma[1], dev)
    on = _bernoulli(g, B, p, dev)
    k = max(3, int(0.1 * min(H, W)) // 2 * 2 + 1)
    r = torch.arange(k, device=dev, dtype=x.dtype) - k // 2
    ker = torch.exp(-r.view(1, -1) ** 2 / (2 * sig.view(-1, 1) ** 2))
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k)
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), ker.view(B * C, 1, k, 1), groups=B * C)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), ker.view(B * C, 1, 1, k), groups=B * C)
    return torch.where(on.view(B, 1, 1, 1), y.view(B, C, H, W), x)


def augment_image(x: torch.Tensor, md, cfg: ImageAugConfig, g: torch.Generator) -> torch.Tensor:
    """uint8 (B, C, H, W) on the training device -> one normalised float32 SimCLR view, with random
    parameters drawn per sample from generator `g`."""
    y = random_resized_crop(x.float() / 255.0, g, cfg.crop_scale, cfg.crop_ratio, cfg.flip_p)
    y = color_jitter(y, g, cfg.jitter, cfg.jitter_p)
    if y.shape[1] == 3 and cfg.gray_p > 0:
        gray = _bernoulli(g, y.shape[0], cfg.gray_p, y.device).view(-1, 1, 1, 1)
        y = torch.where(gray, _gray(y).expand_as(y), y)
    blur_p = cfg.blur_p if cfg.blur_p >= 0 else (0.5 if min(y.shape[-2:]) >= 64 else 0.0)
    if blur_p > 0:
        y = gaussian_blur(y, g, blur_p, cfg.blur_sigma)
    return md.standardize(y)


def augment_audio(x: torch.Tensor, md, cfg: AudioAugConfig, g: torch.Generator) -> torch.Tensor:
    """Raw log-mel (B, 1, F, T) on the training device -> one normalised float32 view: per-sample time
    shift + time stretch + mel shift (one affine resample), random gain, additive noise at a random SNR,
    then SpecAugment frequency and time masks."""
    x = x.float()
    B, _, Fm, T = x.shape
    dev = x.device
    stretch = torch.exp(_uniform(g, B, -math.log(cfg.time_stretch), math.log(cfg.time_stretch), dev))
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0] = 1.0 / stretch
    theta[:, 0, 2] = 2 * _uniform(g, B, -cfg.time_shift, cfg.time_shift, dev)
    theta[:, 1, 1] = 1.0
    theta[:, 1, 2] = 2 * _uniform(g, B, -cfg.freq_shift, cfg.freq_shift, dev)
    grid = F.affine_grid(theta, [B, 1, Fm, T], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x + (_uniform(g, B, -cfg.gain_db, cfg.gain_db, dev) * math.log(10) / 10).view(B, 1, 1, 1)
    if cfg.noise_p > 0:  # noise power: exponential per bin (|gaussian|^2), level set by a per-sample SNR
        snr = _uniform(g, B, cfg.noise_snr_db[0], cfg.noise_snr_db[1], dev) * math.log(10) / 10
        level = x.amax(dim=(1, 2, 3)) - snr
        u = torch.rand(x.shape, generator=g, device=dev).clamp_min(1e-12)
        noisy = torch.logaddexp(x, level.view(B, 1, 1, 1) + torch.log(-torch.log(u)))
        x = torch.where(_bernoulli(g, B, cfg.noise_p, dev).view(B, 1, 1, 1), noisy, x)
    x = md.standardize(x)
    keep = torch.ones(B, 1, Fm, T, device=dev, dtype=torch.bool)
    for n, size, axis in ((cfg.freq_masks, Fm, 2), (cfg.time_masks, T, 3)):
        frac = cfg.freq_mask_frac if axis == 2 else cfg.time_mask_frac
        for _ in range(n):
            width = (torch.rand(B, generator=g, device=dev) * (frac * size + 1)).floor()
            start = (torch.rand(B, generator=g, device=dev) * (size - width + 1)).floor()
            idx = torch.arange(size, device=dev).view(1, -1)
            band = (idx >= start.view(-1, 1)) & (idx < (start + width).view(-1, 1))  # (B, size)
            keep &= ~(band.view(B, 1, -1, 1) if axis == 2 else band.view(B, 1, 1, -1))
    return x * keep


