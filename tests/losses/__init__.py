"""Tests of ``bundle/losses``."""
