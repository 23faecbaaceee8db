"""`python -m hubtool` runs the CLI."""

from .cli import main

main()
