"""switch.sim: see docs/architecture.md."""
