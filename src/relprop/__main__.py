"""`python -m relprop ...` (what torchrun's `-m relprop` runs): the command line."""

from .cli import main

raise SystemExit(main())
