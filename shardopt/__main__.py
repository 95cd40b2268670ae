"""`python -m shardopt ...`: the same as the `shardopt` command (see shardopt/cli.py)."""

import sys

from shardopt.cli import main

if __name__ == "__main__":
    sys.exit(main())
