"""PSNR/SSIM from torchmetrics, checked once against scikit-image."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fl.data.synthfaces import Attributes, Identity, render
from fl.metrics import psnr, ssim


@pytest.fixture()
def pair():
    clean = render(Identity.sample(0, 1), [Attributes.sample(0, 1, k).replace(noise_sigma=0.0)
                                           for k in range(3)], 64)
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, 0.05, clean.shape), 0, 1).astype(np.float32)
    return torch.from_numpy(noisy), torch.from_numpy(clean)


def test_psnr_matches_scikit_image(pair):
    pred, target = pair
    expected = np.mean([peak_signal_noise_ratio(t.numpy(), p.numpy(), data_range=1.0)
                        for p, t in zip(pred, target)])
    assert psnr(pred, target) == pytest.approx(expected, abs=1e-3)


def test_ssim_matches_scikit_image(pair):
    pred, target = pair
    expected = np.mean([
        structural_similarity(t.numpy(), p.numpy(), data_range=1.0, channel_axis=0,
                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for p, t in zip(pred, target)])
    assert ssim(pred, target) == pytest.approx(expected, abs=2e-3)


def test_identical_images_score_perfectly(pair):
    _, target = pair
    assert ssim(target, target) == pytest.approx(1.0, abs=1e-6)
    assert psnr(target, target) > 60
