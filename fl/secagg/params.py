"""The round's SecAgg+ parameters and the message schema both sides share.

Stages, as in Flower's legacy ``SecAggPlusWorkflow``: ``setup`` (each device makes
two key pairs and returns the public halves), ``share_keys`` (each device
Shamir-shares its mask seed and its first secret key among its neighbours,
encrypted for each), ``train`` (the ordinary training message carrying the
forwarded shares; the device trains, clips, quantizes and masks), ``unmask``
(survivors return the seed shares of survivors and the key shares of dropouts).

The field is Z_M with M = 2**32, Flower's default. A cohort of n devices is
quantized to T = 2**(31 - ceil(log2 n)) levels over [-C, C] per coordinate, so
n * T <= 2**31 = M / 2: the honest sum never wraps, and a decoded coordinate
above n * T shows that some device sent a value no honest device can
(``fl.secagg.server``).

With distributed noise (``privacy.user.noise_at=devices``, ``noise_multiplier`` > 0)
each device also adds its share of the Gaussian noise, std sigma C / sqrt(t) with t
the threshold (the fewest devices a sum that is unmasked can hold), truncated at
``NOISE_TAIL`` standard deviations; the quantization range widens from [-C, C] to
[-R, R] with R = C + NOISE_TAIL * sigma C / sqrt(t) (``quantization_range``), so a
noised coordinate still lands in 0..T.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, fields

# Message types (Flower routes "<category>.<action>" to the ClientApp's handler).
SETUP = "setup"
SHARE_KEYS = "share_keys"
TRAIN = "train"  # the ordinary training message, with the SecAgg record added
UNMASK = "unmask"
STAGES = (SETUP, SHARE_KEYS, TRAIN, UNMASK)
MESSAGE_TYPE = {SETUP: "query.secagg_setup", SHARE_KEYS: "query.secagg_share_keys",
                UNMASK: "query.secagg_unmask"}

RECORD = "secagg"  # the ConfigRecord of a SecAgg message, both directions
STATE = "secagg-state"  # the device's own protocol state (Flower's context.state)
MASKED = "secagg-masked"  # the masked vector in a training reply (instead of "arrays")

# Keys inside RECORD.
STAGE = "stage"
ROUND = "round"
PK1, PK2 = "pk1", "pk2"  # setup reply: mask-agreement and encryption public keys
NEIGHBOURS, NEIGHBOUR_PK1, NEIGHBOUR_PK2 = "nids", "pk1s", "pk2s"  # share_keys request
DESTINATIONS, CIPHERTEXTS = "dsts", "ctxts"  # share_keys reply; train request: sources
SOURCES = "srcs"
ACTIVE, DEAD = "active", "dead"  # unmask request
OWNERS, SHARES = "owners", "shares"  # unmask reply: whose share, the share
REASON = "reason"  # a device's refusal
SEED_HASH = "seed-hash"  # share_keys reply: SHA-256 of the self-mask seed (a commitment)

MOD_BITS = 32
MOD_RANGE = 2**MOD_BITS  # Flower's default modulus_range
MAX_COHORT = 2**20
# The fewest devices whose sum a device helps unmask, whatever the server says: with
# two, each member of the sum (or anyone who sees an un-noised model) learns the
# other's update as the sum minus its own.
MIN_SURVIVORS = 3
# Distributed noise is truncated at this many standard deviations (so a noised
# coordinate stays inside the quantization range); a draw that far out has
# probability 2 * Phi(-10) = 1.5e-23 per coordinate.
NOISE_TAIL = 10.0


def target_range(cohort: int) -> int:
    """Quantization levels T for a cohort of ``cohort``: n * T <= M / 2."""
    return 2 ** (MOD_BITS - 1 - max(0, math.ceil(math.log2(max(cohort, 1)))))


@dataclass(frozen=True)
class Params:
    """What every device of the round is told at setup, and checks."""

    round: int
    cohort: int  # devices asked to set up (n)
    num_shares: int  # neighbours per device, itself included (s)
    threshold: int  # shares that rebuild a secret (t)
    clip: float  # L2 bound C of the summed update (user-level DP's clip)
    target_range: int  # quantization levels T over [-C, C]
    keys: tuple[str, ...]  # names of the arrays summed, in order
    sizes: tuple[int, ...]  # their element counts
    min_survivors: int = MIN_SURVIVORS  # fewest devices whose sum is unmasked
    mod_range: int = MOD_RANGE
    # sigma of user-level DP when each device adds its share of the noise
    # (privacy.user.noise_at=devices); 0: the server adds it to the sum.
    noise_multiplier: float = 0.0

    @property
    def dimension(self) -> int:
        return sum(self.sizes)

    @property
    def device_noise_std(self) -> float:
        """Each device's share of the noise: sigma C / sqrt(t), so that any t
        survivors together deliver at least N(0, (sigma C)^2)."""
        return self.noise_multiplier * self.clip / math.sqrt(self.threshold)

    @property
    def quantization_range(self) -> float:
        """R: each coordinate a device sends (update plus its noise) lies in [-R, R]."""
        return self.clip + NOISE_TAIL * self.device_noise_std

    def problems(self) -> str:
        """Why an honest device must refuse these parameters ("" if it need not).

        The threshold must be a majority of the shares: a server that could rebuild a
        secret from a minority could ask one half of the neighbours for a device's
        mask seed and the other half for its key, and unmask that device alone."""
        if not 2 <= self.cohort <= MAX_COHORT:
            return f"cohort {self.cohort} outside 2..{MAX_COHORT}"
        if not min(3, self.cohort) <= self.num_shares <= self.cohort:
            return f"{self.num_shares} shares for a cohort of {self.cohort}"
        if not self.num_shares // 2 + 1 <= self.threshold <= self.num_shares:
            return (f"threshold {self.threshold} is not a majority of the "
                    f"{self.num_shares} shares")
        if not MIN_SURVIVORS <= self.min_survivors <= self.num_shares:
            return (f"min_survivors {self.min_survivors} outside {MIN_SURVIVORS}.."
                    f"{self.num_shares} (the shares): a sum of fewer devices could be "
                    "unmasked")
        if self.mod_range != MOD_RANGE or self.target_range != target_range(self.cohort):
            return (f"quantization T={self.target_range}, M={self.mod_range} differ from "
                    f"T={target_range(self.cohort)}, M={MOD_RANGE} for this cohort")
        if not (math.isfinite(self.clip) and self.clip > 0):
            return f"clip {self.clip!r} is not a positive number"
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            return f"noise multiplier {self.noise_multiplier!r} is not a number >= 0"
        if not self.keys or len(self.keys) != len(self.sizes) or min(self.sizes) < 1:
            return "no arrays to sum, or sizes that do not match them"
        if (2 * self.quantization_range / self.clip / self.target_range
                * (math.sqrt(self.dimension) + 1) > 0.1):
            return (f"{self.dimension} values on {self.target_range} levels: rounding could "
                    "move an update by a tenth of the clip; sum fewer arrays or fewer devices")
        return ""

    def to_record(self) -> dict:
        out = asdict(self)
        out["keys"], out["sizes"] = list(self.keys), list(self.sizes)
        return {f"p.{k}": v for k, v in out.items()}

    @classmethod
    def from_record(cls, record) -> Params:
        """Typed read of a setup request; ``ValueError`` with the reason if unusable."""
        values = {}
        for f in fields(cls):
            value = record.get(f"p.{f.name}")
            kind = {"keys": str, "sizes": int}.get(f.name)
            if kind is not None:
                if not isinstance(value, list) or any(type(v) is not kind for v in value):
                    raise ValueError(f"setup: {f.name!r} is not a list of {kind.__name__}")
                value = tuple(value)
            elif f.name in ("clip", "noise_multiplier"):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"setup: {f.name!r} is not a number")
                value = float(value)
            elif type(value) is not int:
                raise ValueError(f"setup: {f.name!r} is not a whole number")
            values[f.name] = value
        return cls(**values)


def share_counts(cohort: int, num_shares: float, threshold: float) -> tuple[int, int]:
    """(s, t) for a cohort: ``num_shares`` as a share of the cohort (s odd, at least
    3, at most the cohort) and ``threshold`` as a share of s (a majority at least)."""
    s = min(cohort, max(3, round(num_shares * cohort)))
    if s < cohort and s % 2 == 0:
        s += 1
    t = min(s, max(s // 2 + 1, math.ceil(threshold * s)))
    return s, t


def neighbours(nodes: list[int], num_shares: int) -> dict[int, list[int]]:
    """SecAgg+'s ring: each node and the s // 2 nodes on either side of it in a
    secret shuffle (the server cannot place a device next to chosen others in a
    seeded order, and devices do not learn the order in advance)."""
    order = list(nodes)
    secrets.SystemRandom().shuffle(order)
    n, half = len(order), num_shares // 2
    if num_shares >= n:
        return {u: sorted(order) for u in order}
    return {u: sorted({order[(i + k) % n] for k in range(-half, half + 1)})
            for i, u in enumerate(order)}
