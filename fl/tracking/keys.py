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
PHOTO_EPS_P95 = "privacy/photo_eps_p95"
PHOTO_DELTA = "privacy/photo_delta"
USER_EPS = "privacy/user_eps"
USER_DELTA = "privacy/user_delta"
USER_NOISE_MULTIPLIER = "privacy/user_noise_multiplier"
# A simulated cohort (privacy.user.simulated_*) is reported under its own keys,
# never mixed with the real run's accounting above.
SIM_USER_EPS = "privacy/simulated_user_eps"
SIM_USER_DELTA = "privacy/simulated_user_delta"
SIM_USER_NOISE_MULTIPLIER = "privacy/simulated_user_noise_multiplier"

DEVICES_SAMPLED = "fleet/devices_sampled"
DEVICES_TRAINED = "fleet/devices_trained"
DEVICES_FAILED = "fleet/devices_failed"
DEVICES_BUDGET_EXHAUSTED = "fleet/devices_budget_exhausted"
UPDATE_CLIP_FRACTION = "fleet/update_clip_fraction"
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
