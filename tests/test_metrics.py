import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

import fedleak
from fedleak import metrics


def test_psnr_standard_definition_and_cap():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    p = metrics.psnr(a, b)
    assert p[0].item() == pytest.approx(20.0)
    assert p[1].item() == metrics.PSNR_CAP


def test_ssim_matches_scikit_image_gaussian_ssim(fashion):
    a = fashion.x[:3].double()
    b = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).clamp(0, 1)
    ours = metrics.ssim(a, b).numpy()
    ref = [
        structural_similarity(a[i, 0].numpy(), b[i, 0].numpy(), data_range=1.0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
        for i in range(3)
    ]
    assert np.allclose(ours, ref, atol=2e-3)
    assert metrics.ssim(a, a).numpy() == pytest.approx(1.0)


def test_match_undoes_a_permutation_and_scores_every_original(digits):
    x, y = digits.x[:6], digits.y[:6]
    perm = torch.tensor([3, 0, 5, 1, 4])  # one original (2) is missing
    rec = fedleak.Reconstruction(
        inputs=x[perm] + 0.001, labels=y[perm], certified=torch.tensor([True, False, True, True, True]),
        attack="test",
    )
    scores = metrics.match(rec, x, y)
    assert scores.matched.tolist() == [1, 3, -1, 0, 4, 2]
    assert np.isnan(scores.psnr[2]) and not scores.recovered[2]
    assert scores.label_accuracy == pytest.approx(5 / 6)
    assert np.allclose(scores.max_abs_error[[0, 1, 3, 4, 5]], 0.001, atol=1e-6)
    assert scores.certified.tolist() == [False, True, False, True, True, True]
    assert scores.data_range == (0.0, 1.0) and scores.exact_tol == pytest.approx(1e-4)
    assert not scores.exact.any()  # 0.001 > 1e-4: nothing is exact ...
    assert scores.n_certified == 4 and scores.false_certificates == 4  # ... so every certificate is false
    assert scores.certified_index.tolist() == [0, 2, 3, 4] and scores.certified_original.tolist() == [-1] * 4
    assert scores.false_certificate.tolist() == [True] * 4
    assert np.allclose(scores.certified_error, 0.001, atol=1e-6)
    assert scores.certified_nearest.tolist() == [3, 5, 1, 4]


def test_a_wrong_certified_sample_is_flagged(digits):
    x, y = digits.x[:2], digits.y[:2]
    rec = fedleak.Reconstruction(inputs=x.flip(0).clone(), labels=y.flip(0), certified=torch.tensor([True, True]),
                                 attack="test")
    rec.inputs[0] += 0.2
    scores = metrics.match(rec, x, y)
    assert scores.false_certificate.sum() == 1 == scores.false_certificates
    assert scores.certified_false.tolist() == [True, False] and "matches no original" in scores.certified_reason[0]


def test_match_rejects_mismatched_shapes(digits):
    with pytest.raises(fedleak.FedleakError, match="values per sample"):
        metrics.match(torch.zeros(2, 10), digits.x[:2])
    normalised = digits.normalized(0.5, 0.5)  # checked before the normalisation is inverted, not after
    with pytest.raises(fedleak.FedleakError, match="3072 values per sample but originals have 64"):
        metrics.match(torch.zeros(2, 3, 32, 32), normalised)


def test_integer_originals_are_refused_not_scored_as_nothing_recovered(digits):
    """8-bit originals against a reconstruction of the model's [0, 1] inputs read as 0 recovered; refused instead,
    saying how to pass them (as tensors and as numpy arrays)."""
    as_bytes = (digits.x[:2] * 255).round().to(torch.uint8)
    x = as_bytes.float() / 255
    for originals in (as_bytes, as_bytes.numpy()):
        with pytest.raises(fedleak.FedleakError, match=r"originals are uint8 values: .*x.float\(\) / 255"):
            metrics.match(x, originals)
    assert metrics.match(x, as_bytes.float() / 255).exact.all()


def test_certified_samples_are_matched_before_uncertified_blends(digits):
    """A blend of two originals must not take a certified sample's original away from it."""
    a, b = digits.x[0], digits.x[1]
    blend = 0.55 * a + 0.45 * b
    rec = fedleak.Reconstruction(inputs=torch.stack([a, blend]), labels=digits.y[:2],
                                 certified=torch.tensor([True, False]), attack="test")
    scores = metrics.match(rec, torch.stack([a, b]), digits.y[:2])
    assert scores.matched.tolist() == [0, 1]
    assert scores.exact.tolist() == [True, False] and not scores.false_certificate.any()
    assert scores.false_certificates == 0 and scores.recovered.tolist() == [True, False]


# --- every certified reconstruction is checked, not only one per original -------------------------------------


def _rec(inputs, labels, certified):
    return fedleak.Reconstruction(inputs=torch.stack(list(inputs)) if isinstance(inputs, (list, tuple)) else inputs,
                                  labels=torch.as_tensor(labels), certified=torch.as_tensor(certified), attack="test")


def _consistent(scores):
    """Each certified reconstruction is either credited with exactly one original or a false certificate."""
    assert int(scores.recovered.sum()) + scores.false_certificates == scores.n_certified
    assert scores.false_certificates == int(scores.certified_false.sum()) == int(scores.false_certificate.sum())
    credited = scores.certified_original[scores.certified_original >= 0]
    assert len(set(credited.tolist())) == len(credited)
    assert all(bool(r) == bool(f) for r, f in zip(scores.certified_reason, scores.certified_false))


@pytest.mark.parametrize("blend_first", [False, True])
def test_a_certified_blend_beyond_the_batch_is_a_false_certificate(digits, blend_first):
    """The issue's case: 4 certified for a batch of 3, one a blend. One-per-original pairing leaves the blend
    unmatched; it must still be counted."""
    x, y = digits.x[:3], digits.y[:3]
    blend = 0.55 * x[0] + 0.45 * x[1]
    inputs, labels = [x[0], x[1], x[2], blend], [y[0], y[1], y[2], y[0]]
    if blend_first:
        inputs, labels = inputs[::-1], labels[::-1]
    scores = metrics.match(_rec(inputs, torch.stack(labels), [True] * 4), x, y)
    _consistent(scores)
    assert scores.recovered_fraction == 1.0  # the three true samples are recovered ...
    assert scores.n_certified == 4 and scores.false_certificates == 1  # ... and the blend is a false certificate
    k = 0 if blend_first else 3
    assert scores.certified_false.tolist() == [i == k for i in range(4)]
    assert scores.certified_index[k] == k and scores.certified_nearest[k] in (0, 1)
    expected = float((blend - x[int(scores.certified_nearest[k])]).abs().max())
    assert scores.certified_error[k] == pytest.approx(expected) and expected > 0.05
    assert "matches no original" in scores.certified_reason[k] and scores.false_reasons()[0][0] == k
    d = scores.to_dict()
    assert d["false_certificates"] == 1 and d["n_certified"] == 4 and d["certified_false"][k] is True
    assert d["data_range"] == [0.0, 1.0] and len(d["certified_reason"]) == 4


def test_a_blend_certified_inside_the_batch_is_a_false_certificate_and_does_not_steal(digits):
    """3 certified for a batch of 3 where one is a blend: the blend is false; the true samples stay recovered."""
    x, y = digits.x[:3], digits.y[:3]
    blend = 0.5 * x[0] + 0.5 * x[1]
    scores = metrics.match(_rec([blend, x[0], x[1]], [y[0], y[0], y[1]], [True] * 3), x, y)
    _consistent(scores)
    assert scores.recovered.tolist() == [True, True, False] and scores.false_certificates == 1
    assert scores.certified_false.tolist() == [True, False, False] and scores.matched[2] == 0


def test_a_second_certified_copy_is_a_false_certificate(digits):
    x, y = digits.x[:3], digits.y[:3]
    scores = metrics.match(_rec([x[0], x[1], x[0] + 1e-6], y[[0, 1, 0]], [True] * 3), x, y)
    _consistent(scores)
    assert scores.false_certificates == 1 and scores.recovered.tolist() == [True, True, False]
    (k,) = np.nonzero(scores.certified_false)[0]
    assert scores.certified_nearest[k] == 0 and scores.certified_error[k] <= scores.exact_tol
    assert "second certified copy of original #0" in scores.certified_reason[k]
    # an uncertified copy is no certificate at all
    scores = metrics.match(_rec([x[0], x[1], x[0]], y[[0, 1, 0]], [True, True, False]), x, y)
    assert scores.false_certificates == 0 and scores.n_certified == 2


def test_duplicate_originals_may_each_be_certified(digits):
    """A batch may hold the same image twice: two certified copies then match two originals."""
    x = digits.x[[0, 1, 0]]
    y = digits.y[[0, 1, 0]]
    scores = metrics.match(_rec(x.flip(0), y.flip(0), [True] * 3), x, y)
    _consistent(scores)
    assert scores.false_certificates == 0 and scores.recovered_fraction == 1.0


def test_a_certified_sample_with_the_wrong_label_is_a_false_certificate(digits):
    x, y = digits.x[:2], digits.y[:2]
    wrong = (y[0] + 1) % 10
    scores = metrics.match(_rec([x[0], x[1]], [wrong, y[1]], [True, True]), x, y)
    _consistent(scores)
    assert scores.false_certificates == 1 and scores.recovered.tolist() == [False, True]
    assert scores.certified_false.tolist() == [True, False]
    assert scores.certified_error[0] == 0 and "wrong label" in scores.certified_reason[0]
    # a wrong label cannot be credited with another original either (its pixels match no other)
    assert scores.certified_original.tolist() == [-1, 1]


def test_more_certified_than_originals_are_all_counted(digits):
    x, y = digits.x[:2], digits.y[:2]
    extra = [digits.x[5], digits.x[6], digits.x[7]]
    scores = metrics.match(_rec([x[0], x[1], *extra], torch.cat([y, digits.y[5:8]]), [True] * 5), x, y)
    _consistent(scores)
    assert scores.recovered_fraction == 1.0 and scores.false_certificates == 3


def test_a_certified_reconstruction_with_nan_is_a_false_certificate(digits):
    x, y = digits.x[:2], digits.y[:2]
    bad = x[1].clone()
    bad[0, 0, 0] = float("nan")
    scores = metrics.match(_rec([x[0], bad], y, [True, True]), x, y)
    _consistent(scores)
    assert scores.false_certificates == 1 and scores.certified_false.tolist() == [False, True]


# --- the data's own range: no clamping, no assumed [0, 1] ----------------------------------------------------


def test_no_clamping_of_reconstructions(digits):
    """A reconstruction outside [0, 1] of [0, 1] data is scored by its true error (clamping would hide it)."""
    x, y = digits.x[:2].clone(), digits.y[:2]
    assert float(x[0].min()) == 0.0
    r = x.clone()
    r[0][x[0] == 0] = -0.5  # clamped to [0, 1] this is a perfect copy
    scores = metrics.match(_rec(r, y, [True, True]), x, y, data_range=(0.0, 1.0))
    _consistent(scores)
    assert scores.max_abs_error[0] == pytest.approx(0.5) and scores.false_certificates == 1
    assert scores.psnr[0] < 20 and scores.recovered.tolist() == [False, True]


@pytest.mark.parametrize("err, exact", [(1.5e-4, True), (2.5e-4, False)])
def test_data_in_minus_one_to_one(digits, err, exact):
    """On [-1, 1] data the tolerance is 1e-4 x 2 = 2e-4 and PSNR uses data range 2."""
    x, y = 2 * digits.x[:4].double() - 1, digits.y[:4]
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    scores = metrics.match(_rec(x + err, y, [True] * 4), x, y)
    _consistent(scores)
    assert scores.data_range == (-1.0, 1.0) and scores.exact_tol == pytest.approx(2e-4)
    assert scores.recovered_fraction == (1.0 if exact else 0.0) and scores.false_certificates == (0 if exact else 4)
    assert np.allclose(scores.max_abs_error, err)
    assert np.allclose(scores.psnr, 10 * np.log10(4 / err**2))
    # PSNR on the range: an error of 0.02 everywhere is 10 log10(2^2 / 0.02^2) = 40 dB (34 dB with range 1)
    assert metrics.match(_rec(x - 0.02, y, [False] * 4), x, y).mean_psnr() == pytest.approx(40.0)


@pytest.mark.parametrize("err, exact", [(6e-3, True), (0.02, True), (0.03, False)])
def test_data_in_0_to_255(digits, err, exact):
    """Raw 0..255 pixels: the tolerance is 1e-4 x 255 = 0.0255 in pixel units."""
    x, y = torch.round(255 * digits.x[:4].double()), digits.y[:4]
    assert float(x.min()) == 0.0 and float(x.max()) == 255.0
    scores = metrics.match(_rec(x + err, y, [True] * 4), x, y)
    _consistent(scores)
    assert scores.data_range == (0.0, 255.0) and scores.exact_tol == pytest.approx(0.0255)
    assert scores.recovered.tolist() == [exact] * 4
    assert scores.false_certificates == (0 if exact else 4)
    assert np.allclose(scores.psnr, 10 * np.log10(255**2 / err**2))
    one_level = metrics.match(_rec(x + 1, y, [True] * 4), x, y)  # one grey level off everywhere
    assert np.allclose(one_level.psnr, 20 * np.log10(255)) and one_level.false_certificates == 4
    assert np.allclose(one_level.ssim, metrics.ssim(x, x + 1, 255.0).numpy())


def test_normalised_data_takes_the_range_from_the_dataset(digits):
    """Mean/std normalised data: the Dataset's value_range (not the batch's min/max) sets the tolerance."""
    mean, std = 0.5, 0.25
    xn = (digits.x - mean) / std
    data = fedleak.Dataset("digits-normalised", xn, digits.y, digits.classes, value_range=(-2.0, 2.0))
    x = 0.5 * xn[:3]  # a batch whose pixels span only [-1, 1]
    rec = _rec(x + 3e-4, digits.y[:3], [True] * 3)
    from_batch = metrics.match(rec, x, digits.y[:3])  # width 2: tolerance 2e-4 < 3e-4
    assert from_batch.data_range == (-1.0, 1.0) and from_batch.false_certificates == 3
    sub = fedleak.Dataset("batch", x, digits.y[:3], digits.classes, value_range=data.value_range)
    from_data = metrics.match(rec, sub)  # width 4: tolerance 4e-4 > 3e-4; labels from the Dataset
    assert from_data.data_range == (-2.0, 2.0) and from_data.recovered_fraction == 1.0
    assert from_data.false_certificates == 0 and from_data.label_accuracy == 1.0
    explicit = metrics.match(rec, x, digits.y[:3], data_range=data.value_range)
    assert explicit.recovered_fraction == 1.0 and np.allclose(explicit.psnr, 10 * np.log10(16 / 9e-8))


def test_data_range_option_is_checked(digits):
    x = digits.x[:2]
    for bad in [(1.0, 0.0), (0.0, float("inf")), (0.0,), "ab"]:
        with pytest.raises(fedleak.FedleakError, match="data_range"):
            metrics.match(x, x, data_range=bad)
    # a constant batch still gets a positive tolerance
    flat = torch.full((2, 1, 4, 4), 3.0)
    scores = metrics.match(_rec(flat, [0, 1], [True, True]), flat, torch.tensor([0, 1]))
    assert scores.data_range == (3.0, 6.0) and scores.recovered_fraction == 1.0


def test_dataset_value_range():
    x, y = torch.rand(4, 1, 2, 2) * 255, torch.tensor([0, 1, 0, 1])
    data = fedleak.Dataset("raw", x, y, ("a", "b"), value_range=(0, 255))
    assert data.value_range == (0.0, 255.0)
    assert fedleak.Dataset("unit", x / 255, y, ("a", "b")).value_range == (0.0, 1.0)
    with pytest.raises(fedleak.DataError, match="value range"):
        fedleak.Dataset("raw", x, y, ("a", "b"))  # 0..255 pixels outside the default [0, 1]
    for bad in [(1, 0), (0, float("nan")), (0, 1, 2), None]:
        with pytest.raises(fedleak.DataError, match="value_range"):
            fedleak.Dataset("raw", x, y, ("a", "b"), value_range=bad)


def test_builtin_loaders_declare_their_range(digits):
    assert digits.value_range == (0.0, 1.0)
    assert float(digits.x.min()) >= 0.0 and float(digits.x.max()) <= 1.0


def test_an_empty_reconstruction_scores_nothing(digits):
    x, y = digits.x[:3], digits.y[:3]
    empty = _rec(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    scores = metrics.match(empty, x, y)
    assert scores.matched.tolist() == [-1] * 3 and scores.n_certified == 0 == scores.false_certificates
    assert scores.recovered_fraction == 0.0 and scores.to_dict()["certified_reason"] == []


def test_a_certificate_is_held_to_the_error_bound_it_states():
    from fedleak.reconstruction import Reconstruction, SampleRecovery

    x = torch.rand(3, 1, 4, 4)
    y = torch.tensor([0, 1, 2])
    off = torch.tensor([5e-4, 5e-3, 0.0]).view(3, 1, 1, 1)
    samples = (SampleRecovery(0, True, "", error_bound=1e-3), SampleRecovery(1, True, "", error_bound=1e-3),
               SampleRecovery(2, True, ""))
    rec = Reconstruction(x + off, y, torch.ones(3, dtype=torch.bool), "test", samples)
    m = fedleak.metrics.match(rec, x, y, data_range=(0.0, 1.0))
    # within its claim but not exact: recovered (the claim holds), not exact; beyond its claim: false
    assert m.recovered.tolist() == [True, False, True] and m.exact.tolist() == [False, False, True]
    assert m.false_certificates == 1 and "claimed error bound" in m.certified_reason[1]
    assert m.allowed_error.tolist() == pytest.approx([1e-3, 1e-3, 1e-4])


@pytest.mark.parametrize("mean, std", [((0.5,), (0.5,)), ((0.1307,), (0.3081,))])
def test_exact_attack_on_normalised_data_is_scored_right(digits, mean, std):
    # Flower's quickstart maps pixels to [-1, 1]; MNIST-style mean/std normalisation gives [-0.42, 2.82]
    data = digits.normalized(mean, std)
    model = fedleak.make_mlp(data.input_shape, [256], 10, seed=0)
    x, y = data.batch(8, seed=3)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="exclusivity")
    assert rec.num_certified >= 4
    scores = fedleak.metrics.match(rec, x, y, normalization=data.normalization)
    assert scores.data_range == (0.0, 1.0) and scores.false_certificates == 0
    assert int(scores.recovered.sum()) == rec.num_certified
    assert np.all(scores.psnr[scores.recovered] > 80)
    # the same batch scored in the model's input space agrees on what was recovered
    raw = fedleak.metrics.match(rec, x, y, data_range=data.value_range)
    assert raw.recovered.tolist() == scores.recovered.tolist()
    # a Dataset that remembers its normalisation is scored in pixel space without being told
    sub = fedleak.Dataset("batch", x, y, data.classes, value_range=data.value_range, normalization=data.normalization)
    np.testing.assert_array_equal(fedleak.metrics.match(rec, sub).psnr, scores.psnr)


def test_samples_found_but_not_rebuilt_are_never_paired():
    """A row of zeros the attack did not rebuild must not be scored as a (poor) reconstruction."""
    from fedleak.reconstruction import Reconstruction, SampleRecovery

    originals = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    inputs = torch.stack([originals[0] + 0.01, torch.zeros(1, 4, 4)])
    samples = (SampleRecovery(0, False, "optimised", route="ig"),
               SampleRecovery(1, False, "underdetermined conv block", route="exclusivity (uncertified)",
                              rebuilt=False))
    rec = Reconstruction(inputs, torch.tensor([0, 1]), torch.tensor([False, False]), "x", samples)
    m = fedleak.metrics.match(rec, originals, torch.tensor([0, 1]), data_range=(0.0, 1.0))
    assert m.matched.tolist() == [0, -1] and np.isnan(m.psnr[1])


def test_samples_none_of_them_rebuilt_score_nothing():
    """Every sample found and none rebuilt (an attack's conv layers underdetermined, no fallback): nothing is paired
    (match raised torch's reshape error on the empty pairing)."""
    from fedleak.reconstruction import Reconstruction, SampleRecovery

    originals = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    samples = tuple(SampleRecovery(k, False, "underdetermined conv block", rebuilt=False) for k in range(2))
    rec = Reconstruction(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), torch.tensor([False, False]), "x", samples)
    m = fedleak.metrics.match(rec, originals, torch.tensor([0, 1]), data_range=(0.0, 1.0))
    assert m.matched.tolist() == [-1, -1] and np.isnan(m.psnr).all() and m.false_certificates == 0
    assert m.recovered_fraction == 0.0


def test_soft_labels_are_scored_as_their_top_class(digits):
    """What a MixUp client trains on (soft labels): match takes them as the evaluation does (it raised numpy's
    broadcast error)."""
    import fedleak

    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    x, y = digits.batch(4, seed=2)
    sent = fedleak.defended_gradient(model, x, y, "mixup", seed=0)
    assert sent.labels.ndim == 2
    rec = fedleak.reconstruct(model, sent.update)
    soft = fedleak.metrics.match(rec, sent.inputs, sent.labels, data_range=digits.value_range)
    hard = fedleak.metrics.match(rec, sent.inputs, sent.labels.argmax(1), data_range=digits.value_range)
    assert soft.false_certificates == hard.false_certificates == 0
    assert (soft.recovered == hard.recovered).all() and soft.label_accuracy == hard.label_accuracy


def test_a_near_copy_is_never_given_up_for_a_smaller_total_mse():
    """Uncertified reconstructions: r0 is an exact copy of o0, r1 is far from both originals. The least total MSE
    pairs o0 with r1 and o1 with r0 (0.25 + 0.25 < 0 + 1) and reported o0 rebuilt at 6 dB; near copies come first."""
    o = torch.stack([torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), 1.0)])
    r = torch.stack([o[0].clone(), torch.zeros(1, 4, 4)])
    scores = metrics.match(r, o, data_range=(0.0, 1.0))
    assert scores.matched.tolist() == [0, 1] and scores.psnr[0] == metrics.PSNR_CAP and bool(scores.exact[0])
