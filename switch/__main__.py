"""`python -m switch` is the `switch` command."""

from switch.cli import main

raise SystemExit(main())
