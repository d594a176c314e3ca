"""Tests of ``benchmarking``."""
