import sys

from mkv.cli import main

sys.exit(main())
