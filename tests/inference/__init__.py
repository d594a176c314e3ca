"""Tests of ``bundle/inference``."""
