"""MLflow metric keys: a public contract (documented in README; change only with
a CHANGELOG note). Researchers' dashboards and sweeps read these names."""

TRAIN_LOSS = "train/loss"

SWAP_PSNR = "quality/swap_psnr"
SWAP_SSIM = "quality/swap_ssim"
SWAP_PSNR_BASELINE_CLIP = "quality/swap_psnr_baseline_clip"
SWAP_PSNR_BASELINE_MEAN = "quality/swap_psnr_baseline_mean"
RECON_PSNR = "quality/recon_psnr"
NEWUSER_SWAP_PSNR = "quality/newuser_swap_psnr"
PORTRAIT_PSNR = "quality/portrait_psnr"
PORTRAIT_SSIM = "quality/portrait_ssim"
PORTRAIT_PSNR_BASELINE_MEAN = "quality/portrait_psnr_baseline_mean"
PORTRAIT_HELDOUT_PSNR = "quality/portrait_heldout_psnr"
NEWUSER_PORTRAIT_PSNR = "quality/newuser_portrait_psnr"
# Face metrics from the attribute network (fl.face_metrics): whose face, which pose.
SWAP_ID_ACCURACY = "quality/swap_id_accuracy"
SWAP_POSE_ERROR = "quality/swap_pose_error"
PORTRAIT_ID_ACCURACY = "quality/portrait_id_accuracy"
PORTRAIT_CONTROL_ERROR = "quality/portrait_control_error"
# The blur baseline: the ground truth under a Gaussian blur of about the 0.6 models' PSNR.
SWAP_PSNR_BASELINE_BLUR = "quality/swap_psnr_baseline_blur"
SWAP_ID_ACCURACY_BASELINE_BLUR = "quality/swap_id_accuracy_baseline_blur"
SWAP_POSE_ERROR_BASELINE_BLUR = "quality/swap_pose_error_baseline_blur"
PORTRAIT_PSNR_BASELINE_BLUR = "quality/portrait_psnr_baseline_blur"
PORTRAIT_ID_ACCURACY_BASELINE_BLUR = "quality/portrait_id_accuracy_baseline_blur"
PORTRAIT_CONTROL_ERROR_BASELINE_BLUR = "quality/portrait_control_error_baseline_blur"

PHOTO_EPS_MAX = "privacy/photo_eps_max"
PHOTO_EPS_MEAN = "privacy/photo_eps_mean"
PHOTO_EPS_P95 = "privacy/photo_eps_p95"
PHOTO_DELTA = "privacy/photo_delta"
USER_EPS = "privacy/user_eps"
USER_DELTA = "privacy/user_delta"
USER_NOISE_MULTIPLIER = "privacy/user_noise_multiplier"
# privacy.user.noise_at=devices: the noise multiplier the round's survivors' noise
# delivered, sigma * sqrt(survivors / threshold) >= the accounted sigma
USER_NOISE_DELIVERED = "privacy/user_noise_delivered"
# A simulated cohort (privacy.user.simulated_*) is reported under its own keys,
# never mixed with the real run's accounting above.
SIM_USER_EPS = "privacy/simulated_user_eps"
SIM_USER_DELTA = "privacy/simulated_user_delta"
SIM_USER_NOISE_MULTIPLIER = "privacy/simulated_user_noise_multiplier"

DEVICES_SAMPLED = "fleet/devices_sampled"
DEVICES_TRAINED = "fleet/devices_trained"
DEVICES_FAILED = "fleet/devices_failed"  # errors and no reply by the timeout
DEVICES_REJECTED = "fleet/devices_rejected"  # replies or updates that failed validation
DEVICES_BUDGET_EXHAUSTED = "fleet/devices_budget_exhausted"
DEVICES_UNAVAILABLE = "fleet/devices_unavailable"  # paused after fleet.unavailable_after misses
DEVICES_ABSENT = "fleet/devices_absent"  # missed this session's roll call
UPDATE_CLIP_FRACTION = "fleet/update_clip_fraction"
# aggregation.secure: 1 for a round whose SecAgg+ could not finish (too few devices left
# for the threshold of shares, a sum that does not decode; nothing was released), else 0
SECAGG_ABANDONED = "fleet/secagg_abandoned"
DEVICES_EVALUATED_PERSONALISED = "fleet/eval_devices_personalised"
ROUND_SECONDS = "fleet/round_seconds"  # wall time of the round (train, aggregate, evaluate)
UPDATES_PER_SECOND = "fleet/updates_per_second"  # device updates received / training wall time

# Empirical privacy audit (python -m experiments.audit, tracking.audit=true): the
# observed lower bound beside the theoretical epsilon, both at tracking.audit_delta.
AUDIT_PHOTO_EPS_LOWER = "audit/photo_eps_lower"
AUDIT_PHOTO_EPS_THEORY = "audit/photo_eps_theory"
AUDIT_USER_EPS_LOWER = "audit/user_eps_lower"  # the canary-device estimate
AUDIT_USER_EPS_THEORY = "audit/user_eps_theory"
AUDIT_CANARIES = "audit/canaries"  # canary photos audited
AUDIT_CORRECT_GUESSES = "audit/correct_guesses"
AUDIT_INVERSION_PSNR = "audit/inversion_psnr"
AUDIT_INVERSION_SSIM = "audit/inversion_ssim"
AUDIT_MEAN_FACE_PSNR = "audit/mean_face_psnr"
AUDIT_VIOLATION = "audit/violation"  # 1: an observed bound exceeds its theory

# Consent and data (sums over what devices last reported; never which photos).
CONSENT_PHOTOS_USED = "consent/photos_used"  # photos that trained this round
CONSENT_PHOTOS_REVOKED = "consent/photos_revoked"  # consent given, then revoked or expired
CONSENT_DEVICES_OPTED_OUT = "consent/devices_opted_out"  # deleted their data or consent none
DATA_PHOTOS_SKIPPED = "data/photos_skipped"  # unusable files (corrupt, not images, tiny...)
DATA_PHOTOS_CONVERTED = "data/photos_converted"  # greyscale/CMYK/alpha converted to RGB
DATA_DEVICES_EXCLUDED = "data/devices_excluded"  # too few usable photos to take part

# Device-side evaluation names (fl.tasks) -> MLflow keys.
QUALITY = {
    "swap_psnr": SWAP_PSNR,
    "swap_ssim": SWAP_SSIM,
    "swap_psnr_baseline_clip": SWAP_PSNR_BASELINE_CLIP,
    "swap_psnr_baseline_mean": SWAP_PSNR_BASELINE_MEAN,
    "recon_psnr": RECON_PSNR,
    "portrait_psnr": PORTRAIT_PSNR,
    "portrait_ssim": PORTRAIT_SSIM,
    "portrait_psnr_baseline_mean": PORTRAIT_PSNR_BASELINE_MEAN,
    "portrait_heldout_psnr": PORTRAIT_HELDOUT_PSNR,
    "swap_id_accuracy": SWAP_ID_ACCURACY,
    "swap_pose_error": SWAP_POSE_ERROR,
    "portrait_id_accuracy": PORTRAIT_ID_ACCURACY,
    "portrait_control_error": PORTRAIT_CONTROL_ERROR,
    "swap_psnr_baseline_blur": SWAP_PSNR_BASELINE_BLUR,
    "swap_id_accuracy_baseline_blur": SWAP_ID_ACCURACY_BASELINE_BLUR,
    "swap_pose_error_baseline_blur": SWAP_POSE_ERROR_BASELINE_BLUR,
    "portrait_psnr_baseline_blur": PORTRAIT_PSNR_BASELINE_BLUR,
    "portrait_id_accuracy_baseline_blur": PORTRAIT_ID_ACCURACY_BASELINE_BLUR,
    "portrait_control_error_baseline_blur": PORTRAIT_CONTROL_ERROR_BASELINE_BLUR,
}

# A task's primary metric -> the server-side new-user check's key.
NEWUSER = {"swap_psnr": NEWUSER_SWAP_PSNR, "portrait_psnr": NEWUSER_PORTRAIT_PSNR}
