"""Malicious-server attacks that change only the *weights* the server sends (algorithms spec §6).

* **Trap weights** ("When the Curious Abandon Honesty", Boenisch et al., EuroS&P 2023):
  :func:`trap_weights` re-initialises the first ``nn.Linear`` layer so that every row has half of its
  entries ``-|N(0, sigma^2)|`` and the other half ``scale`` times those magnitudes, bias 0. On
  non-negative inputs neurons then fire rarely, many fire for one sample only, and for such a neuron
  ``x = dW_i / db_i`` exactly. The ``"trap-weights"`` attack reads these rows.
* **Imprint bins** ("Robbing the Fed", Fowl et al., ICLR 2022) inside the *same* architecture:
  :func:`imprint_weights` sets ``bins`` first-layer rows to one linear measurement ``h(x) = a . x``
  (pixel mean or a random projection) with biases at the negatives of quantiles of ``h`` over public
  data, and makes the next layer's columns of those rows identical, so a sample's back-propagated signal
  is the same on every bin it opens. A sample alone between two consecutive thresholds is then
  ``(dW_i - dW_{i+1}) / (db_i - db_{i+1})``. The ``"imprint"`` attack reads these differences.

Both attacks run on a FedSGD gradient or on a weight update whose scale is unknown (one local SGD step:
``before - after = lr * gradient``); they use only the update, the model the server sent and
``num_examples``. Each candidate is **certified** before it counts: the candidate is pushed through the
whole network (float64), its first-layer gradient is recomputed for every possible label, and it is
kept only when (a) every neuron it claims fires for it, (b) for one label the recomputed gradient
explains the observed bias entries it claims (all of them, at one scale; trap weights: also the next
layer's gradient columns of its rows), (c) that scale is the batch's common scale (``lr/M``, or ``1/M``
for a mean-loss gradient), found as the value most candidates agree on, and (trap weights) (d) no other
candidate at that scale opens a neuron it claims alone (a row claimed alone holds one sample). A blend of
samples fails (b) where its rows carry more than the scale; where they carry only the scale (every imprint
bin; trap weights on a two-class model with one hidden layer) it passes whenever its scale matches by
chance, so there a certificate also needs a proof that covers the whole batch
(:mod:`fedleak.attacks.malicious.proofs`).
"""

from fedleak.attacks.malicious.certify import MaliciousOptions
from fedleak.attacks.malicious.class_fishing import class_fishing_attack, class_fishing_weights
from fedleak.attacks.malicious.imprint import imprint_attack, imprint_weights
from fedleak.attacks.malicious.trap import trap_weights, trap_weights_attack

__all__ = ["MaliciousOptions", "trap_weights", "imprint_weights", "class_fishing_weights", "trap_weights_attack",
           "imprint_attack", "class_fishing_attack"]
