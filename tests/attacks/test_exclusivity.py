"""The exclusivity attack on real data: every certifiable sample is rebuilt exactly, and a certificate
is never wrong — also when the gradient is tampered with, noisy, or the batch holds duplicates."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_models import DropoutMLP, FlowerNet, mixed_precision_gradient

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
    # every certifiable sample is rebuilt exactly with its label
    certifiable = report.certifiable
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


# ---- models as users write them: nn.Module classes, no input shape ----------------------------------------


def _twin(model: nn.Module, twin: nn.Sequential, names: dict[str, str]) -> nn.Sequential:
    """``twin`` with ``model``'s weights, its parameter names mapped by ``names`` (prefix -> prefix)."""
    state = {}
    for key, value in model.state_dict().items():
        prefix, leaf = key.rsplit(".", 1)
        state[f"{names[prefix]}.{leaf}"] = value
    twin.load_state_dict(state)
    return twin


def _same_reconstruction(a, b):
    # the same computation; threaded float64 reductions may differ in the last bit
    assert torch.allclose(a.inputs.reshape(len(a), -1), b.inputs.reshape(len(b), -1), rtol=0, atol=1e-9)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.certified, b.certified)
    assert [(s.label, s.certified, s.witnesses) for s in a.samples] == [(s.label, s.certified, s.witnesses)
                                                                         for s in b.samples]
    assert a.batch_size == b.batch_size


def test_flower_quickstart_net_without_input_shape(fashion):
    """Flower's Net (F.relu, x.view, one MaxPool2d module used twice) on CIFAR-sized 3x32x32 images: the input
    shape is inferred, the head is attacked on the conv features and the blocks are walked down, exactly as for
    the equivalent nn.Sequential."""
    torch.manual_seed(0)
    model = FlowerNet()
    x, y = fashion.batch(4, seed=4)
    x = F.pad(x, (2, 2, 2, 2)) * torch.tensor([1.0, 0.8, 0.6])[None, :, None, None]  # CIFAR-like 3x32x32
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="exclusivity",
                              fallback_steps=10)
    assert rec.inputs.shape[1:] == (3, 32, 32)
    assert any("inferred" in n for n in rec.notes)
    assert len(rec) >= 1 and set(rec.labels.tolist()) <= set(y.tolist())
    # 16 pooled 5x5 maps cannot determine conv2's 6x14x14 input: rebuilt by feature matching, never certified
    assert rec.num_certified == 0
    assert all("conv layer 'conv2'" in s.reason and "feature matching" in s.reason for s in rec.samples)
    # ... and says first that no batch size can change that: both pooled layers have fewer outputs than inputs
    never = "no input of this model can be certified at any batch size: conv layer 'conv1' gives at most 1176"
    assert all(s.reason.startswith(never) for s in rec.samples)
    assert rec.missing_reason == "" or rec.missing_reason.startswith(never)
    assert not metrics.match(rec, x, y).false_certificate.any()

    twin = _twin(model, nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(6, 16, 5),
                                      nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
                                      nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)),
                 {"conv1": "0", "conv2": "3", "fc1": "7", "fc2": "9", "fc3": "11"})
    twin_rec = fedleak.reconstruct(twin, fedleak.compute_gradient_update(twin, x, y), attack="exclusivity",
                                   fallback_steps=10)
    _same_reconstruction(rec, twin_rec)


def test_mlp_class_with_dropout_without_input_shape(fashion):
    """An nn.Module MLP (F.relu, x.view, eval-mode Dropout) rebuilds the same certified samples as its
    nn.Sequential twin, with no input shape given."""
    torch.manual_seed(1)
    model = DropoutMLP(784, 1024, 10, p=0.5).eval()
    x, y = fashion.batch(4, seed=7)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="exclusivity")
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 4 and rec.batch_certified and scores.recovered.all()
    assert not scores.false_certificate.any()
    twin = _twin(model, nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 10)),
                 {"fc1": "1", "fc2": "3"})
    twin_rec = fedleak.reconstruct(twin, fedleak.compute_gradient_update(twin, x, y), attack="exclusivity")
    _same_reconstruction(rec, twin_rec)


def test_client_in_training_mode_with_dropout_certifies_nothing_and_says_why(fashion):
    """A client that computes its gradient in training mode drops random hidden units of every sample: the
    server's eval-mode model no longer explains the update. Nothing is certified, nothing falsely, and the
    reason names the model's Dropout and training mode (where the same batch in eval mode certifies all 4); read
    in training mode (the default where eval mode certifies nothing) the 4 inputs are rebuilt exactly,
    uncertified."""
    torch.manual_seed(1)
    model = DropoutMLP(784, 1024, 10, p=0.5)
    x, y = fashion.batch(4, seed=7)
    torch.manual_seed(3)
    update = fedleak.compute_gradient_update(model.train(), x, y)
    rec = fedleak.reconstruct(model.eval(), update, attack="exclusivity", train_dropout=False)
    assert rec.num_certified == 0 and not metrics.match(rec, x, y).false_certificate.any()
    why = rec.why_uncertified()
    assert "Dropout 'dropout' (p = 0.5)" in why and "training mode" in why
    assert any("Dropout is read in eval mode" in n for n in rec.notes)
    read = fedleak.reconstruct(model, update, attack="exclusivity")
    scores = metrics.match(read, x, y)
    assert read.num_certified == 0 and len(read) == 4 and scores.exact.all() and scores.label_correct.all()
    assert all("Dropout 'dropout' (p = 0.5) in training mode" in s.reason for s in read.samples)
    ok = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="exclusivity")
    assert ok.num_certified == 4 and all("Dropout" not in s.reason for s in ok.samples)


def test_client_in_training_mode_with_batch_norm_certifies_nothing_and_says_why(digits):
    """A client in training mode normalises its batch by the batch's own statistics, not the running ones the
    server's eval-mode model uses: nothing is certified, and the reason names the BatchNorm and training mode
    (the same batch from a client in eval mode: all 4 certified)."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    with torch.no_grad():  # running statistics as a trained model has them
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
    x, y = digits.batch(4, seed=1)
    client = copy.deepcopy(model).train()  # its running statistics move; the server keeps the round's
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(client, x, y), input_shape=(1, 8, 8))
    assert rec.num_certified == 0 and not metrics.match(rec, x, y).false_certificate.any()
    assert "BatchNorm '1' in training mode" in rec.why_uncertified()
    ok = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), input_shape=(1, 8, 8))
    assert ok.num_certified == 4 and not metrics.match(ok, x, y).false_certificate.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_update_certifies_nothing_and_says_why(fashion, dtype):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(4, seed=2)
    update = fedleak.compute_gradient_update(model, x, y)
    half = fedleak.GradientUpdate({k: v.to(dtype) for k, v in update.gradients.items()}, num_examples=4)
    rec = fedleak.reconstruct(model, half)
    assert rec.num_certified == 0 and not metrics.match(rec, x, y).false_certificate.any()
    assert f"the update is in {str(dtype)[6:]}, whose rounding" in rec.why_uncertified()
    assert fedleak.reconstruct(model, update).num_certified == 4  # the same update in float32
    # its rows are grouped to its rounding: the samples come back near, not as a hundred one-row candidates
    scores = metrics.match(rec, x, y)
    assert len(rec) <= 5 and (scores.matched >= 0).sum() >= 3
    assert float(scores.max_abs_error[scores.matched >= 0].max()) <= 4 * torch.finfo(dtype).eps


def test_an_autocast_update_is_read_at_its_precision_and_says_so(fashion):
    """A client under torch.autocast sends float32 tensors of bfloat16 products: read as bfloat16 (before, as float32:
    no row agreed with another, nothing was rebuilt, and the reason blamed noise or another loss)."""
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(4, seed=2)
    update = fedleak.read_update(model, mixed_precision_gradient(model, x, y, torch.bfloat16), num_examples=4)
    rec = fedleak.reconstruct(model, update)
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 0 and (scores.matched >= 0).sum() >= 3
    assert float(scores.max_abs_error[scores.matched >= 0].max()) <= 4 * torch.finfo(torch.bfloat16).eps
    assert "fits bfloat16 (computed under mixed precision, torch.autocast" in rec.why_uncertified()
    assert "the update's bfloat16 rounding" in rec.why_uncertified()


def test_a_float32_models_update_sent_as_float64_is_read_in_float32(fashion):
    """A client of a float32 model computes in float32; its gradient or weights sent as float64 (numpy's default,
    a serialiser's) carry float32 rounding, which the attack allows for, not float64's: they certify as the
    float32 update does. A float16 reply still certifies nothing and says why."""
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(4, seed=2)
    update = fedleak.compute_gradient_update(model, x, y)
    wide = {k: v.double() for k, v in update.gradients.items()}
    rec = fedleak.reconstruct(model, wide, num_examples=4)
    assert rec.num_certified == 4 and not metrics.match(rec, x, y).false_certificate.any()
    step = fedleak.fedavg_update(model, x, y, lr=0.1)
    for dtype, certified in (("float64", 4), ("float16", 0)):
        reply = fedleak.read_update(model, {k: v.numpy().astype(dtype) for k, v in step.after.items()},
                                    num_examples=4)
        rec = fedleak.reconstruct(model, reply, attack="exclusivity")
        assert rec.num_certified == certified and not metrics.match(rec, x, y).false_certificate.any()
    assert "the update is in float16, whose rounding" in rec.why_uncertified()
    double = copy.deepcopy(model).double()  # a float64 model's own float64 gradient: read in float64
    rec = fedleak.reconstruct(double, fedleak.compute_gradient_update(double, x.double(), y))
    assert rec.num_certified == 4


def test_cnn_read_at_the_size_its_stride_halves(digits):
    """A strided convolution (stride 2, padding 1) fits 7x7 and 8x8 images; with no shape given the attack assumes
    8x8, the size the stride halves, and certifies 8x8 digits. A 7x7 crop is to that convolution the 8x8 image
    with a zero last row and column (its padding): that is what the attack rebuilds and certifies from 7x7 crops,
    and the notes name the sizes that fit. Given the shape, it certifies the crops themselves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 512),
                          nn.ReLU(), nn.Linear(512, 10))
    x, y = digits.batch(4, seed=2)
    update = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, update)
    assert rec.num_certified >= 1 and rec.inputs.shape[1:] == (1, 8, 8)
    assert not metrics.match(rec, x, y).false_certificate.any()
    crops = x[..., :7, :7].contiguous()
    update = fedleak.compute_gradient_update(model, crops, y)
    rec = fedleak.reconstruct(model, update)
    assert rec.num_certified >= 1 and rec.inputs.shape[1:] == (1, 8, 8)
    assert not metrics.match(rec, F.pad(crops, (0, 1, 0, 1)), y).false_certificate.any()
    assert any("square images of 7 to 8 pixels a side fit" in n for n in rec.notes)
    given = fedleak.reconstruct(model, update, input_shape=(1, 7, 7))
    scores = metrics.match(given, crops, y)
    assert given.num_certified >= 1 and not scores.false_certificate.any()
    assert all("inferred" not in s.reason for s in given.samples)


def test_fine_tuned_head_on_a_frozen_conv_backbone(digits):
    """A client that freezes its conv layers sends the head's gradient only: the head is attacked as usual and
    the features are inverted through the frozen convolution from its weights, certified as with every layer
    trained. The same model read without the freeze says which gradients the update lacks, and what to do."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(216, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    model[0].requires_grad_(False)
    x, y = digits.batch(4, seed=4)
    update = fedleak.compute_gradient_update(model, x, y)
    assert sorted(update.gradients) == ["3.bias", "3.weight", "5.bias", "5.weight"]
    rec = fedleak.reconstruct(model, update, input_shape=(1, 8, 8))
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 4 and scores.recovered.all() and not scores.false_certificate.any()
    with pytest.raises(fedleak.UpdateError, match=r"missing \['0.bias', '0.weight'\] \(a client that trains only some "
                                                  r"layers .*requires_grad_\(False\)"):
        fedleak.reconstruct(model.requires_grad_(True), update, input_shape=(1, 8, 8))


def test_sequential_cnn_without_input_shape(digits):
    """A plain nn.Sequential CNN records no input shape: the one that fits its layers (1x8x8) is found, and the
    samples are rebuilt through the conv layer and certified as with the shape given."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    x, y = digits.batch(4, seed=4)
    update = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, update)
    scores = metrics.match(rec, x, y)
    assert rec.inputs.shape[1:] == (1, 8, 8)
    assert rec.num_certified == 4 and scores.recovered.all() and not scores.false_certificate.any()
    assert all(s.solved_layers == (1,) for s in rec.samples)
    _same_reconstruction(rec, fedleak.reconstruct(model, update, input_shape=(1, 8, 8)))


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
