"""``python -m fedleak`` runs the command line."""

import sys

from fedleak.cli import main

sys.exit(main())
