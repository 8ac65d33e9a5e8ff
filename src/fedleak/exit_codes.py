"""Exit codes of the ``fedleak`` script."""

BAD_INPUT = 2  # a FedleakError: the message names the problem
INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)
