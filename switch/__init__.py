"""ISO 8583 payment switch and transaction-processing core.

Layering (an arrow may only point down; tests/test_layering.py enforces it):
cli/__main__ -> server -> sim -> processing -> routing -> ledger -> codec -> config.
See docs/architecture.md.
"""

__version__ = "0.1.0"
