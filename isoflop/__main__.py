"""`python -m isoflop` is the `isoflop` command."""

from isoflop.cli import main

raise SystemExit(main())
