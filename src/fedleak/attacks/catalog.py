"""The built-in attacks' catalog: each attack's name, what it runs on, its description and the module that
implements it, known without importing that module (or torch).

``fedleak info`` and ``fedleak --help`` list attacks from here; :func:`fedleak.attacks.get_attack` imports an
attack's module when the attack is first used, and the module's ``@register_attack(...)`` must describe the attack
exactly as its entry here does (a mismatch raises :class:`RuntimeError` when the module is imported, and
``tests/test_registry.py`` checks every module of :mod:`fedleak.attacks`). Adding a built-in attack: decorate it
with ``@register_attack`` and add its entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedleak.registry import CatalogEntry


@dataclass(frozen=True)
class AttackSpec:
    """What an attack runs on and does, without its implementation.

    ``update_kinds``: ``"gradient"`` and/or ``"weights"``. ``needs_relu_network``: an exact attack, which runs only
    on a network :func:`fedleak.nets.as_network` reads; the optimisation attacks, which need only autograd, do not.
    ``takes_defense``: the attack accepts the client's defenses as its ``defense`` option (a defense-aware attack).
    ``optimises``: an optimisation attack (or one that ends in one), which takes ``iterations`` and ``seed``.
    ``reads_range``: the attack takes the range the client's inputs live on as its ``data_range`` option (the
    searches that keep their inputs in a box search inside it; the certificates' tolerances are on it).
    ``takes_loss``: the attack takes the client's loss (``label_smoothing``, ``class_weights``, ``focal_gamma``:
    :class:`~fedleak.client_loss.ClientLoss`) and reads or simulates the update of that loss.
    """

    update_kinds: tuple[str, ...]
    description: str
    needs_relu_network: bool = False
    takes_defense: bool = False
    optimises: bool = False
    reads_range: bool = False
    takes_loss: bool = False


BOTH = ("gradient", "weights")

ATTACK_CATALOG: tuple[CatalogEntry[AttackSpec], ...] = (
    CatalogEntry("exclusivity", "fedleak.attacks.exact.attack", AttackSpec(
        BOTH, "deterministic, certified reconstruction from exclusively activated neurons "
              "(MLPs, and CNNs through their conv layers)", needs_relu_network=True, takes_defense=True,
        reads_range=True, takes_loss=True)),
    CatalogEntry("conv-exclusivity", "fedleak.attacks.exact.attack", AttackSpec(
        BOTH, "the exclusivity attack under the name it had for CNNs (FC head, then conv inversion)",
        needs_relu_network=True, takes_defense=True, reads_range=True, takes_loss=True)),
    CatalogEntry("trap-weights", "fedleak.attacks.malicious.trap", AttackSpec(
        BOTH, "malicious trap-weight first layer (Boenisch et al.): certified x = dW_i/db_i", needs_relu_network=True)),
    CatalogEntry("class-fishing", "fedleak.attacks.malicious.class_fishing", AttackSpec(
        BOTH, "malicious class-fishing output layer (Wen et al.): the target class's samples, certified by counting",
        needs_relu_network=True, reads_range=True)),
    CatalogEntry("imprint", "fedleak.attacks.malicious.imprint", AttackSpec(
        BOTH, "malicious imprint bins in the first layer (Robbing the Fed): certified bin differences",
        needs_relu_network=True)),
    CatalogEntry("first-layer", "fedleak.attacks.first_layer", AttackSpec(
        BOTH, "one sample's gradient: x = dW_i/db_i from the first Linear layer of any model (Phong et al. "
              "2017), certified by reproducing the whole update; a batch's agreeing rows (gradients, and FedAvg "
              "weight changes of any number of local steps), uncertified")),
    CatalogEntry("auto", "fedleak.attacks.auto", AttackSpec(
        BOTH, "exact exclusivity route where it applies, then DLM+ (weights) / IG (gradients)", takes_defense=True,
        optimises=True, reads_range=True, takes_loss=True)),
    CatalogEntry("dlm", "fedleak.attacks.dlm", AttackSpec(
        ("weights",), "DLM: match the weight change with a learned learning rate (local steps unrolled)",
        takes_defense=True, optimises=True, reads_range=True, takes_loss=True)),
    CatalogEntry("dlm+", "fedleak.attacks.dlm", AttackSpec(
        ("weights",), "DLM+: scale-free normalised matching of the weight change (no learning rate)",
        takes_defense=True, optimises=True, reads_range=True, takes_loss=True)),
    CatalogEntry("dlg", "fedleak.attacks.inversion.attacks", AttackSpec(
        BOTH, "Deep Leakage from Gradients: L2 gradient matching, data and soft labels, L-BFGS", takes_defense=True,
        optimises=True, takes_loss=True)),
    CatalogEntry("idlg", "fedleak.attacks.inversion.attacks", AttackSpec(
        BOTH, "improved DLG: labels read from the output layer, then L2 matching with L-BFGS", takes_defense=True,
        optimises=True, takes_loss=True)),
    CatalogEntry("ig", "fedleak.attacks.inversion.attacks", AttackSpec(
        BOTH, "Inverting Gradients: cosine matching + total variation, signed Adam, box, restarts",
        takes_defense=True, optimises=True, reads_range=True, takes_loss=True)),
)
