"""DuCiSC: each loss against hand-computed values, the threshold buffer, the network, and bundle runs (training,
label poisoning, inference of the saved model)."""

import math

import pytest
import torch
from torch.nn import functional as F

from bundle.losses.ducisc import (
    DeepSupervisedCEDiceLoss,
    PrototypeAlignmentLoss,
    masked_average_prototypes,
    normalize_by_value,
    resize_label,
)
from bundle.losses.functional import one_hot
from bundle.methods.ducisc import DuCiSCMethod, SelfAwareThresholds, mixup
from bundle.networks.peer import DeepSupervisedVNet
from tests.peer_helpers import make_workflow, poisoned_histories, segment_with_inference, train_tiny_overlay

WEIGHTS = {"sup": 1.0, "cs_ulb": 0.3, "cs_mix": 0.1, "proto_ulb": 0.1, "proto_mix": 0.1}


def _voxels(values, dtype=torch.float32):
    """A list of per-voxel rows ``[[c0, c1], ...]`` -> ``(1, C, V, 1, 1)``."""
    return torch.tensor(values, dtype=dtype).T.reshape(1, len(values[0]), len(values), 1, 1)


# ------------------------------------------------------------------------------------------------- thresholds
def test_threshold_init_update_rule_and_clip():
    thresholds = SelfAwareThresholds(num_scales=1, num_classes=2, beta=0.9, t_min=0.5, t_max=0.95)
    torch.testing.assert_close(thresholds.thresholds, torch.full((1, 2), 0.5))  # Eq. 8: 1 / C
    student = _voxels([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    pseudo = torch.tensor([0, 0, 1, 1]).view(1, 1, 4, 1, 1)
    thresholds.update(student, pseudo, 0)
    # P_bg = (0.8 + 0.6) / 2 = 0.7, P_fg = (0.7 + 0.9) / 2 = 0.8; T = 0.9 * 0.5 + 0.1 * P
    torch.testing.assert_close(thresholds.thresholds, torch.tensor([[0.52, 0.53]]))
    # clip: towards P = 1 with beta = 0 the raw update would be 1.0 -> 0.95; towards P = 0.1 -> 0.5
    high = SelfAwareThresholds(1, 2, beta=0.0, t_min=0.5, t_max=0.95)
    high.update(_voxels([[0.99, 0.01], [0.01, 0.99]]), torch.tensor([0, 1]).view(1, 1, 2, 1, 1), 0)
    torch.testing.assert_close(high.thresholds, torch.tensor([[0.95, 0.95]]))
    low = SelfAwareThresholds(1, 2, beta=0.0, t_min=0.5, t_max=0.95)
    low.update(_voxels([[0.1, 0.9], [0.9, 0.1]]), torch.tensor([0, 1]).view(1, 1, 2, 1, 1), 0)
    torch.testing.assert_close(low.thresholds, torch.tensor([[0.5, 0.5]]))
    # the paper's unclipped rule with t_min=0, t_max=1
    free = SelfAwareThresholds(1, 2, beta=0.0, t_min=0.0, t_max=1.0)
    free.update(_voxels([[0.1, 0.9], [0.9, 0.1]]), torch.tensor([0, 1]).view(1, 1, 2, 1, 1), 0)
    torch.testing.assert_close(free.thresholds, torch.tensor([[0.1, 0.1]]))


def test_threshold_empty_class_keeps_value_and_mask_rule():
    thresholds = SelfAwareThresholds(num_scales=2, num_classes=2, beta=0.5)
    thresholds.update(_voxels([[0.9, 0.1], [0.7, 0.3]]), torch.zeros(1, 1, 2, 1, 1, dtype=torch.long), 1)
    # only scale 1 / class 0 moves: 0.5 * 0.5 + 0.5 * 0.8 = 0.65; no foreground voxel -> T_fg unchanged
    torch.testing.assert_close(thresholds.thresholds, torch.tensor([[0.5, 0.5], [0.65, 0.5]]))
    assert not torch.isnan(thresholds.thresholds).any()
    teacher = _voxels([[0.6, 0.4], [0.7, 0.3], [0.4, 0.6], [0.5, 0.5]])
    # scale 1: T_bg = 0.65, T_fg = 0.5 -> [0.6 > 0.65, 0.7 > 0.65, 0.6 > 0.5, 0.5 > 0.65 (tie -> class 0)]
    assert thresholds.mask(teacher, 1).flatten().tolist() == [False, True, True, False]
    assert thresholds.mask(teacher, 0).flatten().tolist() == [True, True, True, False]


def test_threshold_shared_row_updates_from_full_resolution_only():
    thresholds = SelfAwareThresholds(num_scales=4, num_classes=2, beta=0.0, per_scale=False)
    student, pseudo = _voxels([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 1]).view(1, 1, 2, 1, 1)
    thresholds.update(student, pseudo, 0)
    torch.testing.assert_close(thresholds.thresholds, torch.tensor([[0.5, 0.5]]))
    thresholds.update(student, pseudo, 3)
    torch.testing.assert_close(thresholds.thresholds, torch.tensor([[0.9, 0.8]]))


# ----------------------------------------------------------------------------------------------- prototypes
def test_masked_average_prototypes_by_hand():
    features = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]]).view(1, 2, 4, 1, 1)
    weights = one_hot(torch.tensor([0, 1, 0, 1]).view(1, 1, 4, 1, 1), 2)
    protos, mass = masked_average_prototypes(features, weights)
    torch.testing.assert_close(protos, torch.tensor([[[2.0, 20.0], [3.0, 30.0]]]))
    torch.testing.assert_close(mass, torch.tensor([[2.0, 2.0]]))
    soft = torch.tensor([[0.5, 1.0, 0.0, 0.0], [0.5, 0.0, 1.0, 1.0]]).view(1, 2, 4, 1, 1)  # Eq. 6: soft weights
    protos, _ = masked_average_prototypes(features, soft)
    torch.testing.assert_close(protos[0, 0], torch.tensor([2.5 / 1.5, 25.0 / 1.5]))
    torch.testing.assert_close(protos[0, 1], torch.tensor([7.5 / 2.5, 75.0 / 2.5]))


def test_prototype_alignment_code_and_paper_forms():
    features_a = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).view(1, 2, 2, 1, 1)  # p_bg = (1, 5), p_fg = (3, 7)
    features_b = torch.tensor([[2.0, 0.0], [4.0, 2.0]]).view(1, 2, 2, 1, 1)  # p_bg = (2, 4), p_fg = (0, 2)
    weights = one_hot(torch.tensor([0, 1]).view(1, 1, 2, 1, 1), 2)
    code = PrototypeAlignmentLoss(batch_mean=True)([features_a], [weights], [features_b], [weights])
    # MSE over C x Z = 4 entries: (1 + 1 + 9 + 25) / 4 = 9
    assert float(code) == pytest.approx(9.0)
    paper = PrototypeAlignmentLoss(batch_mean=False)([features_a] * 2, [weights] * 2, [features_b] * 2, [weights] * 2)
    # (1/C) sum_s sum_c ||.||^2 = (1/2) * 2 levels * (2 + 34) = 36
    assert float(paper) == pytest.approx(36.0)
    # batch mean of two samples on one side: p_bg = mean((1,5),(3,5)) = (2,5)
    features_a2 = torch.cat([features_a, torch.tensor([[3.0, 3.0], [5.0, 7.0]]).view(1, 2, 2, 1, 1)])
    loss = PrototypeAlignmentLoss(True)([features_a2], [weights.expand(2, -1, -1, -1, -1)], [features_b], [weights])
    assert float(loss) == pytest.approx((0.0 + 1.0 + 9.0 + 25.0) / 4)


def test_prototype_alignment_skips_empty_class_without_nan():
    features = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    empty = one_hot(torch.zeros(1, 1, 2, 2, 2, dtype=torch.long), 2)  # no foreground
    full = one_hot(torch.tensor([0, 1] * 4).view(1, 1, 2, 2, 2), 2)
    loss = PrototypeAlignmentLoss(True)([features], [full], [features * 2], [empty])
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(features.grad).all()
    both = PrototypeAlignmentLoss(True)([features, features], [full, empty], [features * 2] * 2, [full, full])
    expected = F.mse_loss(*(masked_average_prototypes(f, full)[0].mean(0) for f in (features, features * 2)))
    assert both.item() == pytest.approx(expected.item())  # the empty level is left out of the mean


# -------------------------------------------------------------------------------------------- CE / Dice terms
def test_masked_ce_dice_by_hand_and_empty_mask():
    logits = torch.zeros(1, 2, 4, 1, 1, requires_grad=True)  # p = 0.5 everywhere
    target = one_hot(torch.tensor([0, 1, 1, 0]).view(1, 1, 4, 1, 1), 2)
    mask = torch.tensor([True, True, False, False]).view(1, 1, 4, 1, 1)
    loss = DeepSupervisedCEDiceLoss("ce")([logits], [target], [mask])
    dice = 1.0 - (2 * 0.5 + 1e-8) / (1.0 + 1.0 + 1e-8)  # p_fg = (.5, .5), y_fg = (0, 1) on the two masked voxels
    assert loss.item() == pytest.approx(0.5 * (math.log(2.0) + dice))
    # two scales, the coarse one empty: left out of both means
    empty = torch.zeros_like(mask)
    two_scales = DeepSupervisedCEDiceLoss("ce")([logits, logits], [target, target], [empty, mask])
    assert two_scales.item() == pytest.approx(loss.item())
    nothing = DeepSupervisedCEDiceLoss("ce")([logits], [target], [empty])
    assert nothing.item() == 0.0
    nothing.backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) == 0.0


def test_mixed_kl_and_soft_ce_by_hand():
    logits = torch.zeros(1, 2, 1, 1, 1)
    soft = torch.tensor([0.25, 0.75]).view(1, 2, 1, 1, 1)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    dice = 1.0 - (2 * 0.5 * 0.75 + 1e-8) / (0.5 + 0.75 + 1e-8)
    assert float(DeepSupervisedCEDiceLoss("kl")([logits], [soft])) == pytest.approx(0.5 * (kl / 2 + dice))
    assert float(DeepSupervisedCEDiceLoss("ce")([logits], [soft])) == pytest.approx(0.5 * (math.log(2.0) + dice))


def test_normalize_by_value_keeps_value_and_scales_gradient():
    x = torch.tensor(2.0, requires_grad=True)
    loss = normalize_by_value(x**2)  # L = 4, grad L = 4 -> grad L / L = 1
    assert loss.item() == pytest.approx(4.0)
    loss.backward()
    assert float(x.grad) == pytest.approx(1.0)
    zero = torch.zeros((), requires_grad=True)
    assert normalize_by_value(zero * 1.0).item() == 0.0


def test_mixup_and_nearest_label_resize():
    x_l, x_u = torch.ones(1, 1, 2, 1, 1), torch.zeros(1, 1, 2, 1, 1)
    y_l = one_hot(torch.tensor([1, 0]).view(1, 1, 2, 1, 1), 2)
    ybar = one_hot(torch.tensor([1, 1]).view(1, 1, 2, 1, 1), 2)
    mixed, soft = mixup(x_l, y_l, x_u, ybar, torch.tensor([0.3]))
    torch.testing.assert_close(mixed.flatten(), torch.tensor([0.3, 0.3]))
    torch.testing.assert_close(soft[0, 1].flatten(), torch.tensor([1.0, 0.7]))  # {1, 1 - sigma}
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(1, 2, 1, 1))
    label = torch.arange(8).view(1, 1, 2, 2, 2)
    assert resize_label(label, (1, 1, 1)).flatten().tolist() == [0]


# ----------------------------------------------------------------------------------------- network, method
def test_deep_supervised_vnet_shapes_and_forward():
    net = DeepSupervisedVNet(base_width=4).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    logits, taps = net.forward_deep(x)
    assert [tuple(z.shape[1:]) for z in logits] == [(2, 2, 2, 2), (2, 4, 4, 4), (2, 8, 8, 8), (2, 16, 16, 16)]
    assert [tuple(f.shape[1:]) for f in taps] == [(32, 2, 2, 2), (16, 4, 4, 4), (8, 8, 8, 8), (4, 16, 16, 16)]
    torch.testing.assert_close(net(x), logits[-1])


def _method(**kwargs):
    torch.manual_seed(0)
    return DuCiSCMethod(DeepSupervisedVNet(base_width=4), WEIGHTS, 10, **kwargs).train()


def _batch():
    generator = torch.Generator().manual_seed(1)
    labeled = torch.randn(2, 1, 16, 16, 16, generator=generator)
    label = (torch.rand(2, 1, 16, 16, 16, generator=generator) > 0.5).long()
    return labeled, label, torch.randn(2, 1, 16, 16, 16, generator=generator)


def test_warmup_only_supervised_and_thresholds_frozen():
    method = _method(warmup_iters=5)
    assert method.term_weights(4) == {**{k: 0.0 for k in WEIGHTS}, "sup": 1.0}
    assert method.term_weights(5) == WEIGHTS
    losses = method(*_batch(), 0)
    assert set(losses) == {"sup"}
    torch.testing.assert_close(method.thresholds.thresholds, torch.full((4, 2), 0.5))
    losses = method(*_batch(), 5)
    assert set(losses) == set(WEIGHTS) and all(torch.isfinite(v) for v in losses.values())
    assert not torch.equal(method.thresholds.thresholds, torch.full((4, 2), 0.5))  # updated after the warm-up


def test_thresholds_are_saved_and_restored_with_the_method():
    method = _method(warmup_iters=0)
    method(*_batch(), 0)
    state = method.state_dict()
    assert "thresholds.thresholds" in state and state["thresholds.thresholds"].shape == (4, 2)
    fresh = _method(warmup_iters=0)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.thresholds.thresholds, method.thresholds.thresholds)
    assert all(not p.requires_grad for p in method.teacher.parameters())


def test_normalised_terms_keep_values_of_the_plain_sum():
    normalised, plain = _method(warmup_iters=0), _method(warmup_iters=0, normalize_by_value=False)
    torch.manual_seed(3)
    plain_losses = plain(*_batch(), 0)
    torch.manual_seed(3)
    normalised_losses = normalised(*_batch(), 0)
    for name in WEIGHTS:
        assert float(normalised_losses[name].detach()) == pytest.approx(float(plain_losses[name].detach()), rel=1e-5)


def test_inference_network_is_the_student_softmax():
    method = _method()
    network = method.inference_network().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(network(x), torch.softmax(method.student.eval()(x), dim=1))
    assert all(k.startswith("net.") for k in network.state_dict())


# -------------------------------------------------------------------------------------------------- bundle
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 3-iteration bundle run of the overlay on tiny NIfTI data, all terms on from the first iteration."""
    return train_tiny_overlay(tmp_path_factory, "ducisc", {"method#warmup_iters": 0})


def test_overlay_trains_every_term_and_writes_model(trained):
    workflow, history = trained["workflow"], trained["history"]
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 3 and len(history) == 3
    assert workflow.parser["train#preprocessing#augment"] is True
    for output in history:
        assert {f"loss_{name}" for name in WEIGHTS} <= set(output)
        assert all(math.isfinite(v) for v in output.values())
    state = torch.load(trained["out"] / "models" / "model.pt", weights_only=True)
    assert state and all(k.startswith("net.") for k in state) and "net.ds_heads.0.weight" in state
    checkpoint = torch.load(trained["out"] / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert "thresholds.thresholds" in checkpoint["method"]


def test_overlay_default_warmup_scales_with_short_runs(tmp_path):
    small = {"method#student#base_width": 4}
    workflow = make_workflow(["train.json", "methods/ducisc.json"], {"max_iterations": 600, **small})
    assert workflow.parser.get_parsed_content("method").warmup_iters == 200
    workflow = make_workflow(["train.json", "methods/ducisc.json"], {"max_iterations": 15000, **small})
    assert workflow.parser.get_parsed_content("method").warmup_iters == 2000


def test_saved_model_runs_through_inference_json_alone(trained, tmp_path):
    segment_with_inference(trained, tmp_path / "pred", sw_strides=[8, 8, 8])


def test_poisoned_unlabeled_labels_change_no_loss(tmp_path):
    histories = poisoned_histories("ducisc", tmp_path, {"method#warmup_iters": 0})
    assert any(name.startswith("loss_proto") for name in histories[0][0])
