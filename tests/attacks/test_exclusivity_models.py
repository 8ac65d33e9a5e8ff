"""The exclusivity attack on models as users write them: nn.Module classes read with no input shape, clients in
training mode, updates in another precision, CNNs of a strided or frozen convolution; never a wrong certificate."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_models import DropoutMLP, FlowerNet, mixed_precision_gradient

import fedleak
from fedleak import metrics


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
