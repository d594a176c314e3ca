"""Tests of ``monailabel_app``."""
