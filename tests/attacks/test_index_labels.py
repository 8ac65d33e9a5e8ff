"""OLIVE's sparsification side channel: labels from the indices a top-k client sends, on Fashion-MNIST."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from user_models import FlowerNet

import fedleak
from fedleak.attacks.index_labels import (
    IndexProfile,
    build_index_profile,
    infer_labels_from_indices,
    score_label_inference,
)
from fedleak.defenses.base import make_defense
from fedleak.errors import FedleakError, OptionError

BATCH = 8
BATCHES = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    """Many small gradients: one thread is much faster than two on a busy CPU (as conftest's ``one_thread``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(fashion):
    return fashion


def draw_batches(data, seed: int, count: int = BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of 8 with 1 to 3 distinct labels (each present at least once), seeded."""
    rng = np.random.default_rng(seed)
    labels = data.y.numpy()
    out = []
    for _ in range(count):
        distinct = int(rng.integers(1, 4))
        classes = rng.choice(10, distinct, replace=False)
        ys = np.concatenate([classes, rng.choice(classes, BATCH - distinct)])
        idx = [int(rng.choice(np.flatnonzero(labels == c))) for c in ys]
        out.append((data.x[idx], data.y[idx]))
    return out


def cifar_shaped(x: torch.Tensor) -> torch.Tensor:
    """28 x 28 grey images as the 3 x 32 x 32 inputs Flower's quickstart CNN takes (zero border, grey to RGB)."""
    return F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1)


def flower_net() -> FlowerNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return FlowerNet()


def topk_indices(update: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Global top-k by magnitude over the concatenated update, as flat positions per parameter (torch.topk)."""
    names = list(update)
    flat = torch.cat([update[n].flatten() for n in names]).abs()
    top = torch.topk(flat, math.ceil(ratio * flat.numel())).indices
    out, start = {}, 0
    for name in names:
        stop = start + update[name].numel()
        out[name] = top[(top >= start) & (top < stop)] - start
        start = stop
    return out


# ---------------------------------------------------------------------------------------------------------
# The rules' definitions


def test_output_layer_score_is_the_fraction_of_each_row_revealed() -> None:
    model = fedleak.make_mlp(6, [5], 4, seed=0)  # output layer: weight 4 x 5, bias 4
    indices = {"3.weight": torch.tensor([10, 11, 12, 13, 14, 5]), "3.bias": torch.tensor([2, 1])}
    result = infer_labels_from_indices(model, indices)
    # row 2: 5 weights + its bias of 6 entries; row 1: 1 weight + bias; row 0, 3: nothing
    assert result.scores == pytest.approx([0.0, 2 / 6, 6 / 6, 0.0])
    assert result.labels == (2,) and result.set_size == "largest-gap" and result.rule == "output-layer"
    assert infer_labels_from_indices(model, indices, num_labels=2).labels == (1, 2)


def test_a_sparse_update_reveals_its_nonzeros(data) -> None:
    model = fedleak.make_mlp((1, 28, 28), [256], 10, seed=0)
    x, y = data.x[:8], data.y[:8]
    update = fedleak.compute_gradient_update(model, x, y).gradients
    sent = make_defense("top-k", ratio=0.01).apply(update, None, torch.Generator())
    positions = {n: torch.nonzero(t.flatten()).flatten() for n, t in sent.items()}
    assert infer_labels_from_indices(model, sent) == infer_labels_from_indices(model, positions)


def test_profile_rule_fits_a_mixture_of_class_profiles() -> None:
    model = fedleak.make_mlp(6, [5], 4, seed=0)  # 30 + 5 + 20 + 4 = 59 positions; 3.weight starts at 35
    frequencies = torch.zeros(4, 59)
    for c in range(4):  # class c always sends its output-weight row, nothing else
        frequencies[c, 35 + 5 * c: 40 + 5 * c] = 1.0
    profile = IndexProfile(("1.weight", "1.bias", "3.weight", "3.bias"), (30, 5, 20, 4), frequencies, 5 / 59, 8, 4)
    rows_0_and_2 = {"3.weight": torch.tensor([0, 1, 2, 3, 4, 10, 11, 12, 13, 14])}
    result = infer_labels_from_indices(model, rows_0_and_2, profile=profile)
    assert result.labels == (0, 2) and result.set_size == "likelihood" and not result.notes
    assert min(result.scores[0], result.scores[2]) > 0 > max(result.scores[1], result.scores[3])
    assert set(infer_labels_from_indices(model, rows_0_and_2, profile=profile, num_labels=3).labels) > {0, 2}
    many = infer_labels_from_indices(model, {"1.weight": torch.arange(30)}, profile=profile)
    assert "30 positions revealed" in many.notes[0] and "ratio" in many.notes[0]


def test_no_output_layer_position_leaves_the_set_empty_and_says_why() -> None:
    model = fedleak.make_mlp(6, [5], 4, seed=0)
    result = infer_labels_from_indices(model, {"1.weight": torch.tensor([0, 3])})
    assert result.labels == () and "no position of the output layer" in result.notes[0]


# ---------------------------------------------------------------------------------------------------------
# Real data: far above a random guess of the same size


@pytest.fixture(scope="module")
def mlp_updates(data):
    """An untrained MLP and the updates of 16 batches of 8, with their label sets."""
    model = fedleak.make_mlp((1, 28, 28), [256], 10, seed=0)
    return model, [(fedleak.compute_gradient_update(model, x, y).gradients, sorted(set(y.tolist())))
                   for x, y in draw_batches(data, seed=0)]


def test_output_layer_rule_on_an_mlp(mlp_updates) -> None:
    model, updates = mlp_updates
    for ratio, least in ((0.01, 0.3), (0.1, 0.25)):
        predicted = [infer_labels_from_indices(model, topk_indices(u, ratio)).labels for u, _ in updates]
        s = score_label_inference(predicted, [labels for _, labels in updates], 10)
        # measured: exact 0.50 at 1 %, 0.38 at 10 %; a random guess of the same size 0.03
        assert s.exact >= least and s.exact >= s.random_exact + 0.25, (ratio, s)
        assert s.jaccard >= s.random_jaccard + 0.4 and s.presence >= s.random_presence + 0.25, (ratio, s)


def test_knowing_the_number_of_labels_helps(mlp_updates) -> None:
    model, updates = mlp_updates
    predicted = []
    for update, labels in updates:
        result = infer_labels_from_indices(model, topk_indices(update, 0.01), num_labels=len(labels))
        assert len(result.labels) == len(labels) and result.set_size == "given"
        predicted.append(result.labels)
    s = score_label_inference(predicted, [labels for _, labels in updates], 10)
    assert s.exact >= 0.6, s  # measured 0.81 (0.50 without num_labels)


def test_output_layer_rule_on_flowers_quickstart_cnn(data) -> None:
    model = flower_net()
    predicted: dict[float, list] = {0.01: [], 0.1: []}
    true = []
    for x, y in draw_batches(data, seed=1, count=12):
        update = fedleak.compute_gradient_update(model, cifar_shaped(x), y).gradients
        true.append(sorted(set(y.tolist())))
        for ratio, sets in predicted.items():
            sent = make_defense("top-k", ratio=ratio).apply(update, None, torch.Generator())  # a sparse update
            sets.append(infer_labels_from_indices(model, sent).labels)
    # measured: exact 0.83 at 1 %, 0.58 at 10 %; random 0.06
    for ratio, least in ((0.01, 0.5), (0.1, 0.25)):
        s = score_label_inference(predicted[ratio], true, 10)
        assert s.exact >= least and s.exact >= s.random_exact + 0.2, (ratio, s)


def test_profile_rule_reads_a_trained_network(data) -> None:
    """After training, a confusable absent class's output row is as large as the present one's: the data-free
    rule sizes the set wrong, the profile of public data does not."""
    model = fedleak.make_mlp((1, 28, 28), [256], 10, seed=0)
    public = fedleak.load_dataset("fashion-mnist-train")
    x_pub, y_pub = public.x[:6000], public.y[:6000]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randint(0, len(y_pub), (32,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x_pub[idx]), y_pub[idx]).backward()
        optimizer.step()
    profile = build_index_profile(model, x_pub, y_pub, 0.01, batches=6, seed=0)
    assert profile.frequencies.shape == (10, sum(p.numel() for p in model.parameters()))
    k = make_defense("top-k", ratio=0.01).kept(profile.frequencies.shape[1])
    assert torch.allclose(profile.frequencies.sum(1), torch.full((10,), float(k)))  # k positions per batch
    with_profile, data_free, true = [], [], []
    for x, y in draw_batches(data, seed=3):
        sent = make_defense("top-k", ratio=0.01).apply(fedleak.compute_gradient_update(model, x, y).gradients,
                                                       None, torch.Generator())
        result = infer_labels_from_indices(model, sent, profile=profile)
        assert result.rule == "profile" and result.set_size == "likelihood" and not result.notes
        assert all(result.scores[c] > 0 for c in result.labels)  # members: removing them costs likelihood
        with_profile.append(result.labels)
        data_free.append(infer_labels_from_indices(model, sent).labels)
        true.append(sorted(set(y.tolist())))
    s, base = score_label_inference(with_profile, true, 10), score_label_inference(data_free, true, 10)
    # measured: profile 0.50, output-layer rule 0.06, random 0.04
    assert s.exact >= 0.3 and s.exact >= s.random_exact + 0.25 and s.exact >= base.exact + 0.2, (s, base)


# ---------------------------------------------------------------------------------------------------------
# Scoring


def test_scores_by_hand() -> None:
    s = score_label_inference([[1, 2], [0]], [[1, 2], [0, 3]], 4)
    assert s.exact == 0.5 and s.jaccard == pytest.approx((1 + 0.5) / 2)
    # positives 4 (3 found), negatives 4 (4 rejected): balanced accuracy (3/4 + 1) / 2
    assert s.presence == pytest.approx(0.875)
    assert s.random_exact == pytest.approx((1 / math.comb(4, 2) + 0) / 2)


def test_random_baseline_matches_many_draws() -> None:
    rng = np.random.default_rng(0)
    predicted = [[0, 1, 2], [4], [1, 5], [0, 1, 2, 3, 4, 5]]
    true = [[2, 3, 4], [4], [0, 5], [1, 2]]
    exact = jaccard = 0.0
    tp = tn = 0
    draws = 5000
    for _ in range(draws):
        for p, t in zip(predicted, true):
            guess = set(rng.choice(6, len(p), replace=False).tolist())
            exact += guess == set(t)
            jaccard += len(guess & set(t)) / len(guess | set(t))
            tp += len(guess & set(t))
            tn += 6 - len(guess | set(t))
    s = score_label_inference(predicted, true, 6)
    n = draws * len(true)
    assert s.random_exact == pytest.approx(exact / n, abs=0.01)
    assert s.random_jaccard == pytest.approx(jaccard / n, abs=0.01)
    pos = sum(map(len, true))
    assert s.random_presence == pytest.approx((tp / draws / pos + tn / draws / (6 * 4 - pos)) / 2, abs=0.01)


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def small():
    return fedleak.make_mlp(6, [5], 4, seed=0)


@pytest.mark.parametrize("indices, words", [
    ({"3.weight": torch.tensor([3, 20])}, ["indices['3.weight']", "20", "[0, 19]"]),
    ({"3.weight": torch.tensor([-1])}, ["-1", "outside"]),
    ({"fc9.weight": torch.tensor([0])}, ["fc9.weight", "3.weight"]),
    ({}, ["non-empty"]),
    ({"3.weight": torch.tensor([], dtype=torch.long)}, ["no position", "3.weight"]),
    ({"3.weight": torch.zeros(4, 5)}, ["no position"]),
    ({"3.weight": torch.zeros(3, 5)}, ["shape (3, 5)", "(4, 5)"]),
    ({"3.weight": torch.tensor([True])}, ["dtype torch.bool"]),
    ({"3.weight": [1, 2]}, ["list"]),
    ([1, 2], ["mapping"]),
])
def test_bad_indices_are_refused_by_name(small, indices, words) -> None:
    with pytest.raises(OptionError) as err:
        infer_labels_from_indices(small, indices)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("num_labels", [0, 5, 1.5, "2"])
def test_bad_num_labels(small, num_labels) -> None:
    with pytest.raises(OptionError, match="num_labels"):
        infer_labels_from_indices(small, {"3.bias": torch.tensor([1])}, num_labels=num_labels)


def test_a_profile_of_another_model_is_refused(small) -> None:
    x, y = torch.rand(8, 6), torch.tensor([0, 1, 2, 3] * 2)
    profile = build_index_profile(fedleak.make_mlp(6, [7], 4, seed=0), x, y, 0.5, batch_size=2, batches=1)
    with pytest.raises(OptionError, match="profile was built for a model"):
        infer_labels_from_indices(small, {"3.bias": torch.tensor([1])}, profile=profile)


def test_an_inconsistent_profile_is_refused() -> None:
    with pytest.raises(OptionError, match=r"sum\(sizes\) = 9"):
        IndexProfile(("a", "b"), (4, 5), torch.zeros(3, 8), 0.1, 8, 4)
    with pytest.raises(OptionError, match=r"frequencies in \[0, 1\]"):
        IndexProfile(("a",), (4,), torch.full((3, 4), 2.0), 0.1, 8, 4)


@pytest.mark.parametrize("options, words", [
    ({"ratio": 0.0}, ["ratio", "(0, 1]"]),
    ({"ratio": 1.5}, ["ratio"]),
    ({"batch_size": 0}, ["batch_size"]),
    ({"batch_size": 3}, ["class", "batch_size=3"]),
    ({"batches": 0}, ["batches"]),
    ({"labels": torch.tensor([0, 1, 2, 9] * 2)}, ["public_y", "[0, 3]"]),
    ({"labels": torch.tensor([0, 1, 2, 3] * 3)}, ["public_x", "(8, 6)", "12"]),
])
def test_bad_profile_options(small, options, words) -> None:
    x, y = torch.rand(8, 6), options.pop("labels", torch.tensor([0, 1, 2, 3] * 2))
    with pytest.raises(FedleakError) as err:
        build_index_profile(small, x, y, options.pop("ratio", 0.5), **options)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("predicted, true, k, words", [
    ([[0]], [[0], [1]], 4, ["equally long"]),
    ([], [], 4, ["non-empty"]),
    ([[0, 7]], [[0]], 4, ["predicted label", "7"]),
    ([[0]], [[-1]], 4, ["true label"]),
    ([[0]], [[0]], 1, ["num_classes"]),
    (["ab"], [[0]], 4, ["collection of class indices"]),
])
def test_bad_scoring_input(predicted, true, k, words) -> None:
    with pytest.raises(OptionError) as err:
        score_label_inference(predicted, true, k)
    for word in words:
        assert word in str(err.value)


def test_every_set_size_is_possible_with_num_labels(small) -> None:
    indices = {"3.weight": torch.arange(20), "3.bias": torch.tensor([0])}
    for n in range(1, 5):
        assert len(infer_labels_from_indices(small, indices, num_labels=n).labels) == n
