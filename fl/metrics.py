"""Image quality metrics (PSNR, SSIM) from torchmetrics.

One well-kept implementation, checked against scikit-image in the tests, rather
than a home-made formula: quality numbers are compared across papers and runs.
Images are float tensors ``(N, 3, H, W)`` in [0, 1]; both metrics are averaged
over images (per-image PSNR, then the mean), so one bad image cannot be hidden
by pooling errors across a batch.

torchmetrics is imported where a metric is computed, not at module level: its
package import pulls in matplotlib (about 1.5 s and 35 MB), and every deployed
ClientApp process imports this module through the tasks, while only evaluation
messages compute a metric (tests/clients/test_light_import.py).
"""

from __future__ import annotations

import torch


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-image PSNR in dB for images in [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    values = peak_signal_noise_ratio(
        pred.clamp(0, 1), target, data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    return float(values.mean())


# Gaussian window radius for sigma 1.5, truncated at 3.5 sigma (an 11x11 window).
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = int(3.5 * _SSIM_SIGMA + 0.5)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5) over the valid region, images in [0, 1].

    torchmetrics (1.9) averages its SSIM map over the *whole* image, including
    the border where the window reaches into reflect-padding; scikit-image and
    Wang et al. (2004) average only where the window fits. On faces with flat
    backgrounds the two differ by ~0.05, so we take torchmetrics' map and crop
    it to the valid region (checked against scikit-image in tests/test_metrics.py).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(
        pred.clamp(0, 1), target, data_range=1.0, sigma=_SSIM_SIGMA, return_full_image=True)
    r = _SSIM_RADIUS
    return float(full[..., r:-r, r:-r].mean())
