"""Packed trials: K trials of one architecture trained as one program on one device.

The paper's studies are many small trials of the same network (Table 4 on FER2013 with 3 seeds is
12 ResNet-50 trials at 48x48); one such trial issues about a thousand small kernels per step
and cannot fill a GPU. HFTA (Wang et al., MLSys 2021) fuses same-architecture trials into one
model. A pack takes the first of three routes whose step passes its check (``checked_pack``):

- fused (``FusedStep``): the ResNet family, written so that ``fermodel.fused`` can lay the K
  members side by side in the channels of one network; a step costs about one trial's kernels;
- vmapped (``PackedStep``): any other network, by ``torch.vmap`` over the members' weights,
  BatchNorm statistics and Island centers stacked along a leading axis of size K; every
  convolution of the K members runs as one grouped convolution, every BatchNorm as one over K
  times the channels, at about twice one trial's kernels whatever K;
- looped (``LoopedStep``): the members one after another.

Each member stays numerically the trial it would be alone: it is built alone (its own seed's
initialisation, optimiser, schedule, loss), then its tensors are re-pointed at its slice of the
stack, so that its own ``nn.Module``, torch optimiser and scheduler go on working on it: it
draws its own batches and augmentations from its own generators, its optimiser steps its own
weights with its own learning rate, its plateau schedule decides for it alone, and it is
evaluated, selected, checkpointed (in the single trial's format, so that it may continue alone
or in another pack) and tested as a trial. The losses of the members are summed for one
backward pass; no operation mixes members, so each gets exactly its own gradients.

Limits, written where they bind: members share the architecture, the data, the augmentation
ranges and the schedule length (``fermodel.config.pack_key``); a vmapped stack is in the
default memory format (vmap cannot keep channels-last; a fused network keeps it). No model
here has dropout (the torchvision backbones' heads are replaced without theirs): a pack would
draw its masks from another stream than a lone trial, which its check does not allow for.

A fused network runs under the members' autocast, as a lone trial. In a vmapped pack, mixed
precision (bf16, "auto" on CUDA) is applied by hand, not by ``torch.autocast``, which vmap does
not honour: on the CPU it is ignored, and on CUDA (torch 2.11, an H200) it cast some
convolutions and not the bias of others, whose step then failed ("Input type (c10::BFloat16)
and bias type (float) should be the same"). A bf16 pack does what autocast does in these
networks: every convolution and linear layer runs in bf16 (weights, biases and inputs cast),
every BatchNorm in fp32 on its input's values, returning its input's dtype (what a mixed
kernel computes alone), every other op in the dtype it is given (the models compute their one
op that autocast puts in fp32, PSA's softmax, in fp32 themselves). A member then computes each
op in the precision of its lone trial; its rounding differs, as its kernels do. This runs on
the CPU; on that H200 vmap's batch norm refused it ("NYI: querying is_contiguous inside of vmap
for memory_format other than torch.contiguous_format"), as it refused bf16 input with fp32
statistics in its backward ("Expected running_mean to have type BFloat16 but got Float").

So a pack checks itself before it trains (``checked_pack``). Where its packed step fails or
gives a member other losses than its own step, it tries once more with every BatchNorm written
in plain ops (a mean and variance, a scale and shift, the running statistics updated as torch
does), which vmap batches in any dtype and memory format, at about 17 more kernels per
BatchNorm per step, forward and backward, for the whole pack (a PSA-ResNet-50 pack of 4: 2,931
against 2,016); torch's batch norm is kept where it passes, since it is one fused kernel.
Where that fails too, the members train one after another, each by its own step
(``LoopedStep``). Their notes say which and why.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import torch
from torch.func import functional_call

from fermodel.augment import apply_params, draw, params_from_draws
from fermodel.fused import fuse, member_slices, why_not_fusable
from fermodel.losses import joint_loss_step


class _Pack:
    """What the packed steps share: the members' Island centers as one stack, their loss
    weights, their training data, the augmentation of their batches, and their optimisers."""

    def __init__(self, members: list, aug, device: torch.device):
        self.members, self.aug, self.device = members, aug, device
        self.centers = self._stack_centers()
        self.lam, self.lam1, self.alpha = self._loss_weights()
        self.x, self.y = self._training_data()
        self.rows = torch.arange(len(members), device=device)[:, None]  # once: one op less a step
        self.alive = [True] * len(members)
        self.params: dict[str, torch.Tensor] = {}  # what the step trains (its stacks)
        self.buffers: dict[str, torch.Tensor] = {}
        self.grads: list[list[tuple]] = []  # per member: (its weight, a stack, its part of it)

    def _stack_centers(self) -> torch.Tensor:
        """The members' class centers as one [K, classes, features] buffer (ones for a member
        without centers: its weights are zero, and ones keep every term finite)."""
        aux = [m.parts.criterion.aux for m in self.members]
        known = next((a.centers for a in aux if a is not None), None)
        classes = len(self.members[0].splits.train.classes)
        features = self.members[0].parts.model.num_features
        dtype = self.members[0].parts.dtype
        like = (
            known
            if known is not None
            else torch.ones(classes, features, device=self.device, dtype=dtype)
        )
        centers = torch.stack(
            [a.centers.detach() if a is not None else torch.ones_like(like) for a in aux]
        )
        for k, a in enumerate(aux):
            if a is not None:
                a.centers.data = centers[k]
        return centers

    def _loss_weights(self):
        """Per member: lam (0 for ce), lam1 (0 unless island) and alpha (0 for ce)."""
        lam, lam1, alpha = [], [], []
        for m in self.members:
            c = m.config
            lam.append(c.lam if c.loss != "ce" else 0.0)
            lam1.append(c.lam1 if c.loss == "island" else 0.0)
            alpha.append(c.alpha if c.loss != "ce" else 0.0)
        dtype = self.members[0].parts.dtype
        return (torch.tensor(v, device=self.device, dtype=dtype) for v in (lam, lam1, alpha))

    def _training_data(self):
        """[K, N, ...] training images and labels: one copy, expanded, when the members train
        on the same split; stacked when they do not (folds of equal size)."""
        trains = [m.splits.train for m in self.members]
        same = all(np.array_equal(t.ids, trains[0].ids) for t in trains[1:])
        if same:
            x = trains[0].images.to(self.device)
            y = trains[0].labels.to(self.device)
            k = len(trains)
            return x.expand(k, *x.shape), y.expand(k, *y.shape)
        return (
            torch.stack([t.images for t in trains]).to(self.device),
            torch.stack([t.labels for t in trains]).to(self.device),
        )

    def train(self) -> None:
        raise NotImplementedError

    def drop(self, k: int) -> None:
        """Member ``k`` diverged: its optimiser no longer steps (its slice is left as it is)."""
        self.alive[k] = False

    def __call__(self, idx: torch.Tensor):
        """Train every member on its batch ``idx[k]``; returns logits [K, B, C], labels [K, B],
        total and cross-entropy losses [K] (not synchronised)."""
        k, b = idx.shape
        images, y = self.x[self.rows, idx], self.y[self.rows, idx]
        # each member's own draws, as alone, turned into parameters all at once
        drawn = torch.cat([draw(b, m.augment_gen) for m in self.members])
        x = apply_params(
            images.flatten(0, 1), params_from_draws(drawn, self.aug), self.aug.padding_mode
        )
        for p in self.params.values():
            p.grad = None  # backward then assigns fresh gradients (no accumulation kernels)
        logits, emb = self._forward(x.view(k, b, *x.shape[1:]))
        dtype = self.centers.dtype
        total, ce, _, centers = torch.vmap(joint_loss_step)(
            logits.to(dtype), emb.to(dtype), y, self.centers, self.lam, self.lam1, self.alpha
        )
        total.sum().backward()
        with torch.no_grad():
            self.centers.copy_(centers)
        for member, alive, grads in zip(self.members, self.alive, self.grads, strict=True):
            if alive:
                for p, whole, part in grads:  # views: no kernel
                    p.grad = whole.grad[part]
                member.parts.optimizer.step()
        return logits.detach(), y, total.detach(), ce.detach()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [K, B, classes] and embeddings [K, B, features] of the members' batches
        ``x`` [K, B, C, H, W]."""
        raise NotImplementedError


class FusedStep(_Pack):
    """One training step of every member of a pack as one network of K times the channels
    (``fermodel.fused``): the members' activations side by side, in channels-last where the
    members train so, under the members' autocast."""

    def __init__(self, members: list, aug, device: torch.device):
        super().__init__(members, aug, device)
        nets = [m.parts.net for m in members]
        self.net = fuse(nets)
        self.params = dict(self.net.named_parameters())
        self.buffers = dict(self.net.named_buffers())
        self.grads = member_slices(self.net, nets)

    def train(self) -> None:
        self.net.train()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, b = x.shape[:2]
        side_by_side = x.transpose(0, 1).reshape(b, -1, *x.shape[3:])  # [B, K*C, H, W]
        with self.members[0].parts.autocast():
            logits, emb = self.net(side_by_side, return_embedding=True)
        return logits.view(b, k, -1).transpose(0, 1), emb.view(b, k, -1).transpose(0, 1)


class PackedStep(_Pack):
    """One training step of every member of a pack as one vmapped call (``torch.vmap``) over their
    stacked weights (the module docstring): the route of networks that do not fuse."""

    def __init__(self, members: list, aug, device: torch.device, plain_norms: bool = False):
        super().__init__(members, aug, device)
        nets = [m.parts.net for m in members]
        self.params = _stack(nets, "named_parameters", requires_grad=True)
        self.buffers = _stack(nets, "named_buffers")
        self.grads = []
        for k, net in enumerate(nets):  # each member's own tensors become views of the stack
            self.grads.append([(p, self.params[name], k) for name, p in net.named_parameters()])
            for name, p in net.named_parameters():
                p.data = self.params[name].detach()[k]
            for name, b in net.named_buffers():
                b.data = self.buffers[name][k]
        self.template = copy.deepcopy(nets[0]).to("meta")
        self.template.channels_last = False  # vmap cannot keep a memory format
        self.plain_norms = _write_norms_in_plain_ops(self.template) if plain_norms else 0
        self.lowered = _lower_precision(self.template) if members[0].parts.use_bf16 else set()

    def train(self) -> None:
        self.template.train()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = {
            name: p.to(torch.bfloat16) if name in self.lowered else p
            for name, p in self.params.items()
        }
        return torch.vmap(self._member, randomness="different")(params, self.buffers, x)

    def _member(self, params, buffers, x):
        return functional_call(self.template, (params, buffers), (x,), {"return_embedding": True})


class LoopedStep:
    """The members of a pack that failed its check, each trained by its own step as alone, one
    after another (a diverged member steps on too, as in a packed step: its results are no
    longer read)."""

    def __init__(self, solos: list):
        self.solos = solos

    def train(self) -> None:
        for solo in self.solos:
            solo.train()

    def drop(self, k: int) -> None:
        pass

    def __call__(self, idx: torch.Tensor):
        outs = [solo(idx[k : k + 1]) for k, solo in enumerate(self.solos)]
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


def checked_pack(members: list, solos: list, aug, device: torch.device, idx: torch.Tensor):
    """The first of the members' packed steps that runs on this device and gives each member,
    on batches ``idx``, the losses its own step (``solos``) gives from the same state: fused
    (``FusedStep``, for networks ``fermodel.fused`` takes), vmapped (``PackedStep``), vmapped
    with its BatchNorms in plain ops; else a ``LoopedStep`` of ``solos``. Each member's notes
    say which and why. The checks' steps are undone (``fermodel.graphs.Snapshot``), so the
    trials train exactly the steps they would. An out-of-memory is raised, never taken for a
    failed check: a smaller pack may fit."""
    k = len(members)
    net = members[0].parts.net
    tries = []  # (note if it passes, how to build it)
    failed = []  # why the tries before failed
    unfused = why_not_fusable(net) if FUSION else "fusion turned off"
    if unfused is None:
        tries.append(
            (
                f"{FUSED_NOTE}: {k} trials as one network of {k} times the channels",
                lambda: FusedStep(members, aug, device),
            )
        )
    else:
        failed.append(f"not fused: {unfused}")
    tries.append((VMAP_NOTE, lambda: PackedStep(members, aug, device)))
    # a network without such BatchNorms would only fail again
    if any(_plain_norm_fits(m) for m in net.modules()):
        tries.append((PLAIN_NORMS_NOTE, lambda: PackedStep(members, aug, device, plain_norms=True)))
    for note, build in tries:
        step = build()
        why = _check(step, members, solos, idx)
        if why is None:
            for m in members:
                m.notes.append(note + (f" ({'; '.join(failed)})" if failed else ""))
            return step
        failed.append(f"{note.split(':')[0]} failed its check: {why}")
    note = f"{PACKING_OFF_NOTE}: {'; '.join(failed)}; trained one after another"
    for m in members:
        m.notes.append(note)
    return LoopedStep(solos)


def _check(packed: PackedStep, members: list, solos: list, idx: torch.Tensor) -> str | None:
    """Why one packed step on ``idx`` is not each member's own step from the same state (None
    when it is); the state is put back either way."""
    from fermodel.graphs import Snapshot, state_tensors

    saved = Snapshot(lambda: state_tensors(members, packed), [m.augment_gen for m in members])
    why = None
    try:
        packed.train()
        together = packed(idx)[2].detach().double().cpu()
        saved.restore()
        for solo in solos:
            solo.train()
        alone = torch.cat([solo(idx[k : k + 1])[2].detach() for k, solo in enumerate(solos)])
        alone = alone.double().cpu()
    except torch.cuda.OutOfMemoryError:
        saved.restore()
        raise
    except Exception as err:  # vmap of an op this device's kernels refuse
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    try:  # once, whatever happened above
        saved.restore()
    except RuntimeError as err:
        why = why or str(err)
    if why is None:
        tolerance = 5e-2 if members[0].parts.use_bf16 else 1e-3  # bf16 rounds to 2 decimals
        if not torch.allclose(together, alone, rtol=tolerance, atol=1e-6):
            why = f"its losses {together.tolist()} differ from the members' own {alone.tolist()}"
    return why


FUSION = True  # False: packs of fusable networks take vmap too (bench/gpu.py --vmap measures it)

# how a pack's members' notes start: the route its step took (bench/gpu.py and pack_throughput
# pick them out)
FUSED_NOTE = "packed fused"
VMAP_NOTE = "packed by vmap"
PLAIN_NORMS_NOTE = "packed by vmap with BatchNorm in plain ops"
PACKING_OFF_NOTE = "packing off"
PACK_NOTES = (FUSED_NOTE, VMAP_NOTE, PACKING_OFF_NOTE)

LOWER_PRECISION = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)  # what autocast lowers here
NORMS = (torch.nn.modules.batchnorm._BatchNorm,)


def _lower_precision(template: torch.nn.Module) -> set[str]:
    """Sets the template's layers to bf16 mixed precision (the module docstring); returns the
    names of the weights and biases that the step gives them in bf16."""
    names = set()
    for prefix, module in template.named_modules():
        if isinstance(module, LOWER_PRECISION):
            module.register_forward_pre_hook(_inputs_to_bf16)
            names |= {f"{prefix}.{name}" for name, _ in module.named_parameters(recurse=False)}
        elif isinstance(module, NORMS):
            module.register_forward_pre_hook(_norm_input_to_fp32)
            module.register_forward_hook(_norm_output_as_its_input)
    return names


def _plain_norm_fits(module: torch.nn.Module) -> bool:
    """Whether ``_plain_norm`` computes ``module``: a BatchNorm with weights, running statistics
    and a momentum (others keep torch's)."""
    return (
        isinstance(module, NORMS)
        and module.affine
        and module.track_running_stats
        and module.momentum is not None
    )


def _write_norms_in_plain_ops(template: torch.nn.Module) -> int:
    """Gives the template's BatchNorms the forward ``_plain_norm`` (the module docstring);
    returns how many."""
    count = 0
    for module in template.modules():
        if _plain_norm_fits(module):
            module.forward = types.MethodType(_plain_norm, module)
            count += 1
    return count


def _plain_norm(self, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm's forward in plain ops: normalised by the batch's statistics in training, by
    the running ones in evaluation; the running variance is updated with the unbiased
    variance, as torch's is."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if self.training:
        var, mean = torch.var_mean(x, dims, correction=0)
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean, alpha=m)
            self.running_var.mul_(1 - m).add_(var, alpha=m * n / (n - 1))
            self.num_batches_tracked.add_(1)
    else:
        mean, var = self.running_mean, self.running_var
    scale = self.weight * torch.rsqrt(var + self.eps)
    return x * scale.view(shape) + (self.bias - mean * scale).view(shape)


def _inputs_to_bf16(module, args):
    return tuple(a.to(torch.bfloat16) if torch.is_tensor(a) else a for a in args)


def _norm_input_to_fp32(module, args):
    module.input_dtype = args[0].dtype  # read back by the forward hook of this same call
    return (args[0].float(), *args[1:])


def _norm_output_as_its_input(module, args, output):
    return output.to(module.input_dtype)


def _stack(nets, which: str, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    tensors = [dict(getattr(net, which)()) for net in nets]
    stacked = {}
    for name in tensors[0]:
        t = torch.stack([d[name].detach().contiguous() for d in tensors])
        stacked[name] = t.requires_grad_() if requires_grad else t
    return stacked
