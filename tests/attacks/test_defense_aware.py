"""Defense-aware attacks: the defense's forward model inside the optimisation attacks' matching (ROG,
fedleak.attacks.defense_forward), and what the exact attack can certify under each defense
(fedleak.attacks.defense_aware)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import fedleak
from fedleak.attacks.defense_aware import (
    EXACT_RULES,
    ExactContext,
    defense_stack,
    exact_plan,
    layer_scales,
)
from fedleak.attacks.defense_forward import forward_model
from fedleak.defenses import DefenseStack, UpdateFilter, defend_update, defended_gradient, make_defense
from fedleak.defenses.clipping import GROUPINGS, clip_groups
from fedleak.errors import OptionError
from fedleak.nets import as_network

pytestmark = pytest.mark.usefixtures("one_thread")

FMNIST_MLP = ((1, 28, 28), [1024], 10)


def psnr(rec, x, y) -> float:
    return fedleak.metrics.match(rec, x, y, data_range=(0.0, 1.0)).mean_psnr()


def aware_and_unaware(model, update, defense, **options) -> tuple[fedleak.Reconstruction, fedleak.Reconstruction]:
    unaware = fedleak.reconstruct(model, update, defense="none", **options)  # nothing modelled, nothing read
    aware = fedleak.reconstruct(model, update, defense=defense, **options)
    return unaware, aware


# --- the forward model ---------------------------------------------------------------------------------


def test_forward_model_is_the_stack_observe_in_order(digits):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    x, y = digits.batch(2, seed=1)
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    stack = DefenseStack.of("clipping:bound=0.05,per=update + top-k:ratio=0.2")
    sent = defend_update(fedleak.GradientUpdate(grads), stack).gradients
    fm = forward_model(stack, list(grads), sent)
    # on the true update the forward model reproduces what the client sent
    for got, want in zip(fm(list(grads.values())), sent.values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    # on another update: clipped as a whole, then the sent positions kept and the dropped ones penalised only
    # beyond the smallest magnitude sent (not top-k of its own)
    other = {k: torch.randn_like(v) for k, v in grads.items()}
    clipped = clip_groups(other, 0.05, GROUPINGS["update"])
    threshold = min(float(t[t != 0].abs().min()) for t in sent.values() if (t != 0).any())
    for name, got in zip(grads, fm(list(other.values()))):
        c, kept = clipped[name], sent[name] != 0
        torch.testing.assert_close(got, torch.where(kept, c, c - c.clamp(-threshold, threshold)))
    assert forward_model(DefenseStack.of(None), list(grads), sent) is None


def test_bad_defense_options_are_refused(digits):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    x, y = digits.batch(1, seed=1)
    update = fedleak.compute_gradient_update(model, x, y)
    for bad, says in [("no-such-defense", "no-such-defense"), (3, "int 3"), ("top-k:ratio=2", "ratio"),
                      ({"top-k": 1}, "dict")]:
        for attack, options in (("ig", {"iterations": 1}), ("idlg", {"iterations": 1}), ("exclusivity", {})):
            with pytest.raises(OptionError, match="defense") as err:
                fedleak.reconstruct(model, update, attack=attack, defense=bad, **options)
            assert says in str(err.value)
    assert defense_stack("none") == DefenseStack(())


def test_notes_name_the_forward_model_and_what_is_outside_it(digits):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    x, y = digits.batch(1, seed=2)
    update = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, update, attack="ig", iterations=2,
                              defense=["mixup", "top-k:ratio=0.5", "gaussian-noise:sigma=0.001"])
    notes = " | ".join(rec.notes)
    assert "forward model: the simulated update goes through top-k(ratio=0.5) before it is matched" in notes
    assert "gaussian-noise(sigma=0.001): randomness the attacker cannot replay" in notes
    assert "batch defense(s) mixup are not part of the forward model" in notes
    assert "labels were inferred from an update that went through top-k(ratio=0.5), gaussian-noise" in notes
    assert not any("keeps the inputs in no box" in n for n in rec.notes)
    given = fedleak.reconstruct(model, update, attack="idlg", iterations=2, defense="sign", labels=y)
    assert not any("labels were inferred" in n for n in given.notes)
    assert any("keeps the inputs in no box" in n for n in given.notes)
    plain = fedleak.reconstruct(model, update, attack="ig", iterations=2)
    assert not any("forward model" in n for n in plain.notes)


# --- defense-aware optimisation beats the defense-unaware attack -------------------------------------------


def test_aware_ig_beats_unaware_under_top_k(digits):
    """Top-k 10% of a single digit's gradient: the unaware attack matches the dropped entries as zeros (21 dB
    measured), the aware one masks them out and recovers the digit (70 dB)."""
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.batch(1, seed=40)
    sent = defend_update(fedleak.compute_gradient_update(model, x, y), "top-k:ratio=0.1")
    unaware, aware = aware_and_unaware(model, sent, "top-k:ratio=0.1", attack="ig", iterations=200, seed=0)
    assert psnr(aware, x, y) > 45 and psnr(aware, x, y) > psnr(unaware, x, y) + 20


def test_aware_ig_beats_unaware_under_per_layer_clipping_batch(digits):
    """Per-layer clipping changes the layers' relative weight in the cosine: a batch of 2 measured 31 dB unaware,
    71 dB aware (100 iterations)."""
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.batch(2, seed=31)
    sent = defend_update(fedleak.compute_gradient_update(model, x, y), "clipping:bound=0.1")
    unaware, aware = aware_and_unaware(model, sent, "clipping:bound=0.1", attack="ig", iterations=100, seed=0)
    assert psnr(aware, x, y) > 50 and psnr(aware, x, y) > psnr(unaware, x, y) + 20


def test_aware_ig_beats_unaware_under_sign(digits):
    """signSGD keeps little of a digit (its support): both attacks stay blurry, the aware one measurably less
    (measured +2.1 and +1.7 dB here; +0.2 to +2.2 dB over 8 digits at 300 iterations)."""
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    gains = []
    for seed in (40, 42):
        x, y = digits.batch(1, seed=seed)
        sent = defend_update(fedleak.compute_gradient_update(model, x, y), "sign")
        unaware, aware = aware_and_unaware(model, sent, "sign", attack="ig", iterations=150, seed=0)
        gains.append(psnr(aware, x, y) - psnr(unaware, x, y))
    assert sum(gains) / len(gains) > 1.0


# --- the exact attack ----------------------------------------------------------------------------------


def exact_under(fashion, spec, m, seed=100, model=None, **options):
    model = model or fedleak.make_mlp(*FMNIST_MLP, seed=0)
    x, y = fashion.batch(m, seed=seed)
    du = defended_gradient(model, x, y, spec, seed=seed)
    rec = fedleak.reconstruct(model, du.update, attack="exclusivity", **options)
    return rec, fedleak.metrics.match(rec, x, y, data_range=(0.0, 1.0))


def test_exact_attack_certifies_through_dp_sgd_without_noise(fashion):
    spec = "dp-sgd:noise_multiplier=0,max_grad_norm=1"
    rec, res = exact_under(fashion, spec, 4, defense=spec)
    assert rec.num_certified == 4 and res.false_certificates == 0 and int(res.recovered.sum()) == 4
    assert any("clipped to norm 1" in n and "clip_norm" in n for n in rec.notes)
    blind, blind_res = exact_under(fashion, spec, 4)  # without the bound the scales do not fit: nothing, soundly
    assert blind.num_certified == 0 and blind_res.false_certificates == 0


@pytest.mark.parametrize("per", ["layer", "update"])
def test_exact_attack_undoes_clipping(fashion, per):
    """Per-layer factors are recovered from ReLU homogeneity; a whole-update factor is fitted by the
    certificate. Not told, the attack reads per-layer clipping off the layers' equal norms and certifies the same
    (before it did, it certified nothing: the layers disagree on the scale)."""
    spec = f"clipping:bound=0.1,per={per}"
    rec, res = exact_under(fashion, spec, 4, seed=101, defense=spec)
    assert rec.num_certified == 4 and res.false_certificates == 0 and int(res.recovered.sum()) == 4
    if per == "layer":
        blind, blind_res = exact_under(fashion, spec, 4, seed=101)
        assert blind.num_certified == 4 and blind_res.false_certificates == 0
        assert any("read as clipping(bound=" in n and "did not declare" in n for n in blind.notes)


def test_a_known_transport_error_is_scaled_with_the_clipped_layers(fashion):
    """Under per-layer clipping the observed layers are scaled by recovered factors; an update's known transport
    error is scaled with them (it is read from the update where it is used, times the factor): a tiny error keeps
    every certificate, a large one certifies less, never wrongly."""
    spec = "clipping:bound=0.1,per=layer"
    model = fedleak.make_mlp(*FMNIST_MLP, seed=0)
    x, y = fashion.batch(4, seed=101)
    update = defended_gradient(model, x, y, spec, seed=101).update
    largest = max(float(v.abs().max()) for v in update.gradients.values())
    certified = []
    for error in (1e-12, 1e-3 * largest):
        noisy = fedleak.GradientUpdate(dict(update.gradients), num_examples=update.num_examples, error=error)
        rec = fedleak.reconstruct(model, noisy, defense=spec)
        assert fedleak.metrics.match(rec, x, y, data_range=(0.0, 1.0)).false_certificates == 0
        certified.append(rec.num_certified)
    assert certified[0] == 4 and certified[1] < 4


def test_layer_scales_recover_per_layer_factors(fashion):
    model = fedleak.make_mlp((1, 28, 28), [64, 32], 10, seed=0)
    x, y = fashion.batch(3, seed=5)
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    factors = {"1": 0.3, "3": 2.0, "5": 0.7}
    scaled = {k: v * factors[k.rpartition(".")[0]] for k, v in grads.items()}
    scales = layer_scales(ExactContext(scaled, as_network(model)))
    assert scales == pytest.approx([0.3 / 0.7, 2.0 / 0.7, 1.0], rel=1e-4)


@pytest.mark.parametrize("spec,says", [
    ("quantize:bits=8", "the update went through quantize(bits=8): its rows are rounded"),
    ("gaussian-noise:sigma=0.0001", "the update went through gaussian-noise(sigma=0.0001): every entry carries "
                                    "Gaussian noise"),
    ("clipping:bound=0.1,per=tensor", "weights and biases were scaled by different unknown factors"),
])
def test_exact_attack_says_why_it_cannot_certify(fashion, spec, says):
    rec, res = exact_under(fashion, spec, 4, defense=spec)
    assert rec.num_certified == 0 and res.false_certificates == 0
    assert any(says in n and "no certificate is possible" in n for n in rec.notes)
    assert says in rec.why_uncertified()
    assert all(says in s.reason for s in rec.samples)


@dataclass(frozen=True)
class Passthrough(UpdateFilter):
    """An update filter the exact attack has no rule for (it happens to change nothing)."""

    name: ClassVar[str] = "test-passthrough"

    def apply(self, update, batch, generator):
        return dict(update)


def test_a_defense_without_a_rule_withdraws_every_certificate(fashion):
    assert "test-passthrough" not in EXACT_RULES
    rec, res = exact_under(fashion, Passthrough(), 4, defense=Passthrough())
    assert len(rec) == 4 and rec.num_certified == 0 and not rec.batch_certified
    for s in rec.samples:
        assert s.reason.startswith("the update went through test-passthrough: it changed the update in a way the "
                                   "certificate does not model, so no certificate is possible (the update as sent "
                                   "would certify it")


def test_exact_plan_combines_defenses(fashion):
    model = fedleak.make_mlp((1, 28, 28), [32], 10, seed=0)
    x, y = fashion.batch(2, seed=3)
    obs = clip_groups(fedleak.compute_gradient_update(model, x, y).gradients, 1e-3, GROUPINGS["update"])
    net = as_network(model)
    two = exact_plan(DefenseStack.of("clipping:bound=0.001,per=update + dp-sgd:noise_multiplier=0,max_grad_norm=1"),
                     obs, net)
    assert two.refusal and "one rescaling defense at a time" in two.refusal
    noisy = exact_plan(DefenseStack.of("clipping:bound=0.001,per=update + qsgd:levels=4"), obs, net)
    assert "qsgd(levels=4)" in noisy.refusal
    one = exact_plan(DefenseStack.of("clipping:bound=100,per=update + clipping:bound=0.001,per=update"), obs, net)
    assert not one.refusal and dict(one.overrides) == {"known_scale": False} and "sent unchanged" in one.note
    batch = exact_plan(DefenseStack.of(make_defense("mixup")), obs, net)
    assert "it changed the batch before the gradient" in batch.refusal


def test_the_registry_says_which_attacks_take_the_clients_defenses():
    from fedleak.attacks import attack_specs

    specs = attack_specs()  # the catalog: no attack module imported
    assert all(specs[name].takes_defense for name in ("exclusivity", "conv-exclusivity", "dlg", "idlg", "ig", "dlm",
                                                      "auto"))
    assert not any(specs[name].takes_defense for name in ("trap-weights", "imprint", "first-layer"))


def test_auto_gives_the_clients_defense_to_its_exact_route(fashion):
    """Per-sample clipping of a known bound: ``auto`` told of it certifies what the exclusivity attack told of it
    certifies (its exact route rescales each sample as the defense did); not told, its exact route reads the
    clipping off the layers' norms and certifies the same."""
    torch.manual_seed(0)
    model = fedleak.make_mlp(fashion.input_shape, [256], 10, seed=0)
    x, y = fashion.batch(4, seed=11)
    spec = "clipping:bound=0.1"
    sent = fedleak.defended_gradient(model, x, y, spec, seed=0)
    exact = fedleak.reconstruct(model, sent.update, attack="exclusivity", defense=spec)
    told = fedleak.reconstruct(model, sent.update, attack="auto", defense=spec, budget=30, progress=False,
                               iterations=2)
    assert int(exact.certified.sum()) >= 3 and told.attack.startswith("auto:exclusivity")
    assert int(told.certified.sum()) == int(exact.certified.sum())
    assert not fedleak.metrics.match(told, sent.inputs, sent.labels).false_certificate.any()
    blind = fedleak.reconstruct(model, sent.update, attack="auto", budget=30, progress=False, iterations=2)
    assert int(blind.certified.sum()) == int(exact.certified.sum())
    assert not fedleak.metrics.match(blind, sent.inputs, sent.labels).false_certificate.any()


def test_the_exact_attack_under_clipping_by_value(fashion):
    """Declared and reaching the bound, or read off the update: nothing certified, every reason says so; declared
    but reaching nothing: the plain attack."""
    model = fedleak.make_mlp(fashion.input_shape, [512], 10, seed=0)
    x, y = fashion.batch(4, seed=2)
    update = fedleak.compute_gradient_update(model, x, y)
    top = max(float(g.abs().max()) for g in update.gradients.values())
    plain = fedleak.reconstruct(model, update)
    assert plain.num_certified >= 1
    above = fedleak.reconstruct(model, update, defense=f"value-clipping:bound={2 * top}")
    assert above.certified.tolist() == plain.certified.tolist() and any("sent unchanged" in n for n in above.notes)
    clipped = fedleak.GradientUpdate({n: g.clamp(-0.1 * top, 0.1 * top) for n, g in update.gradients.items()},
                                     num_examples=4)
    for told, says in ((f"value-clipping:bound={0.1 * top}", "the update went through value-clipping"),
                       (None, "the update was clipped by value at")):
        rec = fedleak.reconstruct(model, clipped, defense=told)
        assert rec.num_certified == 0 and not fedleak.metrics.match(rec, x, y).false_certificate.any()
        assert all(says in s.reason and "no certificate is possible" in s.reason for s in rec.samples)


def test_auto_reads_clipping_by_value(fashion):
    """One sample: the first layer certifies it. A batch: the search clips its simulated gradients alike."""
    torch.manual_seed(0)
    model = fedleak.make_mlp(fashion.input_shape, [256], 10, seed=0)
    for m in (1, 4):
        x, y = fashion.batch(m, seed=7)
        update = defended_gradient(model, x, y, "value-clipping:bound=0.003", seed=0).update
        rec = fedleak.reconstruct(model, update, attack="auto", budget=2, progress=False)
        scores = fedleak.metrics.match(rec, x, y)
        assert not scores.false_certificate.any()
        if m == 1:
            assert rec.num_certified == 1 and float(scores.max_abs_error[0]) < 1e-6
        else:
            assert rec.num_certified == 0
            assert any("simulated gradients go through value-clipping" in n for n in rec.notes)


def test_optimisation_attacks_read_clipping_by_value(digits):
    """Not declared, a clip that shows in the gradient goes into the search's forward model; declared, the client's
    own defense is used as given."""
    model = fedleak.make_mlp((1, 8, 8), [64], 10, seed=0)
    x, y = digits.batch(2, seed=1)
    update = defended_gradient(model, x, y, "value-clipping:bound=0.002", seed=0).update
    read = fedleak.reconstruct(model, update, attack="ig", iterations=5, seed=0)
    assert any("clip_grad_value_" in n and "go through value-clipping" in n for n in read.notes)
    told = fedleak.reconstruct(model, update, attack="ig", iterations=5, seed=0, defense="value-clipping:bound=0.002")
    assert not any("clip_grad_value_" in n for n in told.notes)
    assert any("value-clipping(bound=0.002)" in n for n in told.notes)
    plain = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="ig", iterations=5, seed=0)
    assert not any("forward model" in n for n in plain.notes)
