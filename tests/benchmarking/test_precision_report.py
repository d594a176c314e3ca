"""bf16 against fp32 in the benchmark report: the mask Dice and the report section on hand-made records."""

import numpy as np
import pytest

from benchmarking.precision import mask_dice, precision_sections


def test_mask_dice_on_hand_made_masks():
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros_like(a)
    assert mask_dice(a, b) == 1.0  # both empty
    a[0, :2, :2] = 1  # 4 voxels
    assert mask_dice(a, b) == 0.0
    b[0, :2, :1] = 2  # 2 voxels, any class > 0 is foreground, both inside a
    assert mask_dice(a, b) == pytest.approx(2 * 2 / (4 + 2))
    with pytest.raises(ValueError, match="shapes"):
        mask_dice(a, b[:2])


def _accuracy(method, variant, seed, dice):
    return (
        f"{method}_{variant}_{seed}.json",
        {
            "kind": "accuracy",
            "protocol": "cpu",
            "num_labeled": 8,
            "method": method,
            "variant": variant,
            "seed": seed,
            "per_case": [{"case": f"c{i}", "dice": d} for i, d in enumerate(dice)],
        },
    )


def test_training_rows_pair_bf16_with_its_fp32_variant():
    records = [
        _accuracy("supervised_vnet", "", 1, [0.80, 0.90]),
        _accuracy("supervised_vnet", "fp32", 1, [0.78, 0.88]),
        _accuracy("supervised_vnet", "", 2, [0.70, 0.60]),
        _accuracy("supervised_vnet", "fp32", 2, [0.70, 0.60]),
        _accuracy("supervised_vnet", "", 3, [0.50, 0.50]),  # no fp32 run of seed 3: left out of the pairing
        _accuracy("mean_teacher", "", 1, [0.5, 0.5]),  # no fp32 variant: no row
    ]
    lines = precision_sections(records, [])
    rows = [line for line in lines if line.startswith("| cpu |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[:4] == ["cpu", "8", "supervised_vnet", "1, 2"]
    assert cells[4] == "75.00 ± 14.14"  # seeds' means 85 and 65
    assert cells[5] == "74.00 ± 12.73"  # 83 and 65
    assert cells[6].startswith("+1.00 [")  # seed 1: +2 on both cases, seed 2: 0 -> mean +1
    assert cells[7] == "differ"  # the interval of constant per-seed differences is [+1, +1]


def test_agreement_rows_name_the_worst_case():
    agreement = {
        "kind": "precision_agreement",
        "method": "dual_journal",
        "protocol": "cpu",
        "num_labeled": 8,
        "seed": 1337,
        "precisions": ["fp32", "bf16"],
        "seconds": {"fp32": 300.0, "bf16": 120.0},
        "summary": {"fp32": {"dice": {"mean": 0.875}}, "bf16": {"dice": {"mean": 0.874}}},
        "per_case": [
            {"case": "a", "mask_dice_bf16_vs_fp32": 0.999},
            {"case": "b", "mask_dice_bf16_vs_fp32": 0.996},
        ],
        "commit": "abc1234",
        "model_commit": "def5678",
        "hardware": "test CPU",
        "command": "python scripts/benchmark.py agreement --record r.json",
    }
    lines = precision_sections([], [("precision_agreement_r.json", agreement)])
    row = next(line for line in lines if line.startswith("| `precision_agreement_r.json`"))
    assert "| bf16 vs fp32 | 0.9960 (b) | 0.9975 | fp32 87.50, bf16 87.40 | fp32 300, bf16 120 |" in row
    assert precision_sections([_accuracy("supervised", "", 1, [0.5])], []) == []


def _default(seed, fp32, bf16, notes=""):
    run = {"commit": "abc1234", "hardware": "test CPU", "command": "python -m monai.bundle run training ..."}
    return (
        f"precision_default_seed{seed}.json",
        {
            "kind": "precision_default",
            "seed": seed,
            "precisions": ["fp32", "bf16"],
            "command": f"python scripts/benchmark.py default_precision --seed {seed}",
            "notes": notes,
            "runs": {
                "fp32": {**run, "train_seconds": 100.0, "dice": dict(zip("ab", fp32))},
                "bf16": {**run, "train_seconds": 50.0 + 2 * seed, "dice": dict(zip("ab", bf16))},
            },
        },
    )


def test_embedded_default_pairs_bf16_with_fp32_per_seed_and_case():
    defaults = [_default(0, [0.90, 0.80], [0.92, 0.80]), _default(1, [0.90, 0.90], [0.90, 0.86], "shared machine")]
    lines = precision_sections([], [], defaults)
    row = next(line for line in lines if line.startswith("| embedded default |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1:4] == ["0, 1", "bf16 − fp32", "bf16 87.00 ± 1.41, fp32 87.50 ± 3.54"]  # seed means 86/88, 85/90
    # seed 0: +2, 0 -> +1; seed 1: 0, -4 -> -2; mean over seeds -0.5
    assert cells[4].startswith("-0.50 [")
    assert cells[5] == "equal within the interval"
    assert cells[6] == "bf16 51, fp32 100"  # train seconds averaged over the seeds (50 and 52)
    assert any("precision_default_seed1.json" in line and "shared machine" in line for line in lines)
