"""`python -m mkv`: the same as the `mkv` command."""

import sys

from mkv.cli import main

if __name__ == "__main__":
    sys.exit(main())
