"""`python -m medblocks_sandbox` is the `medblocks-sandbox` command."""

from medblocks_sandbox.cli import main

main()
