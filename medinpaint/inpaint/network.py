"""The 3D inpainting network: a MONAI BasicUNet that refines a classical pre-fill.

Inputs are the normalised image (holes pre-filled: slices by linear interpolation along
k, other holes by push-pull) and the hole mask; the output equals the input outside the
mask and ``prefill + correction`` inside it.  Starting from the interpolation means the
untrained network is the interpolation baseline, and training only has to learn what
interpolation gets wrong.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet
from torch import nn

DEFAULT_FEATURES = (16, 16, 32, 64, 128, 16)
SIZE_DIVISOR = 16  # BasicUNet downsamples four times


class InpaintingUNet(nn.Module):
    def __init__(self, features: tuple[int, ...] = DEFAULT_FEATURES) -> None:
        super().__init__()
        self.features = tuple(int(f) for f in features)
        self.unet = BasicUNet(
            spatial_dims=3,
            in_channels=2,
            out_channels=1,
            features=self.features,
            act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
            norm=("instance", {"affine": True}),
        )
        # Start as the identity on the pre-fill: an untrained network equals interpolation.
        nn.init.zeros_(self.unet.final_conv.weight)
        nn.init.zeros_(self.unet.final_conv.bias)

    def forward(self, prefilled: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        correction = self.unet(torch.cat([prefilled, mask], dim=1))
        return prefilled + mask * correction
