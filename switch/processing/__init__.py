"""switch.processing: see docs/architecture.md."""
