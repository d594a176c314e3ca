"""The LA benchmark behind ``python scripts/benchmark.py``: runs (:mod:`benchmarking.runs`), the accuracy report
(:mod:`benchmarking.report`) and its statistics (:mod:`benchmarking.statistics`). Not imported by the bundle."""
