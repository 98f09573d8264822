"""The 3D inpainting network: a MONAI BasicUNet that refines a classical pre-fill.

Inputs are the normalised image (holes pre-filled: slices by linear interpolation along
k, other holes by push-pull) and the hole mask; the output equals the input outside the
mask and ``prefill + correction`` inside it.  Starting from the interpolation means the
untrained network is the interpolation baseline, and training only has to learn what
interpolation gets wrong.

A model with ``original_input`` also sees the image as acquired, holes included: for metal
streaks that image still holds the anatomy under the streaks, which the NMAR pre-fill loses.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet
from torch import nn

DEFAULT_FEATURES = (16, 16, 32, 64, 128, 16)
SIZE_DIVISOR = 16  # BasicUNet downsamples four times


class InpaintingUNet(nn.Module):
    def __init__(self, features: tuple[int, ...] = DEFAULT_FEATURES, original_input: bool = False) -> None:
        super().__init__()
        self.features = tuple(int(f) for f in features)
        self.original_input = bool(original_input)
        self.unet = BasicUNet(
            spatial_dims=3,
            in_channels=3 if self.original_input else 2,
            out_channels=1,
            features=self.features,
            act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
            norm=("instance", {"affine": True}),
        )
        # Start as the identity on the pre-fill: an untrained network equals interpolation.
        nn.init.zeros_(self.unet.final_conv.weight)
        nn.init.zeros_(self.unet.final_conv.bias)

    def forward(self, prefilled: torch.Tensor, mask: torch.Tensor, original: torch.Tensor | None = None) -> torch.Tensor:
        if self.original_input != (original is not None):
            raise ValueError("this model takes the original image" if self.original_input else "this model takes no original image")
        inputs = [prefilled, mask] + ([original] if original is not None else [])
        correction = self.unet(torch.cat(inputs, dim=1))
        return prefilled + mask * correction

    def load_narrower(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights of a model without the original-image input: its first convolution gets
        zero weights for the new channel, so the result starts as exactly that model."""
        own = self.state_dict()
        for key, value in state.items():
            if key in own and value.dim() == 5 and own[key].shape[1] == value.shape[1] + 1 and own[key].shape[0] == value.shape[0]:
                widened = torch.zeros_like(own[key])
                widened[:, : value.shape[1]] = value
                state = {**state, key: widened}
        self.load_state_dict(state)
