"""MLflow metric keys: a public contract (documented in README; change only with
a CHANGELOG note). Researchers' dashboards and sweeps read these names."""

TRAIN_LOSS = "train/loss"

SWAP_PSNR = "quality/swap_psnr"
SWAP_SSIM = "quality/swap_ssim"
SWAP_PSNR_BASELINE_CLIP = "quality/swap_psnr_baseline_clip"
SWAP_PSNR_BASELINE_MEAN = "quality/swap_psnr_baseline_mean"
RECON_PSNR = "quality/recon_psnr"
NEWUSER_SWAP_PSNR = "quality/newuser_swap_psnr"

PHOTO_EPS_MAX = "privacy/photo_eps_max"
PHOTO_EPS_MEAN = "privacy/photo_eps_mean"
PHOTO_DELTA = "privacy/photo_delta"

DEVICES_TRAINED = "fleet/devices_trained"
DEVICES_FAILED = "fleet/devices_failed"
DEVICES_BUDGET_EXHAUSTED = "fleet/devices_budget_exhausted"
DEVICES_EVALUATED_PERSONALISED = "fleet/eval_devices_personalised"
ROUND_SECONDS = "fleet/round_seconds"

# Device-side evaluation names (fl.tasks) -> MLflow keys.
QUALITY = {
    "swap_psnr": SWAP_PSNR,
    "swap_ssim": SWAP_SSIM,
    "swap_psnr_baseline_clip": SWAP_PSNR_BASELINE_CLIP,
    "swap_psnr_baseline_mean": SWAP_PSNR_BASELINE_MEAN,
    "recon_psnr": RECON_PSNR,
}
