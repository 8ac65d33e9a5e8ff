"""The exclusivity attack on real data: every certifiable sample is rebuilt exactly, and a certificate
is never wrong — also when the gradient is tampered with, noisy, or the batch holds duplicates."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedleak
from fedleak import metrics
from fedleak.attacks.exact import settle


def _attack(model, x, y, **options):
    update = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, update, **options)
    return rec, metrics.match(rec, x, y), fedleak.analyze_exclusivity(model, x, y)


def _assert_sound(rec, scores, report):
    # no false certificate, ever
    assert not scores.false_certificate.any(), "a certified sample is wrong"
    # every sample certifiable in the update as sent is rebuilt exactly with its label (peeling's later rounds may
    # stop short of the closure the analysis counts: tests/attacks/test_peeling.py measures them)
    certifiable = report.head_certifiable
    assert (scores.exact & scores.label_correct)[certifiable].all()
    assert scores.recovered[certifiable].all()
    certified = scores.max_abs_error[scores.certified]
    assert (certified < 1e-4).all()


@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
def test_fashion_mnist_1024(fashion, m):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=m)
    x, y = fashion.batch(m, seed=m)
    rec, scores, report = _attack(model, x, y)
    _assert_sound(rec, scores, report)
    assert rec.inputs.shape[1:] == (1, 28, 28)
    if m <= 4:
        assert report.insecure and rec.batch_certified and rec.batch_size == m
        assert scores.recovered.all() and scores.label_accuracy == 1.0
    if rec.num_certified:
        assert rec.batch_size == m


@pytest.mark.parametrize("widths", [[256], [256, 256], [512, 256, 128]])
@pytest.mark.parametrize("m", [2, 8, 32])
def test_digits_any_depth(digits, widths, m):
    model = fedleak.make_mlp(digits.input_shape, widths, 10, seed=len(widths) + m)
    x, y = digits.batch(m, seed=m + 1)
    rec, scores, report = _attack(model, x, y)
    _assert_sound(rec, scores, report)


@pytest.mark.parametrize("widths", [[600], [256, 256]])
def test_bias_free_networks(digits, widths):
    model = fedleak.make_mlp(digits.input_shape, widths, 10, seed=0, bias=False)
    found = 0
    for m in (2, 8, 16):
        x, y = digits.batch(m, seed=m)
        rec, scores, report = _attack(model, x, y)
        _assert_sound(rec, scores, report)
        found += int(scores.recovered.sum())
    assert found >= 8


@pytest.mark.parametrize("widths", [[1024], [512, 256]])
def test_bias_free_first_layer_under_biased_layers(fashion, widths):
    """``nn.Linear(..., bias=False)`` at the bottom, biases above it (the homogeneous part of the scale search
    is forwarded once): the batch is certified, exactly."""
    torch.manual_seed(0)
    layers, d = [nn.Flatten()], 784
    for k, w in enumerate(widths):
        layers += [nn.Linear(d, w, bias=k > 0), nn.ReLU()]
        d = w
    model = nn.Sequential(*layers, nn.Linear(d, 10)).eval()
    x, y = fashion.batch(4, seed=2)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 4 and scores.recovered.all() and not scores.false_certificate.any()


def test_gradient_from_plain_torch_code_and_a_user_model():
    """A user's own Sequential (no Flatten, no fedleak code) and a gradient computed with plain torch."""
    data = fedleak.load_dataset("digits")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    x = data.x[:6].reshape(6, -1)
    y = data.y[:6]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    rec = fedleak.reconstruct(model, grads, num_examples=6)
    assert rec.inputs.shape[1:] == (64,)
    scores = metrics.match(rec, x, y)
    report = fedleak.analyze_exclusivity(model, x, y)
    _assert_sound(rec, scores, report)
    assert report.certifiable.sum() >= 3
    # without the batch size the same inputs come back, exact, but uncertified: a batch of near-copies would give them
    unsized = fedleak.reconstruct(model, grads)
    assert unsized.num_certified == 0 and "pass num_examples" in unsized.why_uncertified()
    assert metrics.match(unsized, x, y).exact.sum() >= report.certifiable.sum()


def test_trained_model_keeps_certificates_sound(digits):
    model = fedleak.make_mlp(digits.input_shape, [512], 10, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(digits), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(digits.x[idx]), digits.y[idx]).backward()
            opt.step()
    acc = (model(digits.x).argmax(1) == digits.y).float().mean()
    assert acc > 0.9  # confident predictions: tiny loss vectors stress float32
    for m in (4, 16, 64):
        x, y = digits.batch(m, seed=100 + m)
        _assert_sound(*_attack(model, x, y))


def test_noisy_gradient_certifies_nothing(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=1)
    x, y = fashion.batch(8, seed=1)
    update = fedleak.compute_gradient_update(model, x, y)
    gen = torch.Generator().manual_seed(0)
    noisy = {k: v + 1e-3 * v.abs().mean() * torch.randn(v.shape, generator=gen) for k, v in update.gradients.items()}
    rec = fedleak.reconstruct(model, noisy)
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 0
    assert not scores.false_certificate.any()


def test_another_loss_certifies_nothing_and_says_why(fashion):
    # a loss the attack is told is not the client's (label smoothing, told 0: a plain cross-entropy) changes every
    # sample's loss vector: no candidate, and the reason says so also for a bare gradient, whose batch size is
    # unknown
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=1)
    x, y = fashion.batch(8, seed=1)
    loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    for update in (grads, fedleak.GradientUpdate(grads, num_examples=8)):
        rec = fedleak.reconstruct(model, update, label_smoothing=0)
        assert rec.num_certified == 0 and not metrics.match(rec, x, y).false_certificate.any()
        assert "not the gradient of the cross-entropy it was read as" in rec.summary()


def test_tampered_rows_never_yield_a_wrong_certificate(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=2)
    x, y = fashion.batch(4, seed=2)
    update = fedleak.compute_gradient_update(model, x, y)
    report = fedleak.analyze_exclusivity(model, x, y)
    # find sample 0's exclusive rows and scale them (keeps each row's implied input, breaks the scale)
    z = model[1](x.reshape(4, -1))
    active = z > 0
    exans = torch.nonzero(active[0] & (active.sum(0) == 1)).flatten()
    assert len(exans) >= 2 and report.certifiable[0]
    grads = {k: v.clone() for k, v in update.gradients.items()}
    grads["1.weight"][exans] *= 1.5
    grads["1.bias"][exans] *= 1.5
    rec = fedleak.reconstruct(model, grads, num_examples=4)
    scores = metrics.match(rec, x, y)
    assert not scores.false_certificate.any()
    assert not rec.batch_certified
    # sample 0's rows now disagree with its output-layer columns: it must not be certified
    assert not scores.certified[0]
    assert scores.certified[1:].sum() >= 1


def test_duplicates_in_a_batch_are_not_certified_wrongly(digits):
    model = fedleak.make_mlp(digits.input_shape, [1024], 10, seed=3)
    x, y = digits.batch(6, seed=3)
    x = torch.cat([x, x[:2]])
    y = torch.cat([y, y[:2]])
    rec, scores, report = _attack(model, x, y)
    assert not report.certifiable[[0, 1, 6, 7]].any()  # duplicates share every neuron
    _assert_sound(rec, scores, report)
    assert not rec.batch_certified


def test_per_sample_evidence_and_label_counts(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=4)
    x, y = fashion.batch(32, seed=4)
    rec, scores, report = _attack(model, x, y)
    assert len(rec.samples) == len(rec)
    for s, c in zip(rec.samples, rec.certified.tolist()):
        assert s.certified == c and s.reason
        if c:
            assert s.witnesses[-1] >= 2 and s.residual < 1e-3
    assert rec.label_counts is not None and rec.label_counts.sum() == pytest.approx(32, abs=3)
    assert "certified" in rec.summary()


def test_bad_updates_raise_fedleak_errors(digits):
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    grads = dict(fedleak.compute_gradient_update(model, digits.x[:2], digits.y[:2]).gradients)
    with pytest.raises(fedleak.UpdateError, match="missing"):
        fedleak.reconstruct(model, {k: v for k, v in grads.items() if k != "1.weight"})
    with pytest.raises(fedleak.UpdateError, match="shape"):
        fedleak.reconstruct(model, {**grads, "3.weight": grads["3.weight"].T})
    bad = grads["1.bias"].clone()
    bad[2] = float("nan")
    with pytest.raises(fedleak.UpdateError, match="non-finite"):
        fedleak.reconstruct(model, {**grads, "1.bias": bad})
    with pytest.raises(fedleak.FedleakError, match="unknown attack"):
        fedleak.reconstruct(model, grads, attack="nope")
    with pytest.raises(fedleak.FedleakError, match="unknown option"):
        fedleak.reconstruct(model, grads, tolerance=3)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    tgrads = dict(fedleak.compute_gradient_update(tanh, digits.x[:2], digits.y[:2]).gradients)
    with pytest.raises(fedleak.ModelError, match="Tanh"):
        fedleak.reconstruct(tanh, tgrads)


@pytest.mark.parametrize("reported", [True, False])
def test_two_class_ghost_blends_are_never_certified(monkeypatch, reported):
    """With two classes every same-label loss vector is parallel, so neurons shared by the same samples imply
    one self-consistent blended 'ghost' input; only the common scale 1/M tells it from a real sample. The
    certificate alone refuses the ghosts (settling turned off), and settled by the scale the top layer's
    check reads, they never reach it: the same samples are certified either way."""
    data = fedleak.load_dataset("lfw")
    model = fedleak.make_mlp(data.input_shape, [1024], data.num_classes, seed=0)
    x, y = data.batch(256, seed=256)
    update = fedleak.compute_gradient_update(model, x, y)
    given = update if reported else dict(update.gradients)
    rec = fedleak.reconstruct(model, given)
    with monkeypatch.context() as m:
        m.setattr(settle, "SETTLE", float("inf"))
        full = fedleak.reconstruct(model, given)
    ghosts = [s for s in full.samples if s.witnesses[-1] >= 2 and not s.certified and s.residual < 1e-5]
    assert ghosts, "this batch is expected to contain self-consistent ghost candidates"
    assert torch.equal(rec.certified, full.certified) and torch.equal(rec.inputs, full.inputs)
    # settled: at a scale no sample of the batch has, or (no batch size reported, and no two candidates agree
    # on one) where the batch's scale is unknown
    assert any("output-layer columns" in s.reason or "no two candidates with the witnesses" in s.reason
               for s in rec.samples)
    for r in (rec, full):
        assert not metrics.match(r, x, y).false_certificate.any()
    report = fedleak.analyze_exclusivity(model, x, y)
    if reported:
        assert metrics.match(rec, x, y).recovered[report.certifiable].all()


# --- the fast paths decide as the slow ones would -----------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_walkdown_screen_never_rules_out_a_passing_row(digits, bias):
    from fedleak.attacks.exact.options import ExclusivityOptions
    from fedleak.attacks.exact.state import HeadAttack
    from fedleak.attacks.exact.walkdown import Screens, forward_check, implied_rows
    from fedleak.nets import as_network, forward_trace

    model = fedleak.make_mlp(digits.input_shape, [256, 256], 10, bias=bias, seed=3)
    x, y = digits.batch(16, seed=3)
    net = as_network(model)
    update = fedleak.compute_gradient_update(model, x, y)
    attack = HeadAttack(net.head, dict(update.gradients), ExclusivityOptions(), torch.float32)
    targets = forward_trace(net.head, x.reshape(16, -1), dtype=torch.float64).activations[1]
    screens = Screens.of(attack, 0, targets)
    rows = torch.nonzero(screens.live).flatten()
    kept = passed = 0
    for k in range(len(targets)):
        _, res = forward_check(attack, 0, implied_rows(attack, 0, rows), targets[k], targets[k].norm())
        passing = res <= attack.opts.forward_tol
        ok = screens.passes()[rows, k]
        assert ok[passing].all(), "the screen ruled out a row that passes the forward check"
        kept, passed = kept + int(ok.sum()), passed + int(passing.sum())
    assert passed > 0  # some rows are exclusive: the check has something to keep
    assert kept <= 2 * passed + len(targets)  # and the screen lets few others through


def test_attack_pins_torch_threads_and_restores_them(digits):
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.batch(2, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        rec = fedleak.reconstruct(model, update)
        assert torch.get_num_threads() == 2
        assert rec.num_certified == fedleak.reconstruct(model, update, threads=None).num_certified
    finally:
        torch.set_num_threads(before)
    with pytest.raises(fedleak.FedleakError, match="threads"):
        fedleak.reconstruct(model, update, threads=0)


def test_results_take_part_in_autograd_whatever_the_mode(digits):
    # the MLP attack runs in inference mode: what it returns must still be ordinary tensors
    model = fedleak.make_mlp(digits.input_shape, [128], 10, seed=0)
    x, y = digits.batch(2, seed=0)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    assert rec.num_certified == 2
    assert not torch.is_inference_mode_enabled()
    for t in (rec.inputs, rec.labels, rec.certified):
        assert not t.is_inference()
    inputs = rec.inputs.clone().requires_grad_(True)
    F.cross_entropy(model(inputs), rec.labels).backward()
    assert inputs.grad is not None and torch.isfinite(inputs.grad).all()
    rec.inputs.mul_(1.0)  # in place, outside inference mode: an inference tensor would refuse
    # the caches the attack filled in inference mode serve an attack that runs on autograd after it
    conv = fedleak.make_convnet(digits.input_shape, channels=(4,), kernel=3, padding=1, pool=None,
                                fc_widths=(64,), num_classes=10, seed=0)
    conv_update = fedleak.compute_gradient_update(conv, x, y)
    after = fedleak.reconstruct(conv, conv_update)
    assert not after.inputs.is_inference() and after.num_certified == 2
    with torch.inference_mode():  # a caller in inference mode: the CNN's autograd parts still run
        inside = fedleak.reconstruct(conv, conv_update)
    assert inside.num_certified == 2 and torch.equal(inside.inputs, after.inputs)
    # a model built in inference mode (its parameters keep no version counter) is read like any other
    with torch.inference_mode():
        frozen = fedleak.make_mlp(digits.input_shape, [128], 10, seed=0)
    again = fedleak.reconstruct(frozen, fedleak.compute_gradient_update(model, x, y))
    assert again.num_certified == 2 and torch.equal(again.inputs, rec.inputs)


def test_a_batch_size_read_off_the_scale_says_so(digits):
    """A gradient divided further, passed without a count (halved, batch of 2): the samples' scale is 0.5/2, read as
    a batch of 4; the note says where the size came from and what settles it. A weight change old - new of one step
    (lr 0.5) is no longer read so: the weights' float spacing tells it, and it is read as a weight update."""
    model = fedleak.make_mlp(digits.input_shape, (512,), 10, seed=3)
    x, y = digits.batch(2, seed=23)
    halved = {n: 0.5 * g for n, g in fedleak.compute_gradient_update(model, x, y).gradients.items()}
    rec = fedleak.reconstruct(model, halved, attack="exclusivity")
    assert rec.batch_size == 4 and not fedleak.metrics.match(rec, x, y).false_certificate.any()
    delta = fedleak.fedavg_update(model, x, y, lr=0.5, local_steps=1).delta()
    change = fedleak.reconstruct(model, delta, attack="exclusivity")
    assert any("weight change" in n for n in change.notes) and change.batch_size != 4
    assert any("read off the samples' common scale 1/4" in n and "num_examples" in n for n in rec.notes)
    told = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="exclusivity")
    assert not any("common scale" in n for n in told.notes)
