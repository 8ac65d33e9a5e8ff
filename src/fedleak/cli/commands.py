"""Imports every sub-command module so that each registers itself on the app."""

from fedleak.cli import audit, info, reconstruct  # noqa: F401
from fedleak.cli import federate  # noqa: F401  (fedleak federate)
