"""The built-in membership attacks' catalog: each attack's name, summary, source, what it reads and its module,
known without importing that module (or torch). Adding a built-in attack: register its class and add it here."""

from __future__ import annotations

from dataclasses import dataclass

from fedleak.registry import CatalogEntry


@dataclass(frozen=True)
class MembershipSpec:
    """What a membership attack is, without its implementation: a one-line ``summary``, the ``source`` it
    implements, and ``needs``, what it reads (sorted: ``model``, ``rounds``, ``shadow``, ``update``)."""

    summary: str
    source: str
    needs: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"{self.summary} (reads {', '.join(self.needs)}; {self.source})"


MEMBERSHIP_CATALOG: tuple[CatalogEntry[MembershipSpec], ...] = (
    CatalogEntry("loss", "fedleak.membership.baselines", MembershipSpec(
        "minus the record's cross-entropy loss under the model", "LOSS attack, Yeom et al. 2018", ("model",))),
    CatalogEntry("confidence", "fedleak.membership.baselines", MembershipSpec(
        "the model's probability of the record's true class", "confidence attack, Salem et al. 2019",
        ("model",))),
    CatalogEntry("modified-entropy", "fedleak.membership.baselines", MembershipSpec(
        "minus the modified prediction entropy (label-aware)", "Song & Mittal 2021", ("model",))),
    CatalogEntry("augmented-loss", "fedleak.membership.augmented", MembershipSpec(
        "minus the record's cross-entropy averaged over its flips and shifts",
        "augmentation-aware membership inference, Yu et al. AAAI 2021; Choquette-Choo et al. ICML 2021 (its loss form)",
        ("model",))),
    CatalogEntry("whitebox", "fedleak.membership.whitebox", MembershipSpec(
        "attack model on per-layer gradients, activations, loss and label, trained on shadows",
        "Nasr, Shokri & Houmansadr, IEEE S&P 2019 (passive, supervised)", ("model", "shadow"))),
    CatalogEntry("gradient-norm", "fedleak.membership.gradnorm", MembershipSpec(
        "minus the L2 norm of the record's loss gradient (all parameters, or one tensor)",
        "gradient-norm features, Nasr, Shokri & Houmansadr, IEEE S&P 2019", ("model",))),
    CatalogEntry("update-alignment", "fedleak.membership.alignment", MembershipSpec(
        "alignment of the record's gradient at the sent weights with the client's update",
        "gradient-update features, Nasr, Shokri & Houmansadr, IEEE S&P 2019", ("model", "update"))),
    CatalogEntry("loss-drop", "fedleak.membership.lossdrop", MembershipSpec(
        "the record's loss at the sent weights minus its loss at the client's weights",
        "active read-out, Nasr, Shokri & Houmansadr, IEEE S&P 2019", ("model", "update"))),
    CatalogEntry("rounds-alignment", "fedleak.membership.alignment", MembershipSpec(
        "update alignment averaged over the client's rounds",
        "multi-round features, Nasr, Shokri & Houmansadr, IEEE S&P 2019", ("model", "rounds"))),
    CatalogEntry("lira", "fedleak.membership.lira", MembershipSpec(
        "offline likelihood-ratio test against shadow models' per-record statistics",
        "LiRA, Carlini et al., IEEE S&P 2022 (offline, out-models)", ("model", "shadow"))),
    CatalogEntry("whitebox-unsupervised", "fedleak.membership.unsupervised", MembershipSpec(
        "auto-encoder on the candidates' white-box features, scored and clustered, no labels",
        "Nasr, Shokri & Houmansadr, IEEE S&P 2019 (passive, unsupervised)", ("model",))),
)

# what a membership audit runs unless told otherwise: the attacks that train no shadow model
CHEAP_ATTACKS = ("loss", "confidence", "gradient-norm", "update-alignment")
