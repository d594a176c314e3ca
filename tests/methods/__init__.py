"""Tests of ``bundle/methods``."""
