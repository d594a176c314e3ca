"""Write the README's settings table from the settings table of the bundle and ``configs/train.json``.

    python scripts/settings_table.py           # rewrite the rows between the two markers of README.md
    python scripts/settings_table.py --check   # only compare: exit status 1 when README.md differs

The rows come from :data:`bundle.config.settings.SETTINGS` (overrides, notes) and ``configs/train.json`` (the
defaults); see :func:`bundle.config.settings.readme_rows`. Nothing outside the markers changes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the bundle root, so that `bundle` imports

from bundle.config.booleans import boolean_command  # noqa: E402
from bundle.config.errors import BundleError, cli  # noqa: E402
from bundle.config.settings import readme_rows, replace_between_markers, train_config  # noqa: E402


@boolean_command
def main(check: bool = False, readme: str = str(ROOT / "README.md")) -> None:
    """Regenerate (or with ``check`` only compare) the settings table of ``readme``; see the module docstring."""
    text = Path(readme).read_text()
    new = replace_between_markers(text, readme_rows(train_config()), readme)
    if new == text:
        print(f"{readme}: the settings table is up to date.")
    elif check:
        raise BundleError(
            f"{readme}: the settings table differs from bundle/config/settings.py and configs/train.json;"
            " run python scripts/settings_table.py."
        )
    else:
        temporary = f"{readme}.tmp"
        Path(temporary).write_text(new)
        os.replace(temporary, readme)
        print(f"{readme}: settings table rewritten.")


if __name__ == "__main__":
    with cli():
        fire.Fire(main)
