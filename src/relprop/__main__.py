"""`python -m relprop ...` (what torchrun's `-m relprop` runs): the command line.

Only when run as a program: importing relprop.__main__ (a documentation tool, a test
collector walking the package) runs nothing."""

from .apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
