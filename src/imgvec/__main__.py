"""`python -m imgvec`: the command line (imgvec.cli)."""

from imgvec.cli.commands import main

main()
