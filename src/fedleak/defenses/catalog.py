"""The built-in defenses' catalog: each defense's name, stage, summary, source and implementing module, known
without importing that module (or torch).

``fedleak info`` and the ``--defense`` help texts list defenses from here; looking a defense up
(:func:`fedleak.defenses.make_defense`) imports its module, whose ``@register_defense`` class must describe the
defense exactly as its entry here does (a mismatch raises :class:`RuntimeError` when the module is imported).
Adding a built-in defense: register its class and add its entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedleak.registry import CatalogEntry


@dataclass(frozen=True)
class DefenseSpec:
    """What a defense is, without its implementation: ``stage`` (``batch``, ``step`` or ``update``), a one-line
    ``summary`` and the ``source`` it implements."""

    stage: str
    summary: str
    source: str

    @property
    def text(self) -> str:
        return f"{self.stage}: {self.summary} ({self.source})"


DEFENSE_CATALOG: tuple[CatalogEntry[DefenseSpec], ...] = (
    CatalogEntry('exclusivity-reduction', 'fedleak.defenses.exclusivity_reduction', DefenseSpec(
        'batch', 'the client perturbs (or drops) samples so that no neuron of the first or the last ReLU layer is '
        'exclusive',
        'Pan et al. 2022 (exclusivity analysis), reversed as a client-side LP defense')),
    CatalogEntry('gaussian-noise', 'fedleak.defenses.noise', DefenseSpec(
        'update', 'clip the update to L2 norm `clip` (optional), add N(0, sigma^2) to every entry',
        'Gaussian mechanism; DP-FedAvg, McMahan et al. 2018')),
    CatalogEntry('laplace-noise', 'fedleak.defenses.noise', DefenseSpec(
        'update', 'clip the update to L1 norm `clip` (optional), add Laplace(0, scale) to every entry',
        'Laplace mechanism, Dwork & Roth 2014')),
    CatalogEntry('clipping', 'fedleak.defenses.clipping', DefenseSpec(
        'update', 'scale each layer / tensor / the whole update down to L2 norm <= bound',
        'per-layer clipping, McMahan et al. 2018; Abadi et al. 2016')),
    CatalogEntry('value-clipping', 'fedleak.defenses.clipping', DefenseSpec(
        'update', 'cut every entry to [-bound, bound] (torch.nn.utils.clip_grad_value_)',
        'gradient clipping by value, as torch.nn.utils.clip_grad_value_ applies it')),
    CatalogEntry('top-k', 'fedleak.defenses.sparsification', DefenseSpec(
        'update', 'keep the `ratio` fraction of largest-magnitude entries of the whole update',
        "Deep Gradient Compression, Lin et al. 2018 (OLIVE's side channel, Kato et al.)")),
    CatalogEntry('gradient-pruning', 'fedleak.defenses.sparsification', DefenseSpec(
        'update', 'zero the `ratio` fraction of smallest-magnitude entries of every tensor',
        'Deep Leakage from Gradients, Zhu et al. 2019')),
    CatalogEntry('qsgd', 'fedleak.defenses.quantization', DefenseSpec(
        'update', 'per tensor, unbiased stochastic quantisation of |v_i|/||v|| to `levels` levels',
        'QSGD, Alistarh et al. 2017')),
    CatalogEntry('quantize', 'fedleak.defenses.quantization', DefenseSpec(
        'update', 'per tensor, round to `bits`-bit symmetric uniform levels (scale max|v|/(2^(bits-1)-1))',
        "symmetric per-tensor uniform (int8 / int4) quantisation, QSGD's deterministic counterpart")),
    CatalogEntry('half-precision', 'fedleak.defenses.quantization', DefenseSpec(
        'update', 'round every entry to float16 or bfloat16 (`dtype`): half the bytes',
        'half-precision uploads, as mixed-precision training (torch.autocast) computes them')),
    CatalogEntry('sign', 'fedleak.defenses.quantization', DefenseSpec(
        'update', "sign of every entry, times the tensor's mean |v| (scale=mean) or 1 (scale=none)",
        'signSGD, Bernstein et al. 2018; scaled sign, Karimireddy et al. 2019')),
    CatalogEntry('soteria', 'fedleak.defenses.soteria', DefenseSpec(
        'update', "prune the `ratio` fraction of an FC layer's input features with the smallest ||dr/dx|| / |r| "
                  "(zero their weight columns)",
        'Soteria, Sun et al. CVPR 2021')),
    CatalogEntry('mixup', 'fedleak.defenses.mixing', DefenseSpec(
        'batch', 'each sample becomes a Dirichlet mixture of k samples of the batch, with soft labels',
        'Zhang et al. ICLR 2018 (MixUp), as a defense in GradAttack, Huang et al. NeurIPS 2021')),
    CatalogEntry('instahide', 'fedleak.defenses.mixing', DefenseSpec(
        'batch', 'Dirichlet mixture of k batch samples (soft labels), then a random sign per value',
        'Huang, Song, Li, Arora, ICML 2020 (InstaHide, inside-dataset)')),
    CatalogEntry('label-smoothing', 'fedleak.defenses.label_smoothing', DefenseSpec(
        'batch', "train on (1 - smoothing) onehot(y) + smoothing / K (F.cross_entropy's label_smoothing)",
        "Szegedy et al. CVPR 2016 (Inception-v3); torch's CrossEntropyLoss(label_smoothing=...)")),
    CatalogEntry('augmentation', 'fedleak.defenses.augmentation', DefenseSpec(
        'batch', 'random horizontal flip and random crop after padding (a shift of up to `padding` pixels) of '
                 'every image',
        'the standard image-training recipe (RandomCrop with padding, RandomHorizontalFlip); augmentation as a '
        'defense: ATS, Gao et al. CVPR 2021')),
    CatalogEntry('disguisednets', 'fedleak.defenses.disguise', DefenseSpec(
        'batch', 'secret block permutation and per-block orthogonal projection of every image (keyed)',
        'Sharma & Chen 2019 (DisguisedNets)')),
    CatalogEntry('dp-sgd', 'fedleak.defenses.dp_sgd', DefenseSpec(
        'step', 'per-sample gradient clipping to C and Gaussian noise z*C (Opacus)',
        'Abadi et al., CCS 2016; Opacus, Yousefpour et al. 2021')),
    CatalogEntry('local-dp', 'fedleak.defenses.flower_dp', DefenseSpec(
        'update', "Flower's LocalDpMod: clip the update to `clip`, add Gaussian noise calibrated to (epsilon, delta) "
                  "per round",
        'Flower LocalDpMod; Gaussian mechanism, Dwork & Roth 2014')),
    CatalogEntry('central-dp', 'fedleak.defenses.flower_dp', DefenseSpec(
        'update', "Flower's central DP: clients clip to `clip`, the server adds noise to the aggregate (each update "
                  "it sees is only clipped)",
        'Flower DifferentialPrivacyClientSideFixedClipping; DP-FedAvg, McMahan et al. 2018')),
)
