"""The 3D inpainting network: a MONAI BasicUNet that refines a classical pre-fill.

Inputs are the normalised image (holes pre-filled: slices by linear interpolation along
k, other holes by push-pull) and the hole mask; the output equals the input outside the
mask and ``prefill + correction`` inside it.  Starting from the interpolation means the
untrained network is the interpolation baseline, and training only has to learn what
interpolation gets wrong.

A model with ``original_input`` also sees the image as acquired, holes included: for metal
streaks that image still holds the anatomy under the streaks, which the NMAR pre-fill loses.
A model with ``registered_input`` also sees the missing slices filled by motion-compensated
interpolation (``registered.py``): across wide gaps it follows anatomy that interpolation
cross-fades.  It predicts a second channel too, a gate g in (0, 1) per voxel, and returns
``prefill + mask * (correction + g * (registered - prefill))``: which of the two fills to trust
where is a blend weight the network learns directly, rather than through its first layer
(where a widened model barely learnt it: +0.007 dB in 200 steps).  Either way the third input
channel is the ``extra`` argument of ``forward``.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet
from torch import nn

DEFAULT_FEATURES = (16, 16, 32, 64, 128, 16)
SIZE_DIVISOR = 16  # BasicUNet downsamples four times


class InpaintingUNet(nn.Module):
    def __init__(
        self, features: tuple[int, ...] = DEFAULT_FEATURES, original_input: bool = False, registered_input: bool = False
    ) -> None:
        super().__init__()
        if original_input and registered_input:
            raise ValueError("a model reads the original image or the registered slices, not both")
        self.features = tuple(int(f) for f in features)
        self.original_input = bool(original_input)
        self.registered_input = bool(registered_input)
        self.unet = BasicUNet(
            spatial_dims=3,
            in_channels=3 if self.takes_extra else 2,
            out_channels=2 if self.registered_input else 1,
            features=self.features,
            act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
            norm=("instance", {"affine": True}),
        )
        # Start as the identity on the pre-fill: an untrained network equals interpolation
        # (with registered_input: the even blend of interpolation and registered interpolation).
        nn.init.zeros_(self.unet.final_conv.weight)
        nn.init.zeros_(self.unet.final_conv.bias)

    @property
    def takes_extra(self) -> bool:
        return self.original_input or self.registered_input

    def forward(self, prefilled: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if self.takes_extra != (extra is not None):
            raise ValueError("this model takes a third input channel" if self.takes_extra else "this model takes two input channels")
        inputs = [prefilled, mask] + ([extra] if extra is not None else [])
        out = self.unet(torch.cat(inputs, dim=1))
        if self.registered_input:
            correction, gate = out[:, :1], torch.sigmoid(out[:, 1:2])
            return prefilled + mask * (correction + gate * (extra - prefilled))
        return prefilled + mask * out

    def load_narrower(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights of a model without the third input: its first convolution gets zero
        weights for the new channel, so the result starts as exactly that model (with
        registered_input: plus half the registered fill's difference, the gate at 0.5)."""
        own = self.state_dict()
        for key, value in state.items():
            if key in own and value.dim() == 5 and own[key].shape[1] == value.shape[1] + 1 and own[key].shape[0] == value.shape[0]:
                widened = torch.zeros_like(own[key])
                widened[:, : value.shape[1]] = value
                state = {**state, key: widened}
        for key in ("unet.final_conv.weight", "unet.final_conv.bias"):
            if key in own and key in state and own[key].shape[0] == 2 and state[key].shape[0] == 1:  # add the gate
                state = {**state, key: torch.cat([state[key], torch.zeros_like(state[key])])}
        self.load_state_dict(state)
