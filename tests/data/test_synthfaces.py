import numpy as np
import pytest

from fl.data.device_data import load_device_data
from fl.data.fleet import (
    CLIP_ID_OFFSET,
    PUBLIC_ID_OFFSET,
    FleetSpec,
    device_photo_count,
    film_clip,
)
from fl.data.synthfaces import Attributes, Identity, render


def test_render_is_deterministic_from_seed_identity_and_index():
    a = render(Identity.sample(3, 7), [Attributes.sample(3, 7, k) for k in range(4)], 64)
    b = render(Identity.sample(3, 7), [Attributes.sample(3, 7, k) for k in range(4)], 64)
    assert np.array_equal(a, b)
    # a batch renders each image exactly as alone (no cross-talk between images)
    alone = render(Identity.sample(3, 7), [Attributes.sample(3, 7, 2)], 64)
    assert np.array_equal(a[2:3], alone)


def test_different_seeds_identities_and_photos_differ():
    base = render(Identity.sample(0, 1), [Attributes.sample(0, 1, 0)], 64)
    other_id = render(Identity.sample(0, 2), [Attributes.sample(0, 1, 0)], 64)
    other_photo = render(Identity.sample(0, 1), [Attributes.sample(0, 1, 1)], 64)
    other_seed = render(Identity.sample(1, 1), [Attributes.sample(1, 1, 0)], 64)
    for img in (other_id, other_photo, other_seed):
        assert np.abs(img - base).mean() > 0.01


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_shape_range_and_dtype(size):
    img = render(Identity.sample(0, 0), [Attributes.sample(0, 0, k) for k in range(3)], size)
    assert img.shape == (3, 3, size, size) and img.dtype == np.float32
    assert img.min() >= 0.0 and img.max() <= 1.0


@pytest.mark.parametrize("size", [16, 31, 129])
def test_render_rejects_sizes_outside_range(size):
    with pytest.raises(ValueError, match="between 32 and 128"):
        render(Identity.sample(0, 0), [Attributes.sample(0, 0, 0)], size)


def test_any_identity_under_any_attributes_is_ground_truth():
    """Swapping identity while keeping attributes keeps the scene (background)."""
    attrs = Attributes.sample(0, 5, 0).replace(noise_sigma=0.0)
    a = render(Identity.sample(0, 1), [attrs], 64)[0]
    b = render(Identity.sample(0, 2), [attrs], 64)[0]
    corner = (slice(None), slice(0, 4), slice(0, 4))  # background only
    assert np.allclose(a[corner], b[corner])
    assert np.abs(a - b).mean() > 0.01  # the face differs


def test_attributes_change_what_they_claim():
    attrs = Attributes.sample(0, 0, 0).replace(noise_sigma=0.0, yaw=0.0)
    ident = Identity.sample(0, 0)
    left, right = render(ident, [attrs.replace(yaw=-1.0), attrs.replace(yaw=1.0)], 64)
    dim, bright = render(ident, [attrs.replace(light_intensity=0.6),
                                 attrs.replace(light_intensity=1.3)], 64)
    assert np.abs(left - right).mean() > 0.01
    assert bright.mean() > dim.mean()


def test_fleet_devices_have_photo_counts_in_range_and_heldout():
    spec = FleetSpec(num_devices=20, photos_min=20, photos_max=40, heldout_photos=5,
                     image_size=32)
    counts = [device_photo_count(spec, d) for d in range(20)]
    assert all(20 <= c <= 40 for c in counts) and len(set(counts)) > 1
    photos = load_device_data(spec, 3)
    assert photos.train.shape == (counts[3], 3, 32, 32)
    assert photos.heldout.shape == (5, 3, 32, 32)
    with pytest.raises(ValueError, match="outside the fleet"):
        load_device_data(spec, 20)


def test_public_and_clip_identities_are_disjoint_from_devices():
    assert PUBLIC_ID_OFFSET > 100_000 and CLIP_ID_OFFSET > PUBLIC_ID_OFFSET + 100_000


def test_film_clip_changes_smoothly_in_one_scene():
    _actor, frames = film_clip(FleetSpec(clip_length=6), 0)
    yaws = [f.yaw for f in frames]
    steps = np.diff(yaws)
    assert np.allclose(steps, steps[0])  # linear interpolation between key frames
    assert len({f.background for f in frames}) == 1
