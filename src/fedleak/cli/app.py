"""The typer application every sub-command registers itself on, and what the sub-commands share.

* ``fedleak --verbose <command>``: Python warnings (numpy, torch, Flower and Ray deprecations) and Flower's and
  Ray's log lines reach the console only with it; without it they are hidden for the whole command
  (:class:`Console`, read by sub-commands through :func:`is_verbose`).
* One spelling and one description per shared option (``--data``, ``--widths``, ``--out``,
  ``--quiet``): the help texts below, :func:`default_out` (``fedleak-<command>``), :func:`int_list` and
  :func:`progress_bar` (a bar only on a terminal).

This module must stay cheap to import (``fedleak --help``): it imports no torch or numpy, and of fedleak only the
errors and the built-in model catalog.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from pathlib import Path

import click
import typer

from fedleak.errors import FedleakError

app = typer.Typer(
    name="fedleak",
    help="Measure, demonstrate and mitigate training-data leakage from federated-learning updates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

VERBOSE_HELP = "Show Python warnings and Flower's and Ray's log lines (hidden without it)."
DATA_HELP = "Built-in data set name (see 'fedleak info') or a path to your data."
WIDTHS_HELP = "Hidden layer widths of the fully connected ReLU model, comma-separated, e.g. 1024,512."
OUT_HELP = "Folder for results.json and report.html (created when they are written)."
QUIET_HELP = "No progress bar (one shows only when the console is a terminal)."
WEIGHTS_HELP = ("Weights for the class or built-in model (for a FedAvg update: the round's, which the server "
                "sent): a state dict as .safetensors, a torch file of tensors (read with weights_only; a training "
                "checkpoint holding one state dict too), or a numpy .npz, by name or as a list in state_dict() order "
                "(Flower's NDArrays); nothing is unpickled.")

UPDATE_HELP = ("The captured client update: a .safetensors from fedleak, or a plain .safetensors, .pt/.pth or .npz "
               "of tensors by name or as a list (model.parameters() or state_dict() order); a plain file of the "
               "client's weights after local training (a FedAvg reply) is read against the model's --weights, the "
               "round's.")

NUM_EXAMPLES_HELP = ("The number of examples the client reported (Flower's num_examples), where the update file does "
                     "not record it: without it nothing is certified, since a batch of near-copies of fewer samples "
                     "gives the same update.")
LEARNING_RATE_HELP = ("The learning rate of a FedAvg client's local SGD, where the server knows it (it sets it in the "
                      "round's configuration): the exact route then reads a one-step weight update at the gradient's "
                      "own scale.")
LOCAL_STEPS_HELP = ("The number of local SGD steps of a FedAvg client, where the server knows it (its run "
                    "configuration): one step is the exact route's; several go to the first-layer rows and the "
                    "searches that unroll them.")

OPTIMIZER_HELP = ("Clients' local optimizer: sgd (torch.optim.SGD, with --momentum and --weight-decay) or adam "
                  "(torch.optim.Adam, betas 0.9 and 0.999, with --weight-decay). The server is not told.")
MOMENTUM_HELP = ("Clients' SGD momentum (torch.optim.SGD's; Flower's quickstart trains with 0.9). The server is not "
                 "told.")
WEIGHT_DECAY_HELP = ("Clients' weight decay (torch's, in their optimizer). The server is not told: with SGD the exact "
                     "route reads it off the silent units.")
LR_UNKNOWN_HELP = "The server's attack ignores the learning rate (a client that may use its own)."

CLIENT_MODE_HELP = ("How the clients run the model as they compute their updates: train (model.train(), as training "
                    "loops do: Dropout drops units, BatchNorm uses the batch's statistics) or eval.")
LABEL_SMOOTHING_HELP = ("The clients train with F.cross_entropy(..., label_smoothing=s): their updates are of that "
                        "loss, and the server's attack is told.")
CLASS_WEIGHTS_HELP = ("The clients train with F.cross_entropy(..., weight=w): one weight per class, comma-separated "
                      "(e.g. 1,4.5).")
FOCAL_GAMMA_HELP = ("The clients train with the focal loss -(1 - p_y)^gamma log p_y (not with --label-smoothing or "
                    "--class-weights).")
UPDATE_KIND_HELP = ("What a plain update file holds: gradient, weights (the client's after local training), change "
                    "(new - old or old - new) or auto (weights when within half their norm of the model's, a change "
                    "when its entries lie on the weights' float spacing, else a gradient).")


def _model_help() -> str:
    from fedleak.models.catalog import available_models  # a catalog: no torch

    return (f"The model: a built-in name ({', '.join(available_models())}); path/to/file.py:ClassName, your own "
            "nn.Module class -- this RUNS that Python file and builds the class with no arguments (or NAME is a "
            "function returning the model, or a model the file builds); or a "
            ".safetensors/.pt state dict of a Sequential MLP.")


MODEL_HELP = _model_help()
MAX_WIDTH = 100_000  # neurons per layer (or conv channels) of a model the command line builds


class Console:
    """What the root command decided about the console for one invocation.

    Without ``--verbose`` every Python warning is ignored until the command ends (the filters are restored
    then, so a caller of :func:`fedleak.cli.main` keeps its own); :meth:`show_everything` lifts that early,
    for a sub-command's own ``--verbose``.
    """

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self._hidden = ExitStack()
        if not verbose:
            self._hidden.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")

    def show_everything(self) -> None:
        self.verbose = True
        self._hidden.close()

    def close(self) -> None:
        self._hidden.close()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Measure, demonstrate and mitigate training-data leakage from federated-learning updates."""
    console = Console(verbose)
    ctx.obj = console
    ctx.call_on_close(console.close)


def console() -> Console | None:
    """The :class:`Console` of the command running now (None outside a command)."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, Console) else None


def is_verbose(alias: bool = False) -> bool:
    """Whether the running command was given ``--verbose``.

    ``alias`` is a sub-command's own ``--verbose`` flag (the same switch given after the sub-command, kept where
    it used to live): when set, it turns the console verbose for the rest of the command.
    """
    current = console()
    if alias and current is not None:
        current.show_everything()
    return alias or (current is not None and current.verbose)


def shows_progress(quiet: bool) -> bool:
    """A progress bar only on a terminal: in a pipe or a log file its redrawn lines would be noise."""
    import sys

    return not quiet and sys.stderr.isatty()


def progress_bar(quiet: bool, total: int, desc: str, unit: str):
    """Wraps an iterable in a tqdm bar on stderr when :func:`shows_progress`, else None (no bar)."""
    if not shows_progress(quiet):
        return None
    from tqdm import tqdm

    return lambda it: tqdm(it, total=total, desc=desc, unit=unit, leave=False)


def default_out(command: str) -> Path:
    """Every command's default output folder: ``fedleak-<command>`` in the current folder."""
    return Path(f"fedleak-{command}")


def float_list(text: str, what: str) -> tuple[float, ...]:
    """Comma-separated numbers, e.g. ``--class-weights 1,2.5,4`` (their values are checked where they are used)."""
    items = [v for v in text.replace(" ", "").split(",") if v]
    try:
        values = tuple(float(item) for item in items)
    except ValueError:
        values = ()
    if not values:
        raise FedleakError(f"{what} must be comma-separated numbers, got '{text}'")
    return values


def int_list(text: str, what: str, high: int | None = None) -> tuple[int, ...]:
    """Comma-separated whole numbers in [1, high], e.g. ``--widths 1024,512``."""
    from fedleak.validation import parse_int

    items = [v for v in text.replace(" ", "").split(",") if v]
    if not items:
        raise FedleakError(f"{what} must not be empty")
    for item in items:
        if not item.lstrip("-").isdigit():
            raise FedleakError(f"{what} must be comma-separated whole numbers, got '{text}'")
    return tuple(parse_int(what, item, low=1, high=high) for item in items)
