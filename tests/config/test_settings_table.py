"""One settings table: the README's settings rows, the type checks and ``configs/train.json``'s defaults agree."""

import copy
import runpy
import sys

import pytest

from bundle.config.errors import BundleError
from bundle.config.settings import (
    README_END,
    README_START,
    SETTINGS,
    check_settings,
    iter_drift,
    readme_rows,
    replace_between_markers,
    train_config,
)
from tests.conftest import REPO_ROOT


def checked_settings(config):
    return config["train"]["checks"]["settings"]["settings"]


def test_readme_rows_are_those_of_the_table_and_train_json():
    readme = (REPO_ROOT / "README.md").read_text()
    assert readme.count(README_START) == 1 and readme.count(README_END) == 1
    rows = readme.split(README_START + "\n")[1].split(README_END)[0].splitlines()
    assert rows == readme_rows(train_config()), "run: python scripts/settings_table.py"


def test_table_and_train_json_agree():
    config = train_config()
    assert list(iter_drift(config, checked_settings(config))) == []


def test_a_changed_default_changes_the_readme_row():
    config = train_config()
    config["optimizer"]["lr"] = 0.02
    config["train"]["trainer"]["channels_last"] = "true"
    rows = readme_rows(config)
    assert (
        "| optimiser | `--optimizer#lr`, `--optimizer#momentum`, `--optimizer#weight_decay` | 0.02, 0.9, 0.0001 |"
        in rows
    )
    layout = next(row for row in rows if row.startswith("| weight layout |"))
    assert layout.endswith("| `true` (channels-last for fp32 training on a CPU) |")
    assert rows != readme_rows(train_config())


@pytest.mark.parametrize(
    "change, drift",
    [
        (lambda c: c.pop("seed"), "seed: not in train.json"),
        (lambda c: c.update(base_width="$16"), "base_width: default has no text for '$16'"),
        (lambda c: c.update(output_dir="runs/train"), "output_dir: default has a text although train.json has"),
        (lambda c: c.update(max_iterations="120"), "train.json: max_iterations: expected an integer, got '120'"),
        (lambda c: checked_settings(c).pop("seed"), "settings: seed is None, expected '@seed'"),
        (lambda c: checked_settings(c).update(spacing="@spacing"), "spacing is '@spacing', expected None"),
    ],
)
def test_drift_is_named(change, drift):
    config = copy.deepcopy(train_config())
    change(config)
    lines = list(iter_drift(config, checked_settings(config)))
    assert len(lines) == 1 and drift in lines[0], lines


def test_every_typed_setting_is_checked_and_a_wrong_one_named():
    typed = [s.path for s in SETTINGS if s.kind is not None]
    assert sorted(typed) == sorted(checked_settings(train_config()))
    with pytest.raises(BundleError) as info:
        check_settings({"seed": 1.5, "datalists#train_list": None, "train#trainer#precision": 16})
    assert str(info.value).splitlines()[1:] == [
        "  seed: expected an integer, got 1.5 (float)",
        "  train#trainer#precision: expected a string, got 16 (int)",
    ]


def run_script(monkeypatch, *args):
    """``python scripts/settings_table.py ARGS`` as __main__ in this process (no second interpreter start-up); the
    exit status."""
    script = str(REPO_ROOT / "scripts" / "settings_table.py")
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:
        return 1 if exit.code else 0
    return 0


def test_script_checks_and_rewrites_only_between_the_markers(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    stale = f"intro\n\n{README_START}\n| old row |\n{README_END}\n\nrest\n"
    readme.write_text(stale)
    assert run_script(monkeypatch, "--readme", str(readme), "--check", "true") == 1
    assert readme.read_text() == stale
    assert run_script(monkeypatch, "--readme", str(readme)) == 0
    assert readme.read_text() == replace_between_markers(stale, readme_rows(train_config()))
    assert readme.read_text().startswith("intro\n\n") and readme.read_text().endswith(f"{README_END}\n\nrest\n")
    assert run_script(monkeypatch, "--readme", str(readme), "--check") == 0
    output = capsys.readouterr().out
    assert "settings table rewritten" in output and "the settings table is up to date" in output
