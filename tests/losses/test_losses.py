"""Every loss term against values computed by hand (plain ``math`` on known probabilities), plus edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from bundle.losses.dual_network.consistency import CosineConsistencyLoss, MaskedConsistencyLoss
from bundle.losses.dual_network.prototype import PrototypeContrastiveLoss
from bundle.losses.dual_network.pseudo import CrossPseudoSupervisionLoss, EntropyFilteredLoss, UncertaintyRectifiedLoss
from bundle.losses.dual_network.reliability import percentile, reliable_voxels, union_pseudo_label
from bundle.losses.functional import (
    check_option,
    class_argmax,
    masked_cross_entropy,
    soft_dice_loss,
    softmax_entropy,
)
from bundle.losses.ramps import contrastive_ramp, sigmoid_rampup
from bundle.losses.supervised import SupervisedLoss

SQRT2 = math.sqrt(2.0)
#: d(u, c) between 2-D directions 45 degrees apart: sqrt(2 - 2 cos 45).
D45 = math.sqrt(2.0 - SQRT2)


def binary_logits(fg_probs):
    """Logits ``(1, 2, V, 1, 1)`` whose softmax foreground probability is ``fg_probs`` (background logit 0)."""
    fg = torch.tensor(fg_probs, dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(fg), torch.log(fg / (1 - fg))])
    return logits.reshape(1, 2, -1, 1, 1).requires_grad_()


def class_logits(probs):
    """Logits ``(1, C, V, 1, 1)`` whose softmax is ``probs`` (a list of V per-voxel probability lists)."""
    return torch.log(torch.tensor(probs, dtype=torch.float64)).t().reshape(1, len(probs[0]), -1, 1, 1).requires_grad_()


def label_map(labels):
    return torch.tensor(labels).reshape(1, 1, -1, 1, 1)


def entropy(probs):
    return -sum(p * math.log(p + 1e-10) for p in probs)


def linear_percentile(values, q):
    ordered = sorted(values)
    position = q / 100 * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


# ----------------------------------------------------------------------------------------- shared functions
def test_check_option_accepts_a_choice_and_names_the_argument():
    check_option("mask_rule", "or", ("xor", "or"))
    with pytest.raises(ValueError, match=r"^mask_rule must be one of \('xor', 'or'\), got 'and'\.$"):
        check_option("mask_rule", "and", ("xor", "or"))


def test_softmax_entropy_uniform_one_hot_and_keepdim():
    uniform = torch.full((1, 2, 3, 1, 1), 0.5, dtype=torch.float64)
    assert torch.allclose(softmax_entropy(uniform, 0.0), torch.full((1, 3, 1, 1), math.log(2), dtype=torch.float64))
    three = torch.full((2, 3, 2, 2, 2), 1 / 3, dtype=torch.float64)
    h = softmax_entropy(three, 0.0, keepdim=True)
    assert h.shape == (2, 1, 2, 2, 2) and torch.allclose(h, torch.full_like(h, math.log(3)))
    certain = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 2, 1, 1, 1)
    assert softmax_entropy(certain, 1e-6).item() == pytest.approx(-math.log(1 + 1e-6), rel=1e-12)  # eps, no NaN
    p = [0.9, 0.1]
    assert softmax_entropy(torch.tensor(p, dtype=torch.float64).view(1, 2, 1), 1e-10).item() == pytest.approx(
        entropy(p)
    )


def test_masked_cross_entropy_equals_torch_ce_on_the_masked_voxels():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 3, 2), torch.randint(0, 3, (2, 4, 3, 2))
    mask = torch.rand(2, 4, 3, 2) > 0.5
    log_prob = F.log_softmax(logits, dim=1)
    expected = F.cross_entropy(logits.movedim(1, -1)[mask], target[mask])
    assert masked_cross_entropy(log_prob, target, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    soft = F.one_hot(target, 3).movedim(-1, 1).float()  # a one-hot distribution gives the same CE
    assert masked_cross_entropy(log_prob, soft, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert masked_cross_entropy(log_prob, target).item() == pytest.approx(F.cross_entropy(logits, target).item())
    weight = torch.rand(1, 4, 3, 2)  # broadcast over the batch: sum w ce / sum w
    per_voxel = F.cross_entropy(logits, target, reduction="none")
    weighted = (weight * per_voxel).sum() / (2 * weight.sum())
    assert masked_cross_entropy(log_prob, target, weight).item() == pytest.approx(weighted.item(), rel=1e-6)
    empty = torch.zeros(2, 4, 3, 2)
    assert masked_cross_entropy(log_prob, target, empty, min_denominator=1.0).item() == 0.0
    assert masked_cross_entropy(log_prob, target, empty, eps=1e-16).item() == 0.0


def test_soft_dice_loss_identical_masks_and_by_hand():
    target = F.one_hot(torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]]), 2).movedim(-1, 1).double()  # (2, 2, 4)
    for batch in (False, True):
        for background in (False, True):
            assert soft_dice_loss(target, target, 1e-5, batch=batch, include_background=background).item() == 0.0
    prob = torch.tensor([[[0.2, 0.6, 0.9, 0.5]], [[0.7, 0.4, 0.1, 0.0]]], dtype=torch.float64)
    prob = torch.cat([1 - prob, prob], dim=1)  # foreground probabilities of two samples, (2, 2, 4)
    fg_p, fg_y = [[0.2, 0.6, 0.9, 0.5], [0.7, 0.4, 0.1, 0.0]], [[0, 1, 1, 0], [1, 1, 0, 0]]
    inter = sum(p * y for ps, ys in zip(fg_p, fg_y) for p, y in zip(ps, ys))
    total = sum(map(sum, fg_p)) + sum(map(sum, fg_y))
    batch_fg = 1 - (2 * inter + 1e-8) / (total + 1e-8)
    for split in (False, True):
        got = soft_dice_loss(prob, target, 1e-8, batch=True, include_background=False, split_denominator=split)
        assert got.item() == pytest.approx(batch_fg, rel=1e-12)
    ratios = []  # per sample and class, background included
    for ps, ys in zip(fg_p, fg_y):
        for cp, cy in ((ps, ys), ([1 - p for p in ps], [1 - y for y in ys])):
            ratios.append((2 * sum(p * y for p, y in zip(cp, cy)) + 1e-5) / (sum(cp) + sum(cy) + 1e-5))
    assert soft_dice_loss(prob, target, 1e-5).item() == pytest.approx(1 - sum(ratios) / 4, rel=1e-12)
    region = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64).view(1, 1, 4)  # only the first two voxels count
    assert soft_dice_loss(prob, target, 1e-5, region).item() == pytest.approx(
        soft_dice_loss(prob[..., :2], target[..., :2], 1e-5).item(), rel=1e-12
    )


# ------------------------------------------------------------------------------------------------ supervised
def test_supervised_binary_by_hand():
    p = [0.9, 0.2, 0.6, 0.3, 0.8, 0.1, 0.7, 0.4]
    y = [1, 0, 1, 0, 1, 0, 0, 1]
    ce = sum(-math.log(pi if yi else 1 - pi) for pi, yi in zip(p, y)) / len(p)
    intersection = sum(pi * yi for pi, yi in zip(p, y))
    dice = 1 - (2 * intersection + 1e-5) / (sum(pi * pi for pi in p) + sum(y) + 1e-5)
    loss = SupervisedLoss()
    got_ce, got_dice = loss.components(binary_logits(p), label_map(y))
    assert got_ce.item() == pytest.approx(ce, rel=1e-6)
    assert got_dice.item() == pytest.approx(dice, rel=1e-6)
    assert loss(binary_logits(p), label_map(y)).item() == pytest.approx(ce + dice, rel=1e-6)


def test_supervised_three_classes_by_hand():
    probs = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.3, 0.5, 0.2]]
    y = [0, 1, 2, 2]
    ce = sum(-math.log(pr[yi]) for pr, yi in zip(probs, y)) / 4
    dices = []
    for c in (1, 2):
        inter = sum(pr[c] for pr, yi in zip(probs, y) if yi == c)
        denominator = sum(pr[c] ** 2 for pr in probs) + sum(yi == c for yi in y)
        dices.append(1 - (2 * inter + 1e-5) / (denominator + 1e-5))
    got_ce, got_dice = SupervisedLoss().components(class_logits(probs), label_map(y))
    assert got_ce.item() == pytest.approx(ce, rel=1e-6)
    assert got_dice.item() == pytest.approx(sum(dices) / 2, rel=1e-6)


def test_supervised_rejects_label_without_channel():
    with pytest.raises(ValueError, match="label must have shape"):
        SupervisedLoss()(binary_logits([0.3, 0.6]), torch.tensor([0, 1]).reshape(1, 2, 1, 1))


# ----------------------------------------------------------------------------------------------- consistency
CR_P_A = [0.9, 0.7, 0.3, 0.65, 0.2, 0.55]
CR_P_B = [0.8, 0.4, 0.7, 0.3, 0.1, 0.58]
CR_Y = [1, 0, 1, 1, 0, 0]


@pytest.mark.parametrize("rule", ["xor", "or"])
def test_masked_consistency_by_hand(rule):
    fg_a = [p >= 0.6 for p in CR_P_A]  # argmax is foreground and max >= 0.6
    fg_b = [p >= 0.6 for p in CR_P_B]
    mask = [(a != b) if rule == "xor" else (a or b) for a, b in zip(fg_a, fg_b)]
    expected = 0.0
    for probs in (CR_P_A, CR_P_B):
        expected += sum(m * (p - y) ** 2 for m, p, y in zip(mask, probs, CR_Y)) / (sum(mask) + 1e-16)
    got = MaskedConsistencyLoss(0.6, rule)(binary_logits(CR_P_A), binary_logits(CR_P_B), label_map(CR_Y))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_masked_consistency_xor_value():
    # mask = voxels 1, 2, 3; written out to pin the rule itself.
    expected = ((0.7**2 + 0.7**2 + 0.35**2) + (0.4**2 + 0.3**2 + 0.7**2)) / 3
    got = MaskedConsistencyLoss()(binary_logits(CR_P_A), binary_logits(CR_P_B), label_map(CR_Y))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_masked_consistency_three_classes_uses_every_foreground_channel():
    probs_a = [[0.1, 0.7, 0.2], [0.8, 0.1, 0.1]]  # voxel 0: confident class 1
    probs_b = [[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]  # voxel 1: confident class 2
    y = [2, 0]
    expected = ((0.7 - 0) ** 2 + (0.2 - 1) ** 2 + 0.1**2 + 0.1**2) / 2  # net A on both voxels
    expected += (0.3**2 + (0.2 - 1) ** 2 + 0.2**2 + 0.7**2) / 2  # net B on both voxels
    got = MaskedConsistencyLoss()(class_logits(probs_a), class_logits(probs_b), label_map(y))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_masked_consistency_empty_mask_is_zero():
    got = MaskedConsistencyLoss()(binary_logits([0.1, 0.2]), binary_logits([0.3, 0.4]), label_map([1, 1]))
    assert got.item() == 0.0


def test_cosine_consistency_by_hand():
    p_a, p_b = [0.9, 0.3, 0.5], [0.5, 0.6, 0.5]
    cosines = [(a * b + (1 - a) * (1 - b)) / (math.hypot(a, 1 - a) * math.hypot(b, 1 - b)) for a, b in zip(p_a, p_b)]
    expected = sum(1 - c for c in cosines) / 3
    got = CosineConsistencyLoss()(binary_logits(p_a), binary_logits(p_b))
    assert got.item() == pytest.approx(expected, rel=1e-6)


# -------------------------------------------------------------------------------------------------------- CPS
CPS_P_A = [0.7, 0.2, 0.55, 0.45]
CPS_P_B = [0.8, 0.5, 0.3, 0.62]


@pytest.mark.parametrize("normalization", ["all", "confident"])
def test_cross_pseudo_supervision_by_hand(normalization):
    # B's one-hot labels (p >= 0.6): fg, none, bg, fg; A's: fg, bg, none, none.
    a_from_b = [-math.log(0.7), -math.log(1 - 0.55), -math.log(0.45)]
    b_from_a = [-math.log(0.8), -math.log(1 - 0.5)]
    if normalization == "all":
        expected = sum(a_from_b) / 4 + sum(b_from_a) / 4
    else:
        expected = sum(a_from_b) / 3 + sum(b_from_a) / 2
    got = CrossPseudoSupervisionLoss(0.6, normalization)(binary_logits(CPS_P_A), binary_logits(CPS_P_B))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_cross_pseudo_supervision_gradient_only_through_own_prediction():
    logits_a, logits_b = binary_logits(CPS_P_A), binary_logits(CPS_P_B)
    CrossPseudoSupervisionLoss()(logits_a, logits_b).backward()
    # d/dz_A of -sum_c Y_c log softmax(z_A)_c / N = (softmax(z_A) * sum_c Y_c - Y) / N, with Y = B's constant labels
    target_from_b = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    prob_a = torch.tensor([[0.3, 0.8, 0.45, 0.55], [0.7, 0.2, 0.55, 0.45]], dtype=torch.float64)
    expected = (prob_a * target_from_b.sum(0) - target_from_b) / 4
    assert torch.allclose(logits_a.grad.reshape(2, 4), expected, atol=1e-9)


# -------------------------------------------------------------------------------------------------------- EFS
EFS_P_A = [0.95, 0.9, 0.6, 0.55, 0.3, 0.1, 0.45, 0.8]
EFS_P_B = [0.85, 0.3, 0.7, 0.4, 0.35, 0.05, 0.6, 0.15]


def efs_by_hand(p_a, p_b, q, target_rule):
    h_a = [entropy([1 - p, p]) for p in p_a]
    h_b = [entropy([1 - p, p]) for p in p_b]
    tau_a, tau_b = linear_percentile(h_a, q), linear_percentile(h_b, q)
    valid = [not (ha >= tau_a and hb >= tau_b) for ha, hb in zip(h_a, h_b)]
    pred_a, pred_b = [int(p > 0.5) for p in p_a], [int(p > 0.5) for p in p_b]
    union = [a | b for a, b in zip(pred_a, pred_b)]
    targets_a = union if target_rule == "union" else pred_a
    targets_b = union if target_rule == "union" else pred_b
    total = 0.0
    for probs, targets in ((p_a, targets_a), (p_b, targets_b)):
        ce = [-math.log(p if t else 1 - p) for p, t in zip(probs, targets)]
        total += sum(c for c, v in zip(ce, valid) if v) / sum(valid)
    return total, valid


@pytest.mark.parametrize("target_rule", ["union", "own"])
@pytest.mark.parametrize("q", [70.0, 20.0])
def test_entropy_filtered_by_hand(target_rule, q):
    expected, valid = efs_by_hand(EFS_P_A, EFS_P_B, q, target_rule)
    assert 0 < sum(valid) < len(valid)
    got = EntropyFilteredLoss(q, target_rule)(binary_logits(EFS_P_A), binary_logits(EFS_P_B))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_entropy_filtered_sends_gradient_to_both_logits():
    logits_a, logits_b = binary_logits(EFS_P_A), binary_logits(EFS_P_B)
    EntropyFilteredLoss()(logits_a, logits_b).backward()
    assert logits_a.grad.abs().sum() > 0 and logits_b.grad.abs().sum() > 0


def test_entropy_filtered_all_ignored_is_zero_with_graph():
    logits = binary_logits([0.5] * 8)  # identical entropies: every voxel is at the percentile in both nets
    loss = EntropyFilteredLoss()(logits, logits)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_entropy_filtered_negative_logits_give_finite_loss():
    logits = -5 - torch.rand(1, 2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(EntropyFilteredLoss()(logits, logits.flip(1)))


# --------------------------------------------------------------------------------------------- reliability
def test_percentile_equals_the_sorted_order_statistics_exactly():
    values = torch.rand(2, 16, 16, 8, generator=torch.Generator().manual_seed(0)).round(decimals=2)  # many ties
    ordered = values.flatten().sort().values
    for q in (0.0, 12.5, 70.0, 99.9, 100.0):
        position = q / 100 * (ordered.numel() - 1)
        low, high = int(position), min(int(position) + 1, ordered.numel() - 1)
        assert torch.equal(percentile(values, q), ordered[low] + (position - low) * (ordered[high] - ordered[low]))


def test_class_argmax_is_argmax_over_classes_with_ties_and_nan():
    scores = torch.randint(0, 3, (2, 3, 8, 8, 4), generator=torch.Generator().manual_seed(1)).float()  # ties
    scores[0, 1, 0, 0, 0] = float("nan")
    assert torch.equal(class_argmax(scores), scores.argmax(dim=1))
    assert torch.equal(class_argmax(scores, keepdim=True), scores.argmax(dim=1, keepdim=True))
    assert class_argmax(scores)[0, 0, 0, 0] == 1


def test_percentile_matches_numpy_linear_rule():
    values = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 20.0, 70.0, 100.0):
        assert percentile(values, q).item() == pytest.approx(torch.quantile(values, q / 100).item(), abs=1e-7)
    assert percentile(torch.tensor([1.0, 2.0, 3.0, 4.0]), 70.0).item() == pytest.approx(3.1)


def test_union_pseudo_label_three_classes():
    pred_a = torch.tensor([0, 1, 0, 2, 1, 2])
    pred_b = torch.tensor([0, 1, 2, 0, 2, 2])
    assert union_pseudo_label(pred_a, pred_b).tolist() == [0, 1, 2, 2, -1, 2]


def test_reliable_voxels_paper_versus_code_rule():
    # net A confident on voxels 0-2, uncertain on 3-5; net B confident on 0, 3, 4, uncertain on 1, 2, 5.
    p_a = torch.softmax(binary_logits([0.99, 0.02, 0.97, 0.55, 0.45, 0.52]), dim=1)
    p_b = torch.softmax(binary_logits([0.98, 0.48, 0.51, 0.99, 0.03, 0.49]), dim=1)
    reliable, label = reliable_voxels(p_a, p_b, 50.0, "paper")
    assert reliable.flatten().tolist() == [True, False, False, False, False, False]
    assert label.flatten()[0].item() == 1
    reliable, label = reliable_voxels(p_a, p_b, 50.0, "code")
    assert reliable.flatten().tolist() == [True, True, True, True, True, False]
    assert label.flatten()[:5].tolist() == [1, 0, 1, 1, 0]


# --------------------------------------------------------------------------------------------------------- UE
UE_P_A = [0.7, 0.2, 0.9, 0.4]
UE_P_B = [0.8, 0.6, 0.3, 0.1]


def ue_by_hand(target_rule, temperature):
    total_weighted, total_kl = 0.0, 0.0
    for a, b in zip(UE_P_A, UE_P_B):
        kl = b * math.log(b / a) + (1 - b) * math.log((1 - b) / (1 - a))
        if target_rule == "hard":
            ce = -math.log(a if b > 0.5 else 1 - a)
        else:
            sharp = b ** (1 / temperature) / (b ** (1 / temperature) + (1 - b) ** (1 / temperature))
            ce = -(sharp * math.log(a) + (1 - sharp) * math.log(1 - a))
        total_weighted += math.exp(-kl) * ce
        total_kl += kl
    return (total_weighted + total_kl) / len(UE_P_A)


@pytest.mark.parametrize("target_rule, temperature", [("hard", 0.5), ("soft", 0.5), ("soft", 1.0)])
def test_uncertainty_rectified_by_hand(target_rule, temperature):
    got = UncertaintyRectifiedLoss(target_rule, temperature)(binary_logits(UE_P_A), binary_logits(UE_P_B))
    assert got.item() == pytest.approx(ue_by_hand(target_rule, temperature), rel=1e-6)


def test_uncertainty_rectified_temperature_matters_only_for_soft_target():
    assert ue_by_hand("soft", 0.5) != pytest.approx(ue_by_hand("soft", 1.0), rel=1e-3)
    hard = [UncertaintyRectifiedLoss("hard", t)(binary_logits(UE_P_A), binary_logits(UE_P_B)).item() for t in (0.5, 2)]
    assert hard[0] == hard[1]


def test_uncertainty_rectified_gradient_to_student_only():
    student, teacher = binary_logits(UE_P_A), binary_logits(UE_P_B)
    UncertaintyRectifiedLoss()(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


# -------------------------------------------------------------------------------------------------------- PGL
# Voxels 0, 1 reliable foreground, 2, 3 reliable background (both nets agree and are confident); 4, 5 uncertain
# with foreground argmax, 6, 7 uncertain with background argmax. Percentile 50 puts tau between the two levels.
PGL_P = [0.95, 0.95, 0.05, 0.05, 0.55, 0.55, 0.45, 0.45]
PGL_FEATURES = [(1, 0), (3, 0), (0, 1), (0, 2), (1, 1), (1, 0), (0, 3), (1, 1)]


def pgl_features():
    return torch.tensor(PGL_FEATURES, dtype=torch.float64).t().reshape(1, 2, -1, 1, 1).requires_grad_()


@pytest.mark.parametrize("rule", ["paper", "code"])
def test_prototype_loss_by_hand(rule):
    # c_f ~ (1, 0), c_b ~ (0, 1); d(v4, c_f) = D45, d(v5, c_f) = 0, d(v6, c_b) = 0, d(v7, c_b) = D45.
    expected = (D45 + 0) / 2 + (0 + D45) / 2 + SQRT2
    loss = PrototypeContrastiveLoss(percentile=50.0, reliability=rule, sample_fraction=1.0)
    got = loss(pgl_features(), binary_logits(PGL_P), binary_logits(PGL_P))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_prototype_loss_without_samples_keeps_only_prototype_term():
    loss = PrototypeContrastiveLoss(percentile=50.0, sample_fraction=0.01)  # floor(2 / 100) = 0 samples
    got = loss(pgl_features(), binary_logits(PGL_P), binary_logits(PGL_P))
    assert got.item() == pytest.approx(SQRT2, rel=1e-6)


def test_prototype_loss_gradient_reaches_prototypes_unless_detached():
    for detach, reliable_grad in ((False, True), (True, False)):
        features = pgl_features()
        loss = PrototypeContrastiveLoss(percentile=50.0, sample_fraction=1.0, detach_prototypes=detach)
        loss(features, binary_logits(PGL_P), binary_logits(PGL_P)).backward()
        grad = features.grad.reshape(2, -1)
        assert bool(grad[:, :4].abs().sum() > 0) == reliable_grad  # reliable voxels build the prototypes
        assert grad[:, 4].abs().sum() > 0  # uncertain voxel 4 is pulled towards c_f


def test_prototype_loss_three_classes_by_hand():
    confident = [[0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.01, 0.01, 0.98]]
    probs = confident + [[0.3, 0.4, 0.3], [0.4, 0.3, 0.3]]
    features = torch.tensor([(1, 0, 0), (0, 2, 0), (0, 0, 3), (1, 1, 0), (1, 0, 0)], dtype=torch.float64)
    features = features.t().reshape(1, 3, -1, 1, 1)
    # prototypes along the three axes (pairwise distance sqrt 2); voxel 3 (class 1) is 45 degrees off c_1,
    # voxel 4 (class 0) coincides with c_0; one background sample because n_1 + n_2 = 1.
    expected = D45 + 0.0 + SQRT2
    loss = PrototypeContrastiveLoss(percentile=60.0, sample_fraction=1.0)
    got = loss(features, class_logits(probs), class_logits(probs))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_prototype_loss_empty_sets_give_zero():
    logits = binary_logits([0.5] * 8)  # every voxel uncertain: no reliable voxel, no prototype
    features = pgl_features()
    loss = PrototypeContrastiveLoss(sample_fraction=1.0)(features, logits, logits)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(features.grad == 0)


def test_prototype_sampling_is_reproducible_with_a_seed():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 8, 8, 8, generator=generator, dtype=torch.float64)
    logits_a = torch.randn(2, 2, 8, 8, 8, generator=generator, dtype=torch.float64)
    logits_b = torch.randn(2, 2, 8, 8, 8, generator=generator, dtype=torch.float64)
    values = []
    for seed in (1, 1, 2):
        loss = PrototypeContrastiveLoss(sample_fraction=0.1, generator=torch.Generator().manual_seed(seed))
        values.append(loss(features, logits_a, logits_b).item())
    assert values[0] == values[1] != values[2]
    torch.manual_seed(3)
    first = PrototypeContrastiveLoss(sample_fraction=0.1)(features, logits_a, logits_b)
    torch.manual_seed(3)
    assert PrototypeContrastiveLoss(sample_fraction=0.1)(features, logits_a, logits_b).item() == first.item()


# ------------------------------------------------------------------------------------------- extreme inputs
def extreme_case(name):
    """(logits_a, logits_b, label) of shape (1, 2, 4, 4, 4) for one of four degenerate situations."""
    fg = {"all_confident": 20.0, "all_uncertain": 0.0, "empty_foreground": -20.0, "all_foreground": 20.0}[name]
    logits = torch.zeros(1, 2, 4, 4, 4, dtype=torch.float64)
    logits[:, 1] = fg
    if name == "all_confident":
        logits[:, 1, :2] = -fg  # confident background on half of the volume
    label = (logits[:, 1:] > 0).long() if name != "all_uncertain" else torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    return logits.clone().requires_grad_(), logits.clone().requires_grad_(), label


LOSS_CALLS = {
    "sup": lambda a, b, y, f: SupervisedLoss()(a, y),
    "cr": lambda a, b, y, f: MaskedConsistencyLoss()(a, b, y),
    "cos": lambda a, b, y, f: CosineConsistencyLoss()(a, b),
    "cps": lambda a, b, y, f: CrossPseudoSupervisionLoss()(a, b),
    "efs": lambda a, b, y, f: EntropyFilteredLoss()(a, b),
    "ue": lambda a, b, y, f: UncertaintyRectifiedLoss("soft")(a, b),
    "pgl": lambda a, b, y, f: PrototypeContrastiveLoss(sample_fraction=0.5)(f, a, b),
}


@pytest.mark.parametrize("case", ["all_confident", "all_uncertain", "empty_foreground", "all_foreground"])
@pytest.mark.parametrize("term", sorted(LOSS_CALLS))
def test_no_nan_or_inf_on_extreme_inputs(case, term):
    logits_a, logits_b, label = extreme_case(case)
    features = torch.rand(1, 4, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = LOSS_CALLS[term](logits_a, logits_b, label, features)
    assert torch.isfinite(loss)
    if loss.requires_grad:
        loss.backward()
        for tensor in (logits_a, logits_b, features):
            assert tensor.grad is None or torch.isfinite(tensor.grad).all()


# ------------------------------------------------------------------------------------------------------ ramps
def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 0) == 1.0
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(-3, 10) == sigmoid_rampup(0, 10)
    assert sigmoid_rampup(20, 10) == 1.0


@pytest.mark.parametrize(
    "iteration, expected", [(0, 0.000674), (3000, 0.028650), (5999, 0.099688), (6000, 0.1), (9000, 0.1)]
)
def test_contrastive_ramp_reproduces_released_code(iteration, expected):
    assert contrastive_ramp(iteration, 6000, 0.1, step=150) == pytest.approx(expected, abs=5e-7)
    code_formula = 0.1 * math.exp(-5 * (1 - min(iteration // 150, 40) / 40) ** 2)
    assert contrastive_ramp(iteration, 6000, 0.1, step=150) == pytest.approx(code_formula, rel=1e-12)


def test_contrastive_ramp_smooth():
    assert contrastive_ramp(5999, 6000) == pytest.approx(0.1 * math.exp(-5 * (1 / 6000) ** 2))
    assert contrastive_ramp(1500, 6000) == pytest.approx(0.1 * math.exp(-5 * 0.75**2))
    with pytest.raises(ValueError):
        contrastive_ramp(0, 6000, step=0)
