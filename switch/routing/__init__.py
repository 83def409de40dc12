"""switch.routing: see docs/architecture.md."""
