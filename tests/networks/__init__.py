"""Tests of ``bundle/networks``."""
