"""The segmentation network: MONAI's BasicUNet, normalised without running statistics.

Meta-learning treats the network as a pure function of its weights: ``forward(model, params, x)``
runs ``torch.func.functional_call`` with a ``dict[str, Tensor]``, so adapted weights are plain
dicts and no per-task copy of the module is ever made.  InstanceNorm/GroupNorm keep no running
statistics, so a forward pass depends on the weights and the batch alone.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet
from torch import Tensor, nn
from torch.func import functional_call

from imaml_seg.config import ModelConfig

Params = dict[str, Tensor]


def build_model(config: ModelConfig) -> nn.Module:
    """A 2-D U-Net, 3 input channels (RGB), 1 output channel (lesion logit)."""
    if config.norm == "instance":
        norm: tuple = ("instance", {"affine": True, "track_running_stats": False})
    else:
        norm = ("group", {"num_groups": 4, "affine": True})
    model = BasicUNet(
        spatial_dims=2,
        in_channels=3,
        out_channels=1,
        features=tuple(config.features),
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": False}),
        norm=norm,
        upsample="deconv",
    )
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError("meta-learned networks must not use BatchNorm running statistics")
    return model


def get_params(model: nn.Module) -> Params:
    """The model's weights as a detached dict (a fresh copy, safe to update)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def forward(model: nn.Module, params: Params, images: Tensor) -> Tensor:
    """Logits ``(N, 1, H, W)`` for ``images`` ``(N, 3, H, W)`` under weights ``params``."""
    return functional_call(model, params, (images,))


def num_params(params: Params) -> int:
    return sum(p.numel() for p in params.values())


def flatten(params: Params) -> Tensor:
    """Concatenate a weight dict into one vector (dict order)."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vector: Tensor, like: Params) -> Params:
    """Split ``vector`` into a dict shaped like ``like``."""
    out: Params = {}
    offset = 0
    for name, p in like.items():
        n = p.numel()
        out[name] = vector[offset : offset + n].view_as(p)
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, weights need {offset}")
    return out
