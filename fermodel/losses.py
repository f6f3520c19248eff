"""Center loss, Island loss and the joint loss ``L = CE + lam * L_aux``.

Center loss: Wen, Zhang, Li, Qiao. A Discriminative Feature Learning Approach for Deep Face
Recognition. ECCV 2016.  Island loss: Cai, Meng, Khan, Li, O'Reilly, Tong. Island Loss for
Learning Discriminative Features in Facial Expression Recognition. FG 2018.

Choices, where public implementations disagree:

- The center term is averaged over the batch, ``1/(2m) * sum_i ||x_i - c_{y_i}||^2``, as in Wen
  et al.'s released Caffe layer (it divides by the batch size m), on which lam = 0.01 was tuned;
  both papers write the plain sum. With the sum and lam = 0.01 the center pull outweighs the
  cross-entropy by about the batch size and collapses the embedding: on the synthetic set a
  ResNet-18 stayed at chance for 15 epochs with the sum and reached 49% with the mean.
- Centers are a buffer of the loss module (saved in its state dict), never a parameter: the
  network's optimiser does not see them. Like BatchNorm's running statistics, they move during
  ``forward`` when the module is in training mode, by the papers' rule
  ``c_j <- c_j - alpha * delta_c_j`` with ``delta_c_j = sum_{i: y_i=j} (c_j - x_i) / (1 + n_j)``;
  Island loss adds to ``delta_c_j`` the gradient of its pairwise term,
  ``lam1 / (K - 1) * sum_{k != j} [c_k / (|c_k||c_j|) - (c_k . c_j) c_j / (|c_k| |c_j|^3)]``
  with K the number of classes, for every class (also those absent from the batch). The loss
  value is computed with the centers from before the update.
- Centers start as a small normal draw (0.01 * N(0, 1)): not zero, since the cosine of a zero
  center is undefined, and small, so the first updates move them to their class's features.
- The loss is computed in the centers' dtype (float32), also under autocast.
- Nothing here waits for the device (no bincount, boolean mask or ``.item()``), so a training
  step can run ahead of the host and be captured in a CUDA graph; tests/test_losses.py checks
  the ops that run.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fermodel.config import LOSS_KINDS

LossKind = Literal["ce", "center", "island"]


def center_term(features: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor):
    """``1/(2m) * sum_i ||x_i - c_{y_i}||^2`` over a batch of m, in the centers' dtype."""
    x = features.to(centers.dtype)
    return 0.5 * (x - centers[labels]).pow(2).sum() / max(len(labels), 1)


def center_pull(features: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor):
    """``delta_c_j = sum_{i: y_i=j} (c_j - x_i) / (1 + n_j)`` for every class j."""
    x = features.detach().to(centers.dtype)
    # per-class counts and sums through a one-hot matrix: no bincount (which waits for the
    # device to size its output) and one batched matmul under vmap (packed trials)
    classes = torch.arange(centers.shape[0], device=centers.device)
    one_hot = (labels[:, None] == classes).to(centers.dtype)
    counts = one_hot.sum(0)
    feature_sums = one_hot.T @ x
    return (counts[:, None] * centers - feature_sums) / (1 + counts[:, None])


def island_term(centers: torch.Tensor) -> torch.Tensor:
    """``sum_j sum_{k != j} (cos(c_k, c_j) + 1)`` over ordered class pairs."""
    c = F.normalize(centers, dim=1)
    cos = c @ c.T
    return ((cos + 1) * _off_diagonal(cos)).sum()


def island_gradient(centers: torch.Tensor) -> torch.Tensor:
    """Row j: ``sum_{k != j} [c_k / (|c_k||c_j|) - (c_k . c_j) c_j / (|c_k| |c_j|^3)]``."""
    c = centers
    norm = c.norm(dim=1)
    inv = 1.0 / (norm[:, None] * norm[None, :]) * _off_diagonal(c)  # 1 / (|c_j||c_k|), j != k
    dots = c @ c.T
    return inv @ c - ((inv * dots).sum(dim=1) / norm.pow(2))[:, None] * c


def _off_diagonal(like: torch.Tensor) -> torch.Tensor:
    """A multiplying mask, not a boolean index (which would wait for the device)."""
    n = like.shape[0]
    return 1 - torch.eye(n, dtype=like.dtype, device=like.device)


class CenterLoss(nn.Module):
    """``L_C = 1/(2m) * sum_i ||x_i - c_{y_i}||^2`` over a batch of m, with centers updated by
    the rule above."""

    def __init__(self, num_classes: int, feat_dim: int, alpha: float = 0.5):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha (the center learning rate) must be in (0, 1], got {alpha}")
        self.num_classes, self.feat_dim, self.alpha = num_classes, feat_dim, alpha
        # small but non-zero (a zero center has no cosine); the first updates pull each one
        # to its class's features, whatever their scale
        self.register_buffer("centers", 0.01 * torch.randn(num_classes, feat_dim))

    def center_term(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return center_term(features, self.centers, labels)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(features, labels)
        loss = self.center_term(features, labels)
        if self.training:
            self.update_centers(features, labels)
        return loss

    def center_delta(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``delta_c_j = sum_{i: y_i=j} (c_j - x_i) / (1 + n_j)`` for every class j."""
        return center_pull(features, self.centers, labels)

    @torch.no_grad()
    def update_centers(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.centers -= self.alpha * self.center_delta(features, labels)

    def _check(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(
                f"features must have shape [N, {self.feat_dim}], got {list(features.shape)}"
            )
        if labels.shape != features.shape[:1]:
            raise ValueError(
                f"labels must have shape [{features.shape[0]}], got {list(labels.shape)}"
            )


class IslandLoss(CenterLoss):
    """``L_IL = L_C + lam1 * sum_j sum_{k != j} (cos(c_k, c_j) + 1)`` over ordered class pairs.

    The pairwise term depends on the centers only, so it adds to the loss value but gives the
    network no gradient; it acts through the center update.
    """

    def __init__(self, num_classes: int, feat_dim: int, lam1: float = 10.0, alpha: float = 0.5):
        super().__init__(num_classes, feat_dim, alpha)
        if lam1 < 0:
            raise ValueError(f"lam1 must be non-negative, got {lam1}")
        self.lam1 = lam1

    def island_term(self) -> torch.Tensor:
        return island_term(self.centers)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(features, labels)
        loss = self.center_term(features, labels) + self.lam1 * self.island_term()
        if self.training:
            self.update_centers(features, labels)
        return loss

    def island_gradient(self) -> torch.Tensor:
        """Row j: ``sum_{k != j} [c_k / (|c_k||c_j|) - (c_k . c_j) c_j / (|c_k| |c_j|^3)]``."""
        return island_gradient(self.centers)

    def center_delta(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pull = super().center_delta(features, labels)
        return pull + self.lam1 / (self.num_classes - 1) * self.island_gradient()


class JointLossOutput(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    aux: torch.Tensor  # the unweighted center or island term (zero for "ce")


class JointLoss(nn.Module):
    """``L = CE(logits, y) + lam * L_aux(embedding, y)``, L_aux chosen by ``kind``:
    ``ce`` (none), ``center`` or ``island``. Defaults lam=0.01, lam1=10, alpha=0.5."""

    def __init__(
        self,
        kind: LossKind = "island",
        num_classes: int = 7,
        feat_dim: int = 2048,
        lam: float = 0.01,
        lam1: float = 10.0,
        alpha: float = 0.5,
    ):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss kind {kind!r}; known: {', '.join(LOSS_KINDS)}")
        if lam < 0:
            raise ValueError(f"lam must be non-negative, got {lam}")
        self.kind, self.lam = kind, lam
        self.aux: CenterLoss | None
        if kind == "center":
            self.aux = CenterLoss(num_classes, feat_dim, alpha=alpha)
        elif kind == "island":
            self.aux = IslandLoss(num_classes, feat_dim, lam1=lam1, alpha=alpha)
        else:
            self.aux = None

    def forward(
        self, logits: torch.Tensor, embedding: torch.Tensor, labels: torch.Tensor
    ) -> JointLossOutput:
        ce = F.cross_entropy(logits, labels)
        if self.aux is None:
            return JointLossOutput(ce, ce, torch.zeros_like(ce))
        aux = self.aux(embedding, labels)
        return JointLossOutput(ce + self.lam * aux, ce, aux)


def joint_loss_step(logits, embedding, labels, centers, lam, lam1, alpha):
    """The joint loss of one member of a pack of trials, as a function (``torch.vmap`` maps it
    over the members): ``(total, ce, aux, new_centers)``, equal to what ``JointLoss`` computes
    and does to its centers in training mode. Every loss kind is one formula with its weights:
    ``island`` as given; ``center`` has ``lam1 = 0`` (its pairwise term and gradient vanish);
    ``ce`` has ``lam = 0`` and ``alpha = 0`` (its placeholder centers never move), so adding
    the zero-weighted terms changes no value."""
    ce = F.cross_entropy(logits, labels)
    num_classes = centers.shape[0]
    aux = center_term(embedding, centers, labels) + lam1 * island_term(centers)
    delta = center_pull(embedding, centers, labels)
    delta = delta + lam1 / (num_classes - 1) * island_gradient(centers)
    return ce + lam * aux, ce, aux, centers - alpha * delta
