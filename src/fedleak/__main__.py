"""``python -m fedleak`` runs the command line."""

import sys

from fedleak.launch import main

sys.exit(main())
