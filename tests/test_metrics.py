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
    assert not scores.exact.any()  # 0.001 > 1e-4: nothing is exact ...
    assert scores.false_certificate.tolist() == scores.certified.tolist()  # ... so every certificate is false


def test_a_wrong_certified_sample_is_flagged(digits):
    x, y = digits.x[:2], digits.y[:2]
    rec = fedleak.Reconstruction(inputs=x.flip(0).clone(), labels=y.flip(0), certified=torch.tensor([True, True]),
                                 attack="test")
    rec.inputs[0] += 0.2
    scores = metrics.match(rec, x, y)
    assert scores.false_certificate.sum() == 1


def test_match_rejects_mismatched_shapes(digits):
    with pytest.raises(fedleak.FedleakError, match="values per sample"):
        metrics.match(torch.zeros(2, 10), digits.x[:2])


def test_certified_samples_are_matched_before_uncertified_blends(digits):
    """A blend of two originals must not take a certified sample's original away from it."""
    a, b = digits.x[0], digits.x[1]
    blend = 0.55 * a + 0.45 * b
    rec = fedleak.Reconstruction(inputs=torch.stack([a, blend]), labels=digits.y[:2],
                                 certified=torch.tensor([True, False]), attack="test")
    scores = metrics.match(rec, torch.stack([a, b]), digits.y[:2])
    assert scores.matched.tolist() == [0, 1]
    assert scores.exact.tolist() == [True, False] and not scores.false_certificate.any()
