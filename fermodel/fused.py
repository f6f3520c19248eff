"""Horizontal fusion: K networks of one architecture as one network of K times the channels.

HFTA (Wang, Mendis, Pekhimenko et al., "Horizontally Fused Training Array", MLSys 2021) trains
many small jobs of one model as one: the K members' activations lie side by side in the channels
of one tensor, ``[N, K*C, H, W]``, member k's in channels ``k*C .. (k+1)*C``. Then

- a convolution of the K members is one convolution with K times the groups (its weight the
  members' weights stacked along the output channels), which never reads another member's
  channels;
- a BatchNorm of the K members is one BatchNorm over K*C channels: its statistics are per
  channel, so each member's are its own batch's, running statistics included;
- a linear layer is a grouped 1x1 convolution (``GroupedLinear``);
- every elementwise op, pooling over space and the global average pool are per channel already.

The few ops that mix channels know the member count: ``members`` on CBAM (its spatial gate
pools over a member's channels), ECA (its 1-D convolution runs along a member's channels) and
PSA (it concatenates each member's branches), and on the engine's input wrapper (a member's gray
image on its stem's channels). ``fuse`` builds the fused network from the members and makes
every member's weights and statistics views of their slices of the fused ones, so each member's
own module, optimiser and checkpoint go on working on what the fused network trains; it refuses
(``NotFusable``) any module whose forward it does not know to keep members apart, and packs of
such networks take ``torch.vmap`` (``fermodel.pack``).

A step of the fused network issues about the kernels of one member's step whatever K is: each
kernel is K times wider, which is what a GPU kernel-bound at 48x48 has room for.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fermodel.attention import AFF, SqueezeExcite
from fermodel.resnet import Bottleneck, GlobalAvgPool, ResNet

# modules whose own forward treats every channel alone (their children are fused one by one)
CHANNEL_LOCAL = (
    ResNet,
    Bottleneck,
    SqueezeExcite,
    AFF,
    GlobalAvgPool,
    nn.Sequential,
    nn.ModuleList,
    nn.ReLU,
    nn.MaxPool2d,
    nn.Identity,
)


class NotFusable(ValueError):
    """A network with a module whose forward may mix the members' channels."""


class GroupedLinear(nn.Module):
    """K linear layers on ``[N, K*in]`` giving ``[N, K*out]``: one grouped 1x1 convolution.
    ``weight`` is ``[K*out, in]``, the members' weights stacked."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, members: int):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.members = members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(
            x[:, :, None, None], self.weight[:, :, None, None], self.bias, groups=self.members
        )
        return y.flatten(1)


def why_not_fusable(net: nn.Module) -> str | None:
    """Why ``fuse`` refuses packs of ``net`` (None when it takes them)."""
    try:
        _check(net)
    except NotFusable as err:
        return str(err)
    return None


def fuse(nets: list[nn.Module]) -> nn.Module:
    """One network computing every member of ``nets`` (same architecture), their activations
    side by side in the channels; each member's parameters and buffers become views of its
    slice of the fused ones (the shared BatchNorm step count is one tensor for all)."""
    _check(nets[0])
    k = len(nets)
    fused = copy.deepcopy(nets[0])
    members = [dict(net.named_modules()) for net in nets]
    for name, module in list(fused.named_modules()):
        parts = [m[name] for m in members]
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            module.in_channels *= k
            module.out_channels *= k
            module.groups *= k
            _stack_tensors(module, parts, ("weight", "bias"))
        elif isinstance(module, nn.BatchNorm2d):
            module.num_features *= k
            _stack_tensors(module, parts, ("weight", "bias", "running_mean", "running_var"))
            for part in parts:  # a member's step count is the pack's
                part.num_batches_tracked.data = module.num_batches_tracked
        elif isinstance(module, nn.Linear):
            grouped = GroupedLinear(
                module.weight.detach(), None if module.bias is None else module.bias.detach(), k
            )
            _stack_tensors(grouped, parts, ("weight", "bias"))
            parent, _, child = name.rpartition(".")
            setattr(fused.get_submodule(parent), child, grouped)
        elif hasattr(module, "members"):
            module.members = k
    return fused


def member_slices(fused: nn.Module, nets: list[nn.Module]) -> list[list[tuple]]:
    """Per member, ``(its parameter, the fused parameter, its rows)``: where its gradient lies."""
    fused_params = dict(fused.named_parameters())
    out = []
    for k, net in enumerate(nets):
        rows = []
        for name, p in net.named_parameters():
            whole = fused_params[name]
            n = whole.shape[0] // len(nets)
            rows.append((p, whole, slice(k * n, (k + 1) * n)))
        out.append(rows)
    return out


def _stack_tensors(module: nn.Module, parts: list[nn.Module], names: tuple[str, ...]) -> None:
    """``module.<name>`` becomes the members' tensors stacked along the first dimension, and
    each member's tensor a view of its rows."""
    for name in names:
        own = [getattr(part, name) for part in parts]
        if own[0] is None:
            continue
        stacked = torch.cat([t.detach() for t in own])
        current = getattr(module, name)
        if isinstance(current, nn.Parameter):
            setattr(module, name, nn.Parameter(stacked, requires_grad=current.requires_grad))
        else:
            setattr(module, name, stacked)  # a registered buffer stays one
        n = own[0].shape[0]
        fused = getattr(module, name).detach()
        for k, t in enumerate(own):
            t.data = fused[k * n : (k + 1) * n]


def _check(net: nn.Module) -> None:
    for name, module in net.named_modules():
        known = isinstance(
            module, (nn.Conv1d, nn.Conv2d, nn.BatchNorm2d, nn.Linear, *CHANNEL_LOCAL)
        )
        if not known and not hasattr(module, "members"):
            raise NotFusable(
                f"{name or 'the network'} ({type(module).__name__}) may mix the members' channels"
            )
        if isinstance(module, nn.Conv2d | nn.Conv1d) and module.padding_mode != "zeros":
            raise NotFusable(f"{name} pads with {module.padding_mode!r}")
