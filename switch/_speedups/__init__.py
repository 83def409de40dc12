"""Compiled extensions built from ../_speedups/*.pyx by setup.py (see switch.codec for the fallbacks)."""
