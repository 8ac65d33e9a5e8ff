"""``python -m fedleak.cli`` runs the command line."""

import sys

from fedleak.cli import main

sys.exit(main())
