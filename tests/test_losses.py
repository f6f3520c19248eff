"""Center loss, Island loss and the joint loss against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from fermodel import LOSS_KINDS, CenterLoss, IslandLoss, JointLoss

R2 = math.sqrt(2)


def planted(loss):
    """Three classes in 2-D: centers (1,0), (0,1), (1,1); a batch of labels 0, 1, 0."""
    loss.centers.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    return x, y


def test_center_loss_value_is_half_the_mean_squared_distance():
    loss = CenterLoss(3, 2).eval()
    x, y = planted(loss)
    # 1/2 * (|(1,0)|^2 + |(0,2)|^2 + |(0,1)|^2) / 3
    assert loss(x, y).item() == pytest.approx(1.0)


def test_island_loss_value_adds_lam1_times_the_ordered_pair_cosines():
    loss = IslandLoss(3, 2, lam1=10.0).eval()
    x, y = planted(loss)
    # pairs (0,1): cos 0; (0,2) and (1,2): cos 1/sqrt2; each ordered pair twice, +1 on each
    pair_sum = 2 * ((0 + 1) + (1 / R2 + 1) + (1 / R2 + 1))
    assert loss(x, y).item() == pytest.approx(1.0 + 10.0 * pair_sum)


def test_center_update_follows_the_rule_with_the_island_gradient():
    loss = IslandLoss(3, 2, lam1=1.0, alpha=0.5).train()
    x, y = planted(loss)
    value = loss(x, y)  # computed with the old centers, then the centers move
    assert value.item() == pytest.approx(1.0 + 2 * (3 + 2 / R2))
    # pull: class 0 (n=2): ((1,0)-(2,0) + (1,0)-(1,1)) / 3; class 1: ((0,1)-(0,3)) / 2; 2: none
    pull = torch.tensor([[-1 / 3, -1 / 3], [0.0, -1.0], [0.0, 0.0]])
    # island gradient rows worked by hand: c0 -> (0, 1 + 1/sqrt2), c1 -> (1 + 1/sqrt2, 0), c2 -> 0
    island = torch.tensor([[0.0, 1 + 1 / R2], [1 + 1 / R2, 0.0], [0.0, 0.0]])
    delta = pull + 1.0 / (3 - 1) * island
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]) - 0.5 * delta
    torch.testing.assert_close(loss.centers, expected)


def test_center_loss_update_has_no_island_term():
    loss = CenterLoss(3, 2, alpha=0.5).train()
    x, y = planted(loss)
    loss(x, y)
    pull = torch.tensor([[-1 / 3, -1 / 3], [0.0, -1.0], [0.0, 0.0]])
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]) - 0.5 * pull
    torch.testing.assert_close(loss.centers, expected)


def test_island_gradient_is_half_the_autograd_gradient_of_the_ordered_pair_sum():
    torch.manual_seed(0)
    loss = IslandLoss(7, 16)
    c = loss.centers.clone().double().requires_grad_(True)
    cos = F.normalize(c, dim=1) @ F.normalize(c, dim=1).T
    (cos.sum() - cos.diagonal().sum()).backward()
    torch.testing.assert_close(loss.double().island_gradient(), c.grad / 2)


def test_centers_are_state_not_parameters_and_only_move_in_training_mode():
    loss = JointLoss("island", num_classes=3, feat_dim=2)
    assert list(loss.parameters()) == []
    assert "aux.centers" in loss.state_dict()
    x, y = planted(loss.aux)
    before = loss.aux.centers.clone()
    loss.eval()(torch.randn(3, 3), x, y)
    torch.testing.assert_close(loss.aux.centers, before)
    loss.train()(torch.randn(3, 3), x, y)
    assert not torch.allclose(loss.aux.centers, before)
    restored = JointLoss("island", num_classes=3, feat_dim=2)
    restored.load_state_dict(loss.state_dict())
    torch.testing.assert_close(restored.aux.centers, loss.aux.centers)


def test_repeated_updates_bring_centers_to_the_class_means():
    torch.manual_seed(0)
    loss = CenterLoss(3, 8, alpha=0.5).train()
    x = torch.randn(30, 8) + torch.arange(3).repeat_interleave(10)[:, None] * 4
    y = torch.arange(3).repeat_interleave(10)
    for _ in range(50):
        loss(x, y)
    means = torch.stack([x[y == j].mean(0) for j in range(3)])
    torch.testing.assert_close(loss.centers, means, rtol=1e-4, atol=1e-4)


def test_island_term_pushes_centers_apart():
    torch.manual_seed(0)
    # positive features, like pooled ReLU outputs, so the class means are nearly parallel
    x = 0.3 * (torch.rand(60, 16) + 1.0)
    y = torch.arange(3).repeat(20)

    def mean_cosine(loss):
        for _ in range(100):
            loss(x, y)
        c = F.normalize(loss.centers, dim=1)
        return (c @ c.T)[~torch.eye(3, dtype=torch.bool)].mean().item()

    torch.manual_seed(1)
    plain = mean_cosine(CenterLoss(3, 16).train())
    torch.manual_seed(1)
    island = mean_cosine(IslandLoss(3, 16, lam1=10.0).train())
    assert plain > 0.99 and island < 0.5


@pytest.mark.parametrize("kind", ["center", "island"])
def test_gradient_with_respect_to_the_features_passes_gradcheck(kind):
    torch.manual_seed(0)
    loss = JointLoss(kind, num_classes=4, feat_dim=5, lam=0.3).double().eval()
    logits = torch.randn(6, 4, dtype=torch.double, requires_grad=True)
    emb = torch.randn(6, 5, dtype=torch.double, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.autograd.gradcheck(lambda lg, e: loss(lg, e, y).total, (logits, emb))
    # the feature gradient is lam * (x_i - c_{y_i}) / m: the island term gives the network none
    loss(logits, emb, y).total.backward()
    torch.testing.assert_close(emb.grad, 0.3 * (emb - loss.aux.centers[y]).detach() / 6)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_with_lam_zero_the_joint_loss_is_cross_entropy(kind):
    torch.manual_seed(0)
    logits, emb, y = torch.randn(8, 7), torch.randn(8, 2048), torch.randint(0, 7, (8,))
    out = JointLoss(kind, lam=0.0).train()(logits, emb, y)
    torch.testing.assert_close(out.total, F.cross_entropy(logits, y), rtol=0, atol=0)


def test_joint_loss_adds_lam_times_the_auxiliary_term():
    torch.manual_seed(0)
    loss = JointLoss("island", num_classes=3, feat_dim=2, lam=0.01, lam1=10.0).eval()
    x, y = planted(loss.aux)
    logits = torch.randn(3, 3)
    out = loss(logits, x, y)
    aux = 1.0 + 10.0 * 2 * (3 + 2 / R2)
    assert out.aux.item() == pytest.approx(aux)
    assert out.total.item() == pytest.approx(F.cross_entropy(logits, y).item() + 0.01 * aux)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: JointLoss("arcface"), "unknown loss kind 'arcface'; known: ce, center, island"),
        (lambda: JointLoss(lam=-1), "lam must be non-negative"),
        (lambda: JointLoss(lam1=-1), "lam1 must be non-negative"),
        (lambda: JointLoss(alpha=0), r"alpha \(the center learning rate\) must be in \(0, 1\]"),
        (
            lambda: CenterLoss(3, 4)(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long)),
            r"features must have shape \[N, 4\]",
        ),
    ],
)
def test_bad_settings_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ops that copy a value to the host (or size their output from the data) and so wait for the
# device: a CUDA step with one of them cannot run ahead of Python or be captured in a graph
HOST_SYNC = {
    "_local_scalar_dense",
    "nonzero",
    "bincount",
    "masked_select",
    "unique_dim",
    "_unique2",
    "item",
}


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_the_joint_loss_and_its_center_update_never_wait_for_the_device(kind):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            boolean_index = name == "index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
            )
            seen.append("boolean-mask index" if boolean_index else name)
            return func(*args, **(kwargs or {}))

    loss = JointLoss(kind, num_classes=7, feat_dim=16)
    loss.train()
    logits = torch.randn(12, 7, requires_grad=True)
    embedding = torch.randn(12, 16, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 3])
    with Ops():
        loss(logits, embedding, labels).total.backward()
    assert seen, "no op was recorded"
    assert not (set(seen) & (HOST_SYNC | {"boolean-mask index"})), sorted(set(seen))
