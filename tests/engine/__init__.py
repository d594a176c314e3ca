"""Tests of ``bundle/engine``."""
