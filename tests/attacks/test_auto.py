"""attack="auto": exact route first (MLPs and CNNs), optimisation for the rest, one time budget, per-sample
routes and reasons, and bad input. Real data (digits, LFW faces, retina patches), real autograd."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from user_models import DropoutMLP, FlowerNet, confident_mlp, mixed_precision_gradient

import fedleak
from fedleak.attacks.exact import exclusivity_on_weights
from fedleak.clients import fedavg_update
from fedleak.models.cnn import make_lenet
from fedleak.models.convnet import make_convnet

pytestmark = pytest.mark.usefixtures("one_thread")

SLACK = 1.5  # seconds past the budget: the last iteration, and packaging the result


def _every_sample_explained(rec: fedleak.Reconstruction) -> None:
    assert len(rec.samples) == len(rec) and all(rec.routes)
    for s in rec.samples:
        assert s.certified or ("not certified" in s.reason or "not optimised" in s.reason), s.reason


# ---- the exact route, MLPs and CNNs -----------------------------------------------------------------------


def test_one_step_unknown_lr_is_recovered_exactly(digits):
    x, y = digits.batch(4, seed=11)
    model = fedleak.make_mlp(digits.input_shape, [512], 10, seed=0)
    update = fedavg_update(model, x, y, lr=0.37, local_steps=1)  # the server knows neither lr nor steps
    rec = fedleak.reconstruct(model, update, attack="auto", progress=False)
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.attack == "auto:exclusivity"
    assert scores.recovered.all() and not scores.false_certificate.any()
    assert any("learning rate cancels" in n for n in rec.notes)
    assert any("no optimisation needed" in n for n in rec.notes)
    assert set(rec.routes) == {"exclusivity (certified)"}


def test_a_lone_sample_classified_with_probability_one_is_read_off_the_first_layer(digits):
    """Its loss vector has no negative entry in float32: the exact route reads none of its rows and says why; auto
    used to search it with IG for its whole budget (garbage); the first Linear layer gives it, certified."""
    model = confident_mlp(width=256, scale=300.0)  # the probability rounds to 1, the gradient is not zero
    with torch.no_grad():
        x = digits.x[:1]
        y = model(x).argmax(1)
        assert float(torch.softmax(model(x), 1)[0, y]) == 1.0
    update = fedleak.compute_gradient_update(model, x, y)
    exact = fedleak.reconstruct(model, update)
    assert len(exact) == 0 and "classified with probability 1" in exact.summary()
    rec = fedleak.reconstruct(model, update, attack="auto", budget=30, progress=False)
    assert rec.attack == "auto:first-layer" and rec.num_certified == 1
    assert fedleak.metrics.match(rec, x, y).recovered_fraction == 1.0
    # in a batch, the first layer's rows give such samples exactly (uncertified) beside the certified others
    x = digits.x[[0, 1, 2, 5, 20, 21, 22, 23]]
    with torch.no_grad():
        y = model(x).argmax(1)
        y[4:] = (y[4:] + 1) % 10  # the last four labelled wrong: readable, certified by the exact route
        assert (torch.softmax(model(x), 1)[torch.arange(8), y][:4] == 1).all()
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="auto", budget=20,
                              progress=False)
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified == 4 and scores.recovered[4:].all() and scores.false_certificates == 0
    assert "first-layer (uncertified, batch rows)" in rec.routes
    assert (scores.max_abs_error[:4] <= 1e-4).sum() >= 2  # saturated samples, read exactly off the rows


def test_cnn_certifies_what_exclusivity_certifies(lfw):
    """fedleak's own certifiable CNN: auto takes the exact CNN route, keeps every certified sample, and IG
    searches the one the exact route could not certify."""
    x, y = lfw.batch(4, seed=1)
    model = make_convnet(lfw.input_shape, 2, channels=(6,), kernel=3, padding=1, fc_widths=(256,), seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    exact = fedleak.reconstruct(model, update, attack="exclusivity")
    assert exact.num_certified >= 1
    rec = fedleak.reconstruct(model, update, attack="auto", budget=4, progress=False)
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified >= exact.num_certified and not scores.false_certificate.any()
    assert scores.recovered.sum() >= exact.num_certified and len(rec) == 4
    assert rec.routes.count("exclusivity (certified)") == rec.num_certified
    _every_sample_explained(rec)
    if rec.num_certified < 4:
        assert rec.attack == "auto:exclusivity+ig" and "ig" in rec.routes


# ---- FedAvg weight updates ----------------------------------------------------------------------------------


def _lr01_update(digits, reveal: bool = True):
    """A one-step FedAvg update at lr 0.1, the rate the server set (``reveal``), whose exact route rebuilds more
    candidates than the batch holds."""
    x, y = digits.batch(8, seed=1)
    model = fedleak.make_mlp(digits.input_shape, [1024], 10, seed=0)
    return model, fedavg_update(model, x, y, lr=0.1, reveal_learning_rate=reveal), x, y


def test_extra_candidates_come_from_blends_and_stay_out_of_the_batch(digits):
    """The exclusivity attack returns every candidate it rebuilt, blends beyond the batch included
    (uncertified); asked for at most the batch size it keeps the certified ones and the most plausible others."""
    model, update, x, y = _lr01_update(digits)
    every = exclusivity_on_weights(model, update, peel=False)  # (peeling certifies this batch whole)
    capped = exclusivity_on_weights(model, update, beyond_batch=False, peel=False)
    assert len(every) > 8 >= len(capped) and capped.num_certified == every.num_certified
    assert any("beyond the batch" in n for n in capped.notes)
    assert set(capped.routes) <= {"exclusivity (certified)", "exclusivity (uncertified)"}


@pytest.fixture
def no_rows(monkeypatch):
    """The first Linear layer's rows give nothing more: the search stage alone fills the batch."""
    monkeypatch.setattr("fedleak.attacks.auto.stages.run_first_layer", lambda *args, **kwargs: None)


def test_one_step_fedavg_update_fills_the_batch_from_the_first_layers_rows(digits):
    """The exact route certifies part of a one-step update (steps not declared); the first layer's rows give the
    others exactly, uncertified, so no search is needed."""
    model, update, x, y = _lr01_update(digits)
    rec = fedleak.reconstruct(model, update, attack="auto", budget=4, progress=False)
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.attack == "auto:exclusivity+first-layer" and 1 <= rec.num_certified < 8 and len(rec) == 8
    assert scores.exact.all() and scores.recovered.sum() == rec.num_certified and not scores.false_certificate.any()
    assert sorted(rec.labels.tolist()) == sorted(y.tolist())
    n_cert = rec.num_certified
    assert set(rec.routes[:n_cert]) == {"exclusivity (certified)"}
    assert set(rec.routes[n_cert:]) == {"first-layer (uncertified, batch rows)"}
    assert any("no optimisation needed" in n for n in rec.notes)
    _every_sample_explained(rec)
    # at an unknown rate 4 of 8 samples at one factor may be 4 blends of 2 near-copies: the same inputs, uncertified
    model, unknown, x, y = _lr01_update(digits, reveal=False)
    rec = fedleak.reconstruct(model, unknown, attack="auto", budget=4, progress=False)
    assert rec.num_certified == 0 and fedleak.metrics.match(rec, x, y).exact.all()
    assert "more than half of the batch at one factor" in rec.why_uncertified()


def test_one_step_fedavg_update_within_budget_with_progress(digits, capsys, no_rows):
    model, update, x, y = _lr01_update(digits)
    start = time.perf_counter()
    rec = fedleak.reconstruct(model, update, attack="auto", budget=4)
    took = time.perf_counter() - start
    err = capsys.readouterr().err
    assert "auto: exclusivity" in err and "auto: dlm+" in err and "left" in err  # the bar: route, time left
    assert took <= 4 + SLACK and len(rec) == 8
    assert rec.attack == "auto:exclusivity+dlm+" and rec.num_certified >= 1
    _every_sample_explained(rec)
    scores = fedleak.metrics.match(rec, x, y)
    assert not scores.false_certificate.any() and sorted(rec.labels.tolist()) == sorted(y.tolist())
    # the samples the exact route rebuilt without a certificate start DLM+ and stay close to the originals
    assert any("started from the estimates" in n for n in rec.notes)
    assert any("rebuilt it but did not certify it" in s.reason for s in rec.samples if not s.certified)
    assert scores.mean_psnr() > 40


def test_multi_step_skips_the_exact_route_within_budget(digits):
    x, y = digits.batch(4, seed=12)
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    update = fedavg_update(model, x, y, lr=0.05, local_steps=3, reveal_local_steps=True)
    start = time.perf_counter()
    rec = fedleak.reconstruct(model, update, attack="auto", budget=2, progress=False)
    assert time.perf_counter() - start <= 2 + SLACK
    assert rec.attack == "auto:dlm+" and not rec.certified.any() and len(rec) == 4
    assert any("exact route skipped" in n and "3 local steps" in n for n in rec.notes)
    assert set(rec.routes) == {"dlm+"}
    assert all("3 local steps" in s.reason and "not certified" in s.reason for s in rec.samples)
    # the search ended by the budget, by matching the update, or at its iteration cap, and says which
    assert rec.iterations == 500 or any("stopped by the time budget" in n or "converged" in n for n in rec.notes)


def test_partial_certification_keeps_certified_samples_fixed(digits, no_rows):
    """Where only some samples are certified (and the rows give no more), they are kept exactly and DLM+ searches
    the rest."""
    x, y = digits.batch(8, seed=0)
    model = fedleak.make_mlp(digits.input_shape, [1024], 10, seed=0)
    update = fedavg_update(model, x, y, lr=0.1, local_steps=1)
    rec = fedleak.reconstruct(model, update, attack="auto", iterations=30, progress=False)
    scores = fedleak.metrics.match(rec, x, y)
    n_cert = rec.num_certified
    assert rec.attack == "auto:exclusivity+dlm+" and 0 < n_cert < 8 and len(rec) == 8
    assert scores.recovered.sum() >= n_cert and not scores.false_certificate.any()
    assert any("come from the exclusivity attack" in n for n in rec.notes)
    assert sorted(rec.labels.tolist()) == sorted(y.tolist())
    assert rec.routes[:n_cert] == ("exclusivity (certified)",) * n_cert and set(rec.routes[n_cert:]) == {"dlm+"}


def _plain_mlp_weight_update(digits):
    """A plain nn.Sequential MLP on flat inputs (no Flatten, no input_shape attribute) and a one-step update."""
    x, y = digits.batch(8, seed=0)
    x = x.reshape(8, -1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 10))
    return model, fedavg_update(model, x, y, lr=0.1, local_steps=1), x, y


def test_plain_sequential_weight_update_keeps_certified_samples_and_adds_the_rest(digits, no_rows):
    """No input shape anywhere: the exact route's certified samples come back exactly, plus DLM+'s for the rest
    (searched in the shape the exact route rebuilt)."""
    model, update, x, y = _plain_mlp_weight_update(digits)
    exact = fedleak.reconstruct(model, update, attack="exclusivity")
    assert 0 < exact.num_certified < 8
    rec = fedleak.reconstruct(model, update, attack="auto", iterations=20, progress=False)
    assert rec.attack == "auto:exclusivity+dlm+" and len(rec) == 8 and rec.inputs.shape[1:] == (64,)
    assert rec.num_certified == exact.num_certified
    assert (rec.inputs[rec.certified] == exact.inputs[exact.certified]).all()
    scores = fedleak.metrics.match(rec, x, y)
    assert scores.recovered.sum() >= exact.num_certified and not scores.false_certificate.any()


def test_certified_samples_survive_a_failing_fallback(digits, monkeypatch, no_rows):
    """Should the optimisation refuse the model, the exact route's samples are still returned, within the batch."""

    def refuse(*args, **kwargs):
        raise fedleak.ModelError("the fallback cannot read this model")

    monkeypatch.setattr("fedleak.attacks.auto.stages.search_rest", refuse)
    model, update, x, y = _plain_mlp_weight_update(digits)
    rec = fedleak.reconstruct(model, update, attack="auto", progress=False)
    assert rec.attack == "auto:exclusivity" and 0 < rec.num_certified <= len(rec) <= 8
    assert fedleak.metrics.match(rec, x, y).recovered.sum() >= rec.num_certified
    assert any("could not search for the other samples" in n for n in rec.notes)
    assert all("not optimised" in s.reason for s in rec.samples if not s.certified)


# ---- models the exact route cannot certify ------------------------------------------------------------------


def test_flower_quickstart_cnn_gets_a_result_with_reasons():
    """Flower's quickstart CNN (max pooled, no input_shape): the exact route rebuilds nothing, auto still returns
    the batch within a small budget, every sample with its route and why it is not certified."""
    x, y = fedleak.load_dataset("retina").batch(2, seed=0)
    torch.manual_seed(0)
    model = FlowerNet()
    update = fedleak.compute_gradient_update(model, x, y)
    exact = fedleak.reconstruct(model, update, attack="exclusivity", fallback="none")
    assert len(exact) == 0 and "why:" in exact.summary() and exact.missing_reason in exact.summary()
    start = time.perf_counter()
    rec = fedleak.reconstruct(model, update, attack="auto", budget=3, progress=False)
    assert time.perf_counter() - start <= 3 + SLACK
    assert rec.attack == "auto:ig" and len(rec) == 2 and rec.inputs.shape[1:] == (3, 32, 32)
    assert set(rec.routes) == {"ig"}
    _every_sample_explained(rec)
    assert all("exact route" in s.reason for s in rec.samples)
    assert "why:" in rec.summary()


def test_cnn_gradient_falls_back_to_ig(digits):
    x, y = digits.batch(1, seed=13)
    model = make_lenet(digits.input_shape, 10, activation="sigmoid", seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, update, attack="auto", iterations=20, progress=False)
    assert rec.attack == "auto:ig" and rec.iterations == 20
    assert any("not a ReLU network the exact attack reads" in n for n in rec.notes)
    assert "not a ReLU network" in rec.samples[0].reason


class _Residual(nn.Module):
    """A residual CNN: the network representation refuses it (two branches join)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        return self.fc((h + torch.relu(self.c2(h))).flatten(1))


def test_residual_model_goes_straight_to_optimisation(digits):
    x, y = digits.batch(2, seed=2)
    torch.manual_seed(0)
    model = _Residual()
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="auto", iterations=10,
                              progress=False)
    assert rec.attack == "auto:ig" and len(rec) == 2 and rec.inputs.shape[1:] == (1, 8, 8)
    assert any("exact route skipped" in n and "residual" in n for n in rec.notes)
    _every_sample_explained(rec)


# ---- the summary, the budget and bad input ------------------------------------------------------------------


def test_summary_never_says_nothing_rebuilt_without_why():
    empty = fedleak.Reconstruction(inputs=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                                   certified=torch.zeros(0, dtype=torch.bool), attack="x", batch_size=2,
                                   missing_reason="no exclusively activated neuron")
    assert "0 sample(s) rebuilt" in empty.summary() and "no exclusively activated neuron" in empty.summary()
    bare = fedleak.Reconstruction(inputs=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                                  certified=torch.zeros(0, dtype=torch.bool), attack="x")
    assert "why:" in bare.summary()


def test_a_time_limited_search_still_decays_its_learning_rate():
    from fedleak.attacks.inversion import RunClock, StepDecay

    with RunClock(0.3) as clock:
        clock.stage("search", 10_000)
        decay = StepDecay(10_000, clock)
        it = 0
        while not decay.finished(it):
            decay.update(it)
            time.sleep(0.005)
            it += 1
    assert it < 10_000 and decay.factor() == pytest.approx(1e-3)


def test_bad_options(digits):
    x, y = digits.batch(2, seed=14)
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    update = fedavg_update(model, x, y, lr=0.1)
    for bad in (0, -1.0, "60"):
        with pytest.raises(fedleak.FedleakError, match="budget"):
            fedleak.reconstruct(model, update, attack="auto", budget=bad)
    with pytest.raises(fedleak.FedleakError, match="progress"):
        fedleak.reconstruct(model, update, attack="auto", progress="yes")
    with pytest.raises(fedleak.FedleakError, match="unknown option"):
        fedleak.reconstruct(model, update, attack="auto", exclusivity_options={"group_tl": 1e-5})
    # a typo for the search is refused before any route runs, even where the exact route settles the batch
    gradient = fedleak.compute_gradient_update(model, x[:1], y[:1])
    assert fedleak.reconstruct(model, gradient, attack="auto", progress=False).attack == "auto:exclusivity"
    for typo, needle in [({"iteration": 5}, r"unknown auto option\(s\): \['iteration'\]"),
                         ({"iterations": -5}, "iterations .* must be at least 0")]:
        with pytest.raises(fedleak.FedleakError, match=needle):
            fedleak.reconstruct(model, gradient, attack="auto", progress=False, **typo)


def test_bad_weight_updates(digits):
    x, y = digits.batch(2, seed=14)
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    other = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    update = fedavg_update(other, x, y, lr=0.1)
    for attack in ("auto", "dlm", "dlm+", "ig", "dlg", "idlg"):
        with pytest.raises(fedleak.FedleakError, match="shape"):
            fedleak.reconstruct(model, update, attack=attack)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = {k: v + 0.01 for k, v in before.items()}
    with pytest.raises(fedleak.FedleakError, match="differ in keys"):
        fedleak.WeightUpdate(before=before, after={k: v for k, v in after.items() if k != "1.bias"})
    with pytest.raises(fedleak.FedleakError, match="zero"):
        fedleak.WeightUpdate(before=before, after={k: v.clone() for k, v in before.items()})
    foreign = {**before, "net.extra": torch.zeros(3)}
    with pytest.raises(fedleak.FedleakError, match="model does not have"):
        fedleak.reconstruct(model, fedleak.WeightUpdate(foreign, {k: v + 0.01 for k, v in foreign.items()}),
                            attack="dlm", iterations=1)
    renamed = {f"net.{k}": v for k, v in before.items()}  # saved from a class holding the network: read as its own
    rec = fedleak.reconstruct(model, fedleak.WeightUpdate(renamed, {k: v + 0.01 for k, v in renamed.items()}),
                              attack="dlm", iterations=1)
    assert any("names carry the prefix 'net.'" in note for note in rec.notes)
    with pytest.raises(fedleak.FedleakError, match="unknown option"):
        fedleak.reconstruct(model, fedavg_update(model, x, y, lr=0.1), attack="dlm", iteratoins=3)


def test_a_budget_too_short_for_one_step_returns_the_start_and_says_so(digits):
    """A multi-step update whose unrolled simulation outlasts the budget: no optimisation step is begun past
    the deadline, and every sample says it is the random starting point, not an optimised guess."""
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    update = fedleak.fedavg_update(model, digits.x[:64], digits.y[:64], lr=0.1, local_steps=4, batch_size=16,
                                   reveal_local_steps=True)
    rec = fedleak.reconstruct(model, update, attack="auto", budget=1e-3, progress=False)
    assert len(rec) == 64 and rec.num_certified == 0
    assert all("random starting point" in s.reason for s in rec.samples)
    assert any("stopped by the time budget after 0 iteration(s)" in n for n in rec.notes)


@pytest.mark.parametrize("how", ["float16", "autocast"])
def test_a_rounded_gradient_keeps_the_inputs_its_rows_give(fashion, how):
    """A batch's gradient sent in float16, or computed under autocast: auto holds the inputs the first layer's rows
    give to the update's rounding. Before, no rows agreed to float32's tolerance, and IG's estimates (13-20 dB on
    a float16 batch of 8) replaced exclusivity candidates within 1e-3 of the samples."""
    torch.manual_seed(0)
    model = DropoutMLP(784, 1024, 10).eval()
    x, y = fashion.batch(8, seed=0)
    grads = (mixed_precision_gradient(model, x, y, torch.bfloat16) if how == "autocast" else
             [g.half() for g in fedleak.compute_gradient_update(model, x, y).gradients.values()])
    update = fedleak.read_update(model, grads, num_examples=8)
    rec = fedleak.reconstruct(model, update, attack="auto", budget=5, progress=False)
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.attack == "auto:first-layer" and rec.num_certified == 0 and len(rec) == 8
    assert (scores.matched >= 0).all() and float(scores.psnr.min()) >= 50
    assert "values rounded to" in rec.notes[0]
