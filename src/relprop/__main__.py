"""`python -m relprop ...` (what torchrun's `-m relprop` runs): the command line."""

from .apps.cli import main

raise SystemExit(main())
