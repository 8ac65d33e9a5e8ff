"""Augmentation (random flips and padded crops) on real images: what it moves, what a gradient of it gives away, and
leakage scored on what the rebuilt images show."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak.defenses import DefenseStack, defended_gradient, make_defense, parse_defense
from fedleak.defenses.augmentation import Placement
from fedleak.errors import OptionError
from fedleak.evaluation import EvaluationSettings, evaluate
from fedleak.evaluation.cells import LeakageCell
from fedleak.metrics import match


@pytest.fixture(scope="module")
def images(fashion):
    return fashion.batch(8, seed=0)


def test_each_image_is_shifted_within_the_padding_and_maybe_mirrored(images):
    x, y = images
    aug = make_defense("augmentation", padding=3, fill=-1.0)
    torch.manual_seed(0)
    moved, labels = aug(None, x, y)
    assert torch.equal(labels, y) and moved.shape == x.shape
    found = []
    for img, out in zip(x, moved):  # each output is exactly one placement of its own image
        hits = [p for p in aug.placements() if torch.equal(aug.place(img, p), out)]
        assert hits, "an augmented image is no placement of its original"
        found.append(hits[0])
    assert {p.mirrored for p in found} == {False, True}
    assert all(abs(p.down) <= 3 and abs(p.right) <= 3 for p in found) and any(p.down or p.right for p in found)
    shifted = aug.place(x[:1], Placement(2, -1, False))
    assert torch.equal(shifted[..., 2:, :-1], x[:1, ..., :-2, 1:]) and bool((shifted[..., :2, :] == -1).all())
    torch.manual_seed(0)
    assert torch.equal(aug(None, x, y)[0], moved)  # torch's generator, seeded, gives one augmentation


def test_originals_are_scored_as_the_rebuilt_images_show_them(images):
    x, y = images
    stack = DefenseStack.of("augmentation:padding=2").bind(data_range=(0.0, 1.0))
    torch.manual_seed(1)
    moved, _ = stack.transform(None, x, y)
    assert torch.equal(stack.shown(x, moved.reshape(len(x), -1)), moved)  # an MLP's flat reconstructions
    assert torch.equal(stack.shown(x, moved[[3, 0]])[[3, 0]], moved[[3, 0]])  # found in any order
    unmoved = stack.shown(x, x)
    assert torch.equal(unmoved, x)  # what already sits in the frame stays
    assert torch.equal(stack.shown(x, torch.zeros(2, 5)), x)  # another size: left for the scoring to refuse
    noise = torch.rand(4, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    far = match(noise, stack.shown(x[:4], noise), data_range=(0.0, 1.0))
    assert float(far.psnr.max()) < 15  # moving the originals around makes no original out of noise
    assert float(match(moved, x, data_range=(0.0, 1.0)).psnr.min()) < 20  # as they are, the frame hides them


def test_normalised_data_is_shifted_against_each_channel_s_black():
    """Bound to data normalised per channel, the frame is each channel's image of a black pixel (CIFAR-10's
    statistics: three different values), not the channels' lowest value for all."""
    norm = fedleak.normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    aug = DefenseStack.of("augmentation:padding=2").bind(data_range=norm.input_range, normalization=norm).defenses[0]
    x = norm.apply(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    shifted = aug.place(x, Placement(2, 0, False))
    black = norm.apply(torch.zeros(1, 3, 1, 1)).reshape(3)
    assert torch.allclose(shifted[:, :, :2, :].amin(dim=(0, 2, 3)), black, atol=1e-6)
    assert torch.allclose(shifted[:, :, :2, :].amax(dim=(0, 2, 3)), black, atol=1e-6)
    assert torch.allclose(norm.invert(shifted[:, :, :2, :]), torch.zeros(2, 3, 2, 8), atol=1e-6)


@pytest.mark.parametrize("spec, message", [
    ("augmentation:padding=-1", "padding"),
    ("augmentation:flip=false,padding=0", "leaves every image as it is"),
    ("augmentation:padding=28", "smaller than the image"),
])
def test_bad_settings_say_what_to_change(spec, message, images):
    x, y = images
    with pytest.raises(OptionError, match=message):
        parse_defense(spec)(None, x, y)


def test_tabular_rows_are_refused_with_the_shape_it_needs():
    with pytest.raises(OptionError, match=r"\(N, C, H, W\)"):
        make_defense("augmentation")(None, torch.rand(4, 20), torch.zeros(4, dtype=torch.long))


def test_the_exact_attack_certifies_the_augmented_images_which_show_the_originals(fashion):
    x, y = fashion.batch(4, seed=5)
    model = fedleak.make_mlp(fashion.input_shape, [1024], fashion.num_classes, seed=0)
    stack = DefenseStack.of("augmentation:padding=0").bind(data_range=fashion.value_range)
    defended = defended_gradient(model, x, y, stack, seed=3)
    rec = fedleak.reconstruct(model, defended.update, defense=stack)
    assert rec.num_certified == 4 and any("augmentation" in note for note in rec.notes)
    sent = match(rec, defended.inputs, y, data_range=fashion.value_range)
    assert int(sent.recovered.sum()) == 4 and sent.false_certificates == 0
    mirrored = ~torch.isclose(defended.inputs, x).reshape(4, -1).all(1)
    assert bool(mirrored.any())  # some images went mirrored: against the originals as they are, those miss
    plain = match(rec, x, y, data_range=fashion.value_range)
    assert int(plain.recovered.sum()) == 4 - int(mirrored.sum())
    shown = match(rec, stack.shown(x, rec.inputs), y, data_range=fashion.value_range)
    assert int(shown.recovered.sum()) == 4


def test_an_evaluation_scores_augmented_leakage_on_what_the_images_show():
    settings = EvaluationSettings(data="digits", test_data=None, test_size=300, widths=(128,),
                                  attacks=("exclusivity",), attack_batch=2, trials=2, rounds=2, clients=2,
                                  client_size=100, batch_size=8, defenses=("augmentation:padding=2",))
    cells = {c.defense: c for c in evaluate(settings).cells if isinstance(c, LeakageCell)}
    moved = cells["augmentation(padding=2)"]
    assert moved.recovered == moved.samples == 4 and moved.false_certificates == 0


def test_a_client_s_own_record_places_each_original_as_its_image_shows_it(fashion):
    """The federation's ground truth: over several local batches, each original next to its own augmented image."""
    from fedleak.clients.defended import defended_local_round

    x, y = fashion.batch(16, seed=2)
    model = fedleak.make_mlp(fashion.input_shape, [64], fashion.num_classes, seed=0)
    stack = DefenseStack.of("augmentation:padding=3").bind(data_range=fashion.value_range)
    torch.manual_seed(0)
    local = defended_local_round(model, [(x[:8], y[:8]), (x[8:], y[8:])], stack, lr=0.1,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(local.original, x) and not torch.equal(local.inputs, x)  # the client trained on moved images
    assert torch.equal(stack.shown(local.original, local.inputs, paired=True), local.inputs)


def test_an_audit_compares_what_it_rebuilt_with_the_originals_as_shown(digits):
    from fedleak.audit import AuditSettings, run_audit

    settings = AuditSettings(data="digits", widths=(256,), batch_sizes=(2,), trials=2,
                             defenses=("augmentation:padding=2",))
    rows = {r["scenario"]: r for r in run_audit(settings, dataset=digits).summary_rows()}
    moved = rows["augmentation(padding=2)"]
    assert moved["recovered_fraction"] == 1.0 and moved["false_certificates"] == 0
    assert moved["psnr_vs_original"] >= 99  # each rebuilt image is its original flipped and shifted, exactly
