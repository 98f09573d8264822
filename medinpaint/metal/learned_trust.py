"""A learned refinement of the trust weight: how much of the metal correction's change to keep, pixel by pixel.

The gradient rule (``trust.change_weight``) keeps the change where it cancels what the image
shows. It is one hand-made rule; a small network that sees the same evidence (the image, the
change, the rule's own weight, the metal, its halo, the distance to it and the slice's noise)
can learn where the rule is wrong from pairs with a metal-free truth, from two simulators. It
starts as the rule (its last layer is zero at initialisation: logit(w) = logit(rule)) and its
output is still a weight in [0, 1]: 0 keeps the acquired voxel, 1 takes the whole change. It
never writes a value of its own, so a wrong weight can only fall back towards the acquired scan
or towards the classical correction.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from scipy import ndimage

from medinpaint.metal.trust import change_weight, trust_keep_out, weighted_change

CHANNELS = ("image", "change", "smoothed change", "rule weight", "metal", "halo", "distance to metal", "noise")
FEATURES = (16, 16, 32, 64, 96, 16)
LOGIT_LIMIT = 12.0  # the rule's weight is clipped to sigmoid(+-12) before its logit is taken
SNAP = 1e-3  # weights this close to 0 or 1 are 0 or 1: "keep the acquired voxel" or "the whole change", exactly


class TrustNet(torch.nn.Module):
    """BasicUNet (2D) at half resolution; out: the weight (B, 1, H, W) = sigmoid(logit(rule weight) + net)."""

    def __init__(self, features: tuple[int, ...] = FEATURES):
        super().__init__()
        # no normalisation layer: instance norm's statistics over a training crop are not those over a whole slice
        self.unet = BasicUNet(spatial_dims=2, in_channels=len(CHANNELS), out_channels=1, features=features, norm=None)
        last = self.unet.final_conv
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        rule = inputs[:, 3:4].clamp(torch.sigmoid(torch.tensor(-LOGIT_LIMIT)), torch.sigmoid(torch.tensor(LOGIT_LIMIT)))
        h, w = inputs.shape[-2:]
        ph, pw = (-h) % 32, (-w) % 32  # BasicUNet halves 4 times at half resolution
        x = F.avg_pool2d(F.pad(inputs, (0, pw, 0, ph), mode="replicate"), 2)
        residual = F.interpolate(self.unet(x), scale_factor=2, mode="bilinear", align_corners=False)[..., :h, :w]
        return torch.sigmoid(torch.logit(rule) + residual)


def trust_inputs(image: np.ndarray, change: np.ndarray, metal: np.ndarray, halo: np.ndarray, rule_weight: np.ndarray,
                 noise_hu: float) -> np.ndarray:
    """The network's input channels (``CHANNELS``, float32 (C, H, W)) for one slice, each scaled to about [-3, 3]."""
    distance = ndimage.distance_transform_edt(~metal) if metal.any() else np.full(metal.shape, 1e3)
    return np.stack([
        np.clip(image / 1000.0, -1.0, 3.0),
        np.clip(change / 200.0, -3.0, 3.0),
        np.clip(ndimage.gaussian_filter(change, 1.5) / 100.0, -3.0, 3.0),
        rule_weight,
        metal.astype(np.float32),
        halo.astype(np.float32),
        np.minimum(distance, 300.0) / 100.0,
        np.full(metal.shape, min(noise_hu, 300.0) / 50.0),
    ]).astype(np.float32)


def learned_weight(model: TrustNet, image: np.ndarray, change: np.ndarray, metal: np.ndarray, halo: np.ndarray,
                   spacing_mm: tuple[float, float], window_mm: float, noise_hu: float) -> np.ndarray:
    """The weight in [0, 1] (H, W) for ``change`` on one slice."""
    rule = change_weight(image, change, trust_keep_out(metal), spacing_mm, window_mm)
    x = torch.from_numpy(trust_inputs(image, change, metal, halo, rule, noise_hu))[None]
    with torch.inference_mode():
        weight = model(x)[0, 0].numpy()
    return np.where(weight < SNAP, 0.0, np.where(weight > 1 - SNAP, 1.0, weight)).astype(np.float32)


def learned_change(model: TrustNet, image: np.ndarray, change: np.ndarray, metal: np.ndarray, halo: np.ndarray,
                   spacing_mm: tuple[float, float], window_mm: float, noise_hu: float) -> tuple[np.ndarray, float]:
    """As ``trust.trusted_change``, with the network's weight: the weighted change and the share of it kept."""
    if not np.any(change):
        return change, 1.0
    return weighted_change(change, learned_weight(model, image, change, metal, halo, spacing_mm, window_mm, noise_hu))
