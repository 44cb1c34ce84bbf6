"""``python -m earlyexit``: the command line (see earlyexit.cli)."""

from earlyexit.cli import main

main()
