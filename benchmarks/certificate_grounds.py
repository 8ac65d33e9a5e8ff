"""The certificate hunt's grounds (benchmarks/certificate_hunt.py): :class:`Config`, what one ground builds and
sends (data set, hidden widths, output-bias shift, inputs, update, loss, attack, model form), and
:data:`CONFIGS`, every ground by name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """One hunting ground: a data set, the hidden widths, the output-bias shift range, the input scale (or
    standardisation), the update (gradient or FedAvg)."""

    data: str
    widths: tuple[int, ...]
    shift: float = 0.0  # output bias shifted by +-beta/2 with beta uniform in [-shift, shift]
    scale: float = 1.0  # inputs multiplied by this (255: raw 0..255 pixels)
    max_batch: int = 8
    lr: float | None = None  # a FedAvg weight update (unknown lr to the attack) instead of the gradient
    lr_known: bool = False  # ... whose learning rate the server knows (it set it): the update carries it
    steps: int = 1  # local SGD steps of that update
    local_batch: int | None = None  # those steps over mini-batches of this size (one epoch = M / local_batch steps)
    momentum: bool = False  # SGD with momentum 0.9 instead of plain SGD
    standardise: bool = False  # inputs standardised with the data set's mean and standard deviation, as users do
    conv1d: tuple[int, int] | None = None  # (channels, kernel) of a Conv1d reading each sample as one signal
    conv2d: tuple[int, ...] = ()  # the channels of 3 x 3 Conv2d blocks (padding 1, ReLU) before the dense layers
    smoothing: float = 0.0  # the client's cross-entropy's label smoothing ...
    told: bool = True  # ... which the attack is told, or reads off the update (class weights: or is not told)
    weighted: bool = False  # class weights F.cross_entropy(weight=w), w log-uniform in [1/4, 4] per batch
    attack: str = "auto"  # or a malicious server's: "trap-weights" / "imprint" (bins from 500 other samples)
    trained: int = 0  # SGD steps (batch 64, lr 0.05, momentum 0.9) on the data set first: one of 4 trained models
    inside: bool = False  # the standardisation inside the model's forward (buffers); the client sends its pixels
    norm: bool = False  # an eval-mode BatchNorm1d on every hidden Linear layer (its statistics from 512 samples)
    norm_input: bool = False  # ... and one on the model's input (a tabular model's normalisation)
    client_train: bool = False  # the client computes its gradient in training mode (its norms on its batch's own
    #                             statistics), which the attack is not told
    change: int = 0  # the FedAvg update passed as a plain dict of its weight change: +1 new - old, -1 old - new
    pseudo: bool = False  # ... old - new divided by the learning rate, passed as a gradient with the rate
    negated: bool = False  # the gradient passed negated (as a change new - old reads): its labels rest on the sign
    after_relu: bool = False  # the hidden layers' BatchNorm1d (norm=True) after their ReLU, before the next Linear
    penalty: float = 0.0  # an L2 penalty in the client's loss, loss + penalty * sum of every parameter squared


CONFIGS = {
    "lfw-2": Config("lfw", (1024,)),
    "lfw-2-shift": Config("lfw", (1024,), shift=0.03),
    "lfw-2-raw255": Config("lfw", (1024,), scale=255.0),
    "lfw-2-deep": Config("lfw", (512, 256)),
    "retina-2": Config("retina", (1024,)),
    "fashion-10": Config("fashion-mnist", (1024,)),
    "digits-10-shift": Config("digits", (256,), shift=0.3),
    "digits-10-raw16": Config("digits", (256,), scale=16.0),
    "fashion-10-raw255": Config("fashion-mnist", (1024,), scale=255.0),
    "lfw-2-fedavg": Config("lfw", (1024,), lr=0.1),
    "lfw-2-fedavg-lr1": Config("lfw", (1024,), lr=1.0),
    "lfw-2-fedavg-large": Config("lfw", (1024,), max_batch=64, lr=0.1),
    "retina-2-fedavg-large": Config("retina", (1024,), max_batch=64, lr=0.1),
    "lfw-2-fedavg-3steps": Config("lfw", (1024,), lr=0.1, steps=3),
    # two hidden layers at small rates: the walk-down's forward check reads rows the change's rounding moved
    "lfw-2-deep-fedavg-lr0.02": Config("lfw", (512, 256), lr=0.02),
    "fashion-10-deep-fedavg-lr0.02": Config("fashion-mnist", (512, 256), lr=0.02),
    "lfw-2-fedavg-epoch": Config("lfw", (1024,), lr=0.1, local_batch=2),
    "fashion-10-fedavg-epoch-momentum": Config("fashion-mnist", (1024,), lr=0.05, local_batch=2, momentum=True),
    "digits-10-fedavg-epoch": Config("digits", (256,), lr=0.1, local_batch=2),
    "fashion-10-fedavg": Config("fashion-mnist", (1024,), lr=0.1),
    "digits-10-fedavg-lr0.03": Config("digits", (256,), lr=0.03),
    "lfw-2-standardised": Config("lfw", (1024,), standardise=True),
    "retina-2-standardised": Config("retina", (1024,), standardise=True),
    "fashion-10-standardised": Config("fashion-mnist", (1024,), standardise=True),
    "lfw-2-standardised-fedavg-lr1": Config("lfw", (1024,), lr=1.0, standardise=True),
    # ... or standardised inside the model's forward, where the exact attack reads the map and inverts it
    "lfw-2-standardised-inside": Config("lfw", (1024,), standardise=True, inside=True),
    "retina-2-standardised-inside": Config("retina", (1024,), standardise=True, inside=True),
    "fashion-10-standardised-inside": Config("fashion-mnist", (1024,), standardise=True, inside=True),
    "lfw-2-standardised-inside-fedavg-lr1": Config("lfw", (1024,), lr=1.0, standardise=True, inside=True),
    "lfw-2-trained-standardised-inside": Config("lfw", (1024,), standardise=True, inside=True, trained=1000),
    "lfw-2-trained-standardised": Config("lfw", (1024,), standardise=True, trained=1000),
    "lfw-2-conv1d": Config("lfw", (1024,), conv1d=(4, 5)),
    "digits-10-conv1d": Config("digits", (512,), conv1d=(8, 5)),
    # two conv blocks: the lower one is solved from the upper one's proven error
    "lfw-2-conv2d": Config("lfw", (512,), conv2d=(6, 32)),
    "fashion-10-conv2d": Config("fashion-mnist", (512,), conv2d=(6, 32)),
    "lfw-2-conv2d-fedavg": Config("lfw", (512,), lr=0.1, conv2d=(6, 32)),
    # ... at smaller rates, where the change's rounding is a larger part of the features read from it
    "lfw-2-conv2d-fedavg-lr0.01": Config("lfw", (512,), lr=0.01, conv2d=(6, 32)),
    "fashion-10-conv2d-fedavg": Config("fashion-mnist", (512,), lr=0.05, conv2d=(6, 32)),
    # label smoothing: off its label a loss vector is p - s/K (no sign to read the label from), and a confident
    # sample's is nearly onehot(prediction) - target, shared by every confident sample of its label and prediction
    "fashion-10-smooth0.1": Config("fashion-mnist", (1024,), smoothing=0.1),
    "fashion-10-raw255-smooth0.1": Config("fashion-mnist", (1024,), scale=255.0, smoothing=0.1),
    "lfw-2-smooth0.1": Config("lfw", (1024,), smoothing=0.1),
    "mni152-3-smooth0.2": Config("mni152", (1024,), smoothing=0.2),
    "digits-10-shift-smooth0.1": Config("digits", (256,), shift=0.3, smoothing=0.1),
    "lfw-2-fedavg-smooth0.1": Config("lfw", (1024,), lr=0.1, smoothing=0.1),
    "fashion-10-smooth0.1-read": Config("fashion-mnist", (1024,), smoothing=0.1, told=False),
    "fashion-10-raw255-smooth0.1-read": Config("fashion-mnist", (1024,), scale=255.0, smoothing=0.1, told=False),
    "mni152-3-smooth0.2-read": Config("mni152", (1024,), smoothing=0.2, told=False),
    "digits-10-shift-smooth0.05-read": Config("digits", (256,), shift=0.3, smoothing=0.05, told=False),
    "fashion-10-deep-smooth0.1-read": Config("fashion-mnist", (512, 256), smoothing=0.1, told=False),
    # class weights: each sample's scale is its label's weight over the batch's sum of weights
    # models trained to confidence: many samples classified with probability 1 in float32, saturated loss vectors
    "lfw-2-trained": Config("lfw", (1024,), trained=1000),
    "lfw-2-deep-trained": Config("lfw", (512, 256), trained=500),
    "digits-10-trained": Config("digits", (256,), trained=1000),
    "fashion-10-trained": Config("fashion-mnist", (1024,), trained=1000),
    # an eval-mode BatchNorm1d on each hidden Linear layer's features, folded into it by the exact methods
    "lfw-2-norm": Config("lfw", (1024,), norm=True),
    "lfw-2-deep-norm": Config("lfw", (512, 256), norm=True),
    "fashion-10-norm": Config("fashion-mnist", (1024,), norm=True),
    "lfw-2-trained-norm": Config("lfw", (1024,), trained=1000, norm=True),
    "fashion-10-trained-norm": Config("fashion-mnist", (1024,), trained=1000, norm=True),
    "lfw-2-input-norm": Config("lfw", (1024,), norm=True, norm_input=True),
    "fashion-10-input-norm": Config("fashion-mnist", (1024,), norm=True, norm_input=True),
    "lfw-2-norm-train": Config("lfw", (1024,), norm=True, client_train=True),
    "lfw-2-input-norm-train": Config("lfw", (1024,), norm=True, norm_input=True, client_train=True),
    "fashion-10-input-norm-train": Config("fashion-mnist", (1024,), norm=True, norm_input=True, client_train=True),
    "lfw-2-input-norm-only": Config("lfw", (1024,), norm_input=True),
    "fashion-10-input-norm-only-train": Config("fashion-mnist", (1024,), norm_input=True, client_train=True),
    "lfw-2-input-norm-only-train": Config("lfw", (1024,), norm_input=True, client_train=True),
    "lfw-2-trained-fedavg": Config("lfw", (1024,), lr=0.05, trained=1000),
    "fashion-10-trained-fedavg": Config("fashion-mnist", (1024,), lr=0.05, trained=1000),
    "lfw-2-weighted": Config("lfw", (1024,), weighted=True),
    "fashion-10-weighted": Config("fashion-mnist", (1024,), weighted=True),
    "digits-10-shift-weighted": Config("digits", (256,), shift=0.3, weighted=True),
    "fashion-10-standardised-weighted": Config("fashion-mnist", (1024,), standardise=True, weighted=True),
    "lfw-2-fedavg-weighted": Config("lfw", (1024,), lr=0.1, weighted=True),
    # the server knows the learning rate it set: one step read at the gradient's own scale; several steps must not
    # certify a blend at it
    "lfw-2-fedavg-lr-known": Config("lfw", (1024,), lr=0.1, lr_known=True),
    "retina-2-fedavg-large-lr-known": Config("retina", (1024,), max_batch=64, lr=0.1, lr_known=True),
    "lfw-2-trained-fedavg-lr-known": Config("lfw", (1024,), lr=0.05, trained=1000, lr_known=True),
    "fashion-10-fedavg-lr-known": Config("fashion-mnist", (1024,), lr=0.1, lr_known=True),
    "lfw-2-fedavg-3steps-lr-known": Config("lfw", (1024,), lr=0.1, steps=3, lr_known=True),
    "lfw-2-fedavg-epoch-lr-known": Config("lfw", (1024,), lr=0.1, local_batch=2, lr_known=True),
    "fashion-10-fedavg-epoch-momentum-lr-known": Config("fashion-mnist", (1024,), lr=0.05, local_batch=2,
                                                        momentum=True, lr_known=True),
    # a pseudo-gradient (old - new) / lr passed with the rate: read as the change it was divided from
    "lfw-2-pseudo": Config("lfw", (1024,), lr=0.1, pseudo=True),
    "retina-2-pseudo-large": Config("retina", (1024,), max_batch=64, lr=0.1, pseudo=True),
    "fashion-10-pseudo": Config("fashion-mnist", (1024,), lr=0.1, pseudo=True),
    "lfw-2-pseudo-3steps": Config("lfw", (1024,), lr=0.1, steps=3, pseudo=True),
    "lfw-2-weighted-untold": Config("lfw", (1024,), weighted=True, told=False),
    "fashion-10-weighted-untold": Config("fashion-mnist", (1024,), weighted=True, told=False),
    # malicious servers: a blend of samples may fit a trap row or an imprint bin up to the batch's scale
    "lfw-2-trap-fedavg-large": Config("lfw", (1024,), max_batch=64, lr=0.1, attack="trap-weights"),
    "lfw-2-trap-large": Config("lfw", (1024,), max_batch=64, attack="trap-weights"),
    "retina-2-trap-fedavg-large": Config("retina", (1024,), max_batch=64, lr=0.1, attack="trap-weights"),
    "retina-2-trap-large": Config("retina", (1024,), max_batch=64, attack="trap-weights"),
    "lfw-2-deep-trap-fedavg-large": Config("lfw", (1024, 256), max_batch=64, lr=0.1, attack="trap-weights"),
    "mni152-3-trap-fedavg-large": Config("mni152", (1024,), max_batch=64, lr=0.1, attack="trap-weights"),
    "fashion-10-trap-fedavg-large": Config("fashion-mnist", (1024,), max_batch=64, lr=0.1, attack="trap-weights"),
    "lfw-2-imprint-fedavg-large": Config("lfw", (1024,), max_batch=64, lr=0.1, attack="imprint"),
    "retina-2-imprint-fedavg-large": Config("retina", (1024,), max_batch=64, lr=0.1, attack="imprint"),
    "fashion-10-imprint-fedavg-large": Config("fashion-mnist", (1024,), max_batch=64, lr=0.1, attack="imprint"),
    "fashion-10-imprint-fedavg-256": Config("fashion-mnist", (1024,), max_batch=256, lr=0.1, attack="imprint"),
    # a weight change passed as a plain dict (new - old: minus the learning rate times the gradient), or a negated
    # gradient: with two classes the other labels explain the update's negative, so a label rests on the sign
    "lfw-2-change": Config("lfw", (1024,), lr=0.1, change=1),
    "lfw-2-change-pseudo": Config("lfw", (1024,), lr=0.1, change=-1),
    "retina-2-change": Config("retina", (1024,), lr=0.1, change=1),
    "mni152-3-change": Config("mni152", (1024,), lr=0.1, change=1),
    "fashion-10-change": Config("fashion-mnist", (1024,), lr=0.1, change=1),
    "lfw-2-negated": Config("lfw", (1024,), negated=True),
    "retina-2-negated": Config("retina", (1024,), negated=True),
    "lfw-2-trap-change-large": Config("lfw", (1024,), max_batch=64, lr=0.1, attack="trap-weights", change=1),
    "lfw-2-imprint-change-large": Config("lfw", (1024,), max_batch=64, lr=0.1, attack="imprint", change=1),
    "lfw-2-imprint-negated-large": Config("lfw", (1024,), max_batch=64, attack="imprint", negated=True),
    # an L2 penalty in the client's loss, read off the units no sample activated and peeled
    "lfw-2-penalty": Config("lfw", (1024,), penalty=1e-3),
    "fashion-10-penalty": Config("fashion-mnist", (1024,), penalty=1e-4),
    "digits-10-deep-penalty": Config("digits", (256, 256), penalty=1e-2),
    "retina-2-penalty-trained": Config("retina", (1024,), penalty=1e-4, trained=200),
    # an eval-mode BatchNorm1d after each hidden ReLU (Linear, ReLU, BatchNorm1d: tabular MLPs), folded into the next
    # Linear layer; a client in training mode normalises by its batch's statistics, which the fold's checks catch
    "lfw-2-relu-norm": Config("lfw", (1024,), norm=True, after_relu=True),
    "lfw-2-deep-relu-norm": Config("lfw", (512, 256), norm=True, after_relu=True),
    "fashion-10-relu-norm": Config("fashion-mnist", (1024,), norm=True, after_relu=True),
    "fashion-10-trained-relu-norm": Config("fashion-mnist", (1024,), trained=1000, norm=True, after_relu=True),
    "lfw-2-relu-norm-train": Config("lfw", (1024,), norm=True, after_relu=True, client_train=True),
    "fashion-10-deep-relu-norm-train": Config("fashion-mnist", (512, 256), norm=True, after_relu=True,
                                              client_train=True),
    # natural batches of 2 to 64, where peeling certifies what the first reading leaves (FedSGD gradients with the
    # batch size reported or not, trained and untrained, two and ten classes, smoothed, standardised inside the model,
    # normalised layers, two hidden layers; a one-step change at the rate the server set)
    "lfw-2-large": Config("lfw", (1024,), max_batch=64),
    "retina-2-large": Config("retina", (1024,), max_batch=64),
    "fashion-10-large": Config("fashion-mnist", (1024,), max_batch=64),
    "digits-10-shift-large": Config("digits", (256,), shift=0.3, max_batch=64),
    "lfw-2-trained-large": Config("lfw", (1024,), trained=1000, max_batch=64),
    "fashion-10-trained-large": Config("fashion-mnist", (1024,), trained=1000, max_batch=64),
    "lfw-2-deep-large": Config("lfw", (512, 256), max_batch=64),
    "lfw-2-smooth0.1-large": Config("lfw", (1024,), smoothing=0.1, max_batch=64),
    "fashion-10-standardised-inside-large": Config("fashion-mnist", (1024,), standardise=True, inside=True,
                                                   max_batch=64),
    "lfw-2-norm-large": Config("lfw", (1024,), norm=True, max_batch=64),
    "fashion-10-fedavg-lr-known-large": Config("fashion-mnist", (1024,), lr=0.1, lr_known=True, max_batch=64),
    # raw 0..255 pixels: logits in the hundreds, so the client's float32 forward pass, not the gradient's sum, sets
    # how far a subtracted term is off
    "fashion-10-raw255-large": Config("fashion-mnist", (1024,), scale=255.0, max_batch=64),
    "lfw-2-raw255-large": Config("lfw", (1024,), scale=255.0, max_batch=64),
    "retina-2-raw255-large": Config("retina", (1024,), scale=255.0, max_batch=64),
    "lfw-2-deep-raw255-large": Config("lfw", (512, 256), scale=255.0, max_batch=64),
    "fashion-10-deep-raw255-large": Config("fashion-mnist", (512, 256), scale=255.0, max_batch=64),
    "fashion-10-raw255-smooth0.1-large": Config("fashion-mnist", (1024,), scale=255.0, smoothing=0.1, max_batch=64),
    "fashion-10-raw255-fedavg-lr-known-large": Config("fashion-mnist", (1024,), scale=255.0, lr=0.001, lr_known=True,
                                                      max_batch=64),
}
