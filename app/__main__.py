"""`python -m app` runs the command line, like the `slimserve` script."""

from app.cli import main

main()
