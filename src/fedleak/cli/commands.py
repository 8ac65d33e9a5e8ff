"""Importing this module registers every sub-command on :data:`fedleak.cli.app.app`."""

import fedleak.cli.audit  # noqa: F401  (fedleak audit)
import fedleak.cli.check  # noqa: F401  (fedleak check)
import fedleak.cli.evaluate  # noqa: F401  (fedleak evaluate)
import fedleak.cli.federate  # noqa: F401  (fedleak federate)
import fedleak.cli.info  # noqa: F401  (fedleak info)
import fedleak.cli.reconstruct  # noqa: F401  (fedleak reconstruct)
