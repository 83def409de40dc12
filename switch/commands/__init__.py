"""Command groups of the `switch` CLI; each module has register(subparsers) and sets `handler`."""
