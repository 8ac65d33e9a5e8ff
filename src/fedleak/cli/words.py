"""The library's messages name its keyword arguments (``num_examples=4``); on the command line they are options
(``--num-examples 4``). :func:`as_options` says them the command line's way."""

from __future__ import annotations

import re

_OPTIONS = (  # (pattern, replacement), in turn
    (re.compile(r"input_shape=\(([^)]*)\)"), lambda m: "--input-shape " + m.group(1).replace(" ", "")),
    (re.compile(r"\binput_shape=(?! )"), lambda m: "--input-shape "),
    (re.compile(r"\binput_shape= "), lambda m: "--input-shape "),  # ("pass input_shape= (the shape ...)")
    (re.compile(r"\btrain_dropout=False\b"), lambda m: "--eval-dropout"),
    (re.compile(r"\bloss_reduction='(\w+)'"), lambda m: f"--loss-reduction {m.group(1)}"),
    (re.compile(r"\blabel_smoothing=(?=\S)"), lambda m: "--label-smoothing "),
    (re.compile(r"\bnum_examples=(?=\d)"), lambda m: "--num-examples "),
    (re.compile(r"\bfocal_gamma=(?=\d)"), lambda m: "--focal-gamma "),
    (re.compile(r"\b(pass|needs) (num_examples|label_smoothing|class_weights|focal_gamma)\b"),
     lambda m: f"{m.group(1)} --" + m.group(2).replace("_", "-")),
    (re.compile(r"\bdata_range=\(([^)]*)\)"), lambda m: "--data-range " + m.group(1).replace(" ", "")),
    (re.compile(r"\(data_range\)"), lambda m: "(--data-range)"),
    (re.compile(r"\blearning_rate=(?=\d)"), lambda m: "--learning-rate "),
    (re.compile(r"\blearning_rate\b"), lambda m: "--learning-rate"),
    (re.compile(r"\blocal_steps=(?=\d)"), lambda m: "--local-steps "),
    (re.compile(r"\blocal_steps\b"), lambda m: "--local-steps"),
    (re.compile(r"\bkind='(\w+)'"), lambda m: f"--update-kind {m.group(1)}"),
    (re.compile(r"\bupload='(\w+)'"), lambda m: f"--upload {m.group(1)}"),
)


def as_options(text: str) -> str:
    """``text`` with the library's keyword arguments named as the command line's options."""
    for pattern, option in _OPTIONS:
        text = pattern.sub(option, text)
    return text
