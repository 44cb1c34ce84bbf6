"""``python -m earlyexit``: the command line (see earlyexit.apps.cli)."""

from earlyexit.apps.cli import main

main()
