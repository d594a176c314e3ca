"""Tests of ``bundle/config``."""
