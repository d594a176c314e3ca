"""Does ranking pay? From K = 4 labeled LA cases, label 4 more chosen by the model's uncertainty, at random (3
draws) or as the next of the list, retrain each, and compare on the same 20 test cases
(``benchmarking/rank_payoff.py``).

Run from the bundle root, then regenerate the report::

    python scripts/rank_payoff.py --dataset_dir /data/LA --method dual_journal --protocol cpu --seeds "[1337]"
    python scripts/benchmark.py report
"""

import os
import sys

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarking.rank_payoff import payoff  # noqa: E402
from bundle.config.errors import cli  # noqa: E402

if __name__ == "__main__":
    with cli():
        fire.Fire(payoff)
