"""DualNetworkMethod: which terms are computed, where their gradients go, weights, winner switch, determinism."""

import pytest
import torch
from monai.losses import DiceLoss

from bundle.losses.ramps import contrastive_ramp
from bundle.methods.dual_network import DualNetworkMethod
from bundle.networks.subnets import ResNet34Seg, SoftmaxEnsemble, VNetSeg

ALL_WEIGHTS = {"sup": 1.0, "cr": 0.5, "cps": 1.0, "efs": 1.0, "ue": 1.0, "pgl": 1.0, "cos": 1.0}


def make_method(weights, seed=0, num_classes=2, dropout=0.5, **kwargs):
    torch.manual_seed(seed)
    net_a = ResNet34Seg(out_channels=num_classes, base_width=4, dropout=dropout)
    net_b = VNetSeg(out_channels=num_classes, base_width=4, dropout=dropout)
    return DualNetworkMethod(net_a, net_b, weights, max_iterations=6000, pgl_sample_fraction=0.2, **kwargs)


def make_batch(seed=1, num_classes=2, size=16):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 1, size, size, size)
    labeled = torch.randn(shape, generator=generator)
    label = torch.randint(0, num_classes, shape, generator=generator)
    return labeled, label, torch.randn(shape, generator=generator)


def balance_heads(method, images):
    """Shift each head's foreground bias so that the net predicts foreground on about half of ``images``: freshly
    initialised tiny nets often predict one class everywhere, and then the two nets never agree (no prototypes)."""
    with torch.no_grad():
        for net in (method.net_a, method.net_b):
            logits = net(images)
            net.head.bias[1] -= (logits[:, 1] - logits[:, 0]).median()


def gradient_mass(module):
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def test_all_terms_are_finite_scalars():
    method = make_method(ALL_WEIGHTS)
    labeled, label, unlabeled = make_batch()
    balance_heads(method, torch.cat([labeled, unlabeled]))
    losses = method.compute_losses(labeled, label, unlabeled, iteration=0)
    assert set(losses) == set(ALL_WEIGHTS)
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    assert losses["pgl"].item() > 0 and losses["efs"].item() > 0 and losses["cps"].item() > 0


@pytest.mark.parametrize(
    "term, to_a, to_b",
    [
        ("sup", True, True),
        ("cr", True, True),
        ("cps", True, True),
        ("efs", True, True),
        ("ue", True, False),
        ("cos", True, True),
    ],
)
def test_gradient_reaches_the_right_networks(term, to_a, to_b):
    method = make_method({term: 1.0})
    losses = method.compute_losses(*make_batch(), iteration=0)
    assert set(losses) == {term}
    losses[term].backward()
    assert (gradient_mass(method.net_a) > 0) == to_a
    assert (gradient_mass(method.net_b) > 0) == to_b


@pytest.mark.parametrize("winner, loser", [("net_b", "net_a"), ("net_a", "net_b")])
def test_winner_switch_picks_the_loser_features_for_pgl(winner, loser):
    method = make_method({"pgl": 1.0}, dropout=0.0)
    labeled, _, unlabeled = make_batch()
    images = torch.cat([labeled, unlabeled])
    balance_heads(method, images)
    with torch.no_grad():  # the winner's own prediction as ground truth: its Dice loss is the smaller one
        label = getattr(method, winner)(images)[:2].argmax(dim=1, keepdim=True)
    losses = method.compute_losses(labeled, label, unlabeled, iteration=0)
    assert method.pgl_feature_net == loser[-1]
    dice = DiceLoss(softmax=True, to_onehot_y=True, include_background=False, squared_pred=True, batch=True)
    with torch.no_grad():
        dice_a = dice(method.net_a(images)[:2], label).item()
        dice_b = dice(method.net_b(images)[:2], label).item()
    assert (dice_b < dice_a) == (loser == "net_a")
    assert losses["pgl"].item() > 0
    losses["pgl"].backward()
    assert gradient_mass(getattr(method, loser)) > 0
    assert gradient_mass(getattr(method, winner)) == 0


@pytest.mark.parametrize("detach", [False, True])
def test_pgl_trains_only_the_loser(detach):
    method = make_method({"pgl": 1.0}, pgl_detach_prototypes=detach)
    labeled, label, unlabeled = make_batch()
    balance_heads(method, torch.cat([labeled, unlabeled]))
    losses = method.compute_losses(labeled, label, unlabeled, iteration=0)
    assert losses["pgl"].item() > 0
    losses["pgl"].backward()
    loser, other = (method.net_a, method.net_b) if method.pgl_feature_net == "a" else (method.net_b, method.net_a)
    assert gradient_mass(loser) > 0 and gradient_mass(other) == 0


def test_three_classes():
    method = make_method(ALL_WEIGHTS, num_classes=3)
    losses = method.compute_losses(*make_batch(num_classes=3), iteration=100)
    assert set(losses) == set(ALL_WEIGHTS) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert gradient_mass(method.net_a) > 0 and gradient_mass(method.net_b) > 0


def test_supervised_only_needs_no_unlabeled_batch():
    method = make_method({"sup": 1.0, "cr": 0.5})
    assert method.uses_unlabeled is False
    labeled, label, _ = make_batch()
    losses = method.compute_losses(labeled, label, None, iteration=0)
    assert set(losses) == {"sup", "cr"}
    assert make_method({"sup": 1.0, "cos": 1.0}).uses_unlabeled is True


def test_missing_unlabeled_batch_is_an_error():
    labeled, label, _ = make_batch()
    with pytest.raises(ValueError, match="unlabeled"):
        make_method({"sup": 1.0, "efs": 1.0}).compute_losses(labeled, label, None, iteration=0)


def test_unknown_term_and_bad_options_are_rejected():
    with pytest.raises(ValueError, match="unknown"):
        make_method({"mse": 1.0})
    with pytest.raises(ValueError, match="mask_rule"):
        make_method({"sup": 1.0}, cr_mask="and")
    with pytest.raises(ValueError, match="reliability"):
        make_method({"sup": 1.0}, pgl_reliability="other")


def test_term_weights_ramp_only_pgl():
    method = make_method(dict(ALL_WEIGHTS, pgl=2.0), pgl_ramp_step=150)
    for iteration, ramp in ((0, 0.000674), (3000, 0.028650), (5999, 0.099688), (6000, 0.1)):
        weights = method.term_weights(iteration)
        assert weights["pgl"] == pytest.approx(2.0 * ramp, abs=2e-6)
        assert {k: v for k, v in weights.items() if k != "pgl"} == {k: v for k, v in ALL_WEIGHTS.items() if k != "pgl"}
    smooth = make_method({"pgl": 1.0})
    assert smooth.term_weights(3001)["pgl"] == pytest.approx(contrastive_ramp(3001, 6000))
    assert smooth.term_weights(3001)["pgl"] != pytest.approx(method.term_weights(3001)["pgl"] / 2)


def test_identical_results_for_a_fixed_seed():
    labeled, label, unlabeled = make_batch()
    runs = []
    for _ in range(2):
        method = make_method(ALL_WEIGHTS, seed=5)
        balance_heads(method, torch.cat([labeled, unlabeled]))
        torch.manual_seed(7)  # dropout masks and PGL sampling draw from the global RNG
        runs.append({k: v.item() for k, v in method.compute_losses(labeled, label, unlabeled, iteration=10).items()})
    assert runs[0] == runs[1]
    assert runs[0]["pgl"] > 0


def test_inference_network_shares_subnets_without_duplicate_state():
    method = make_method(ALL_WEIGHTS)
    ensemble = method.inference_network()
    assert isinstance(ensemble, SoftmaxEnsemble) and ensemble is method.inference_network()
    assert ensemble.net_a is method.net_a and ensemble.net_b is method.net_b
    subnet_keys = {k for k in method.state_dict() if k.startswith(("net_a.", "net_b."))}
    assert subnet_keys == set(method.state_dict()) == set(ensemble.state_dict())
    with torch.no_grad():
        method.net_a.head.bias.add_(1.0)
    assert torch.equal(ensemble.state_dict()["net_a.head.bias"], method.net_a.head.bias)
