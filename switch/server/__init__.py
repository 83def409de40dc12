"""switch.server: see docs/architecture.md."""
