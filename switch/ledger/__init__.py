"""switch.ledger: see docs/architecture.md."""
