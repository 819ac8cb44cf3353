"""SecAgg+ as pure protocol (no Flower): the sum is right, dropouts are recovered
up to the threshold, a round below it is abandoned, and neither side answers a
request or accepts a reply that an honest party would not send.

Each test plays one round between ``fl.secagg.server.Round`` and the devices of
``fl.secagg.device`` (``tests.secagg.driver``), with real keys, shares and masks.
"""

from __future__ import annotations

import numpy as np
import pytest

from fl.protocol import MalformedReply
from fl.secagg import device as D
from fl.secagg import params as S
from fl.secagg.quantize import clip_and_quantize, decode_sum, error_bound, step
from fl.secagg.server import Abandoned
from tests.secagg.driver import params, play

NODES = [3, 11, 2**63 + 7, 42, 17]  # Flower node ids are 64-bit


def _updates(scale=0.2, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=8) * scale for n in NODES}


def _flat(total):
    return np.concatenate([total["w0"], total["w1"]])


def _one_kind_of_share_per_device(server):
    """The server never holds both the seed shares and the key shares of a device."""
    for owner, by_holder in server.shares.items():
        lengths = {len(share) for share in by_holder.values()}
        assert len(lengths) == 1, owner


def test_sum_of_clipped_updates_within_the_stated_error():
    p = params(5, clip=1.0)
    updates = _updates()
    updates[11] = updates[11] * 100  # clipped to C on its device
    server, _, rejected = play(p, updates)
    total, count = server.unmasked_sum()
    expected = sum(u * min(1.0, p.clip / np.linalg.norm(u)) for u in updates.values())
    assert count == 5 and not rejected
    assert np.abs(_flat(total) - expected).max() <= error_bound(5, p.clip, p.target_range) \
        + 5 * step(p.clip, p.target_range) * (np.sqrt(8) + 1)


@pytest.mark.parametrize("stage", S.STAGES)
def test_a_dropout_at_each_stage_is_recovered(stage):
    """5 devices, threshold 3: one vanishes at each stage; the others' sum comes out
    (a device gone before training is simply not in it)."""
    p = params(5)
    updates = _updates(seed=1)
    server, _, _ = play(p, updates, drop={stage: [42]})
    total, count = server.unmasked_sum()
    in_sum = [n for n in NODES if n != 42 or stage == S.UNMASK]
    assert count == len(in_sum)
    expected = sum(updates[n] for n in in_sum)
    assert np.abs(_flat(total) - expected).max() <= error_bound(count, p.clip,
                                                                p.target_range) * 2
    _one_kind_of_share_per_device(server)


def test_a_device_without_an_update_is_unmasked_as_a_dropout():
    updates = _updates(seed=2) | {17: None}  # budget spent, no photos: trained=0
    server, _, _ = play(params(5), updates)
    total, count = server.unmasked_sum()
    assert count == 4
    assert np.allclose(_flat(total), sum(u for n, u in updates.items() if n != 17), atol=1e-6)


@pytest.mark.parametrize("stage", S.STAGES)
def test_below_the_threshold_the_round_is_abandoned(stage):
    """Threshold 3 of 5 shares: three devices vanish at the stage; nothing decodes."""
    p = params(5)
    with pytest.raises(Abandoned, match="threshold"):
        server, _, _ = play(p, _updates(), drop={stage: [3, 11, 42]})
        server.unmasked_sum()


def test_secagg_plus_neighbourhoods_and_a_dropout():
    """A sparse graph (5 of 9 neighbours): masks cancel in the sum, a dropout too."""
    nodes = list(range(101, 110))
    rng = np.random.default_rng(3)
    updates = {n: rng.normal(size=8) * 0.1 for n in nodes}
    p = params(9, num_shares=0.5)
    assert (p.num_shares, p.threshold) == (5, 3)
    server, _, _ = play(p, updates, drop={S.TRAIN: [104]})
    assert all(len(v) == 5 for v in server.neighbours.values())
    total, count = server.unmasked_sum()
    assert count == 8
    assert np.allclose(_flat(total), sum(u for n, u in updates.items() if n != 104), atol=1e-6)


def test_one_masked_vector_alone_says_nothing_of_its_update():
    """Every masked vector the server receives, decoded as if it were a sum of one,
    is far from its device's update (the masks are uniform over the field)."""
    p = params(5, sizes=(500, 300))
    rng = np.random.default_rng(4)
    updates = {n: rng.normal(size=800) * 0.02 for n in NODES}
    held = {}

    def record(node, vector):
        held[node] = vector
        return vector
    server, _, _ = play(p, updates, tamper={S.TRAIN: record})
    for node, vector in held.items():
        alone = decode_sum(vector, 1, p.clip, p.target_range)
        assert np.linalg.norm(alone - updates[node]) > 100 * p.clip
        assert abs(np.corrcoef(alone, updates[node])[0, 1]) < 0.2
    assert np.allclose(np.concatenate(list(server.unmasked_sum()[0].values())),
                       sum(updates.values()), atol=1e-6)


def test_quantized_update_stays_within_the_clip():
    """Sensitivity survives quantization: every quantized update reads back with
    norm <= C, however large the update or coarse the grid."""
    rng = np.random.default_rng(5)
    for target_range in (2**10, 2**17, 2**24):
        for scale in (1e-3, 1.0, 1e6):
            delta = rng.normal(size=300) * scale
            q = clip_and_quantize(delta, 0.5, target_range)
            back = decode_sum(q, 1, 0.5, target_range)
            assert np.linalg.norm(back) <= 0.5 + 1e-12
            assert q.min() >= 0 and q.max() <= target_range
    with pytest.raises(ValueError, match="not finite"):
        clip_and_quantize(np.array([np.nan, 1.0]), 1.0, 2**10)


def test_the_honest_sum_never_wraps():
    for cohort in (2, 3, 10, 100, 1000):
        assert cohort * S.target_range(cohort) <= S.MOD_RANGE // 2


# --- hostile devices (the server rejects their replies) -------------------------

def _rejected(stage, tamper):
    p = params(5)
    return play(p, _updates(), tamper={stage: tamper})


def test_wrong_share_counts_are_rejected_and_the_round_goes_on():
    def fewer(node, reply):
        if node == 42:
            reply[S.CIPHERTEXTS] = reply[S.CIPHERTEXTS][:-1]
        return reply
    server, _, rejected = _rejected(S.SHARE_KEYS, fewer)
    assert "expected one for each" in rejected[42]
    _total, count = server.unmasked_sum()
    assert count == 4


def test_unmask_share_count_and_lengths_are_checked():
    def short(node, reply):
        if node == 11:
            reply[S.SHARES] = reply[S.SHARES][:-1]
        if node == 17:
            reply[S.SHARES] = [b"x" * 10 for _ in reply[S.SHARES]]
        return reply
    server, _, rejected = _rejected(S.UNMASK, short)
    assert "expected one for each" in rejected[11] and "impossible length" in rejected[17]
    assert server.unmasked_sum()[1] == 5  # three honest holders are enough


def test_replies_to_the_wrong_stage_and_bad_keys_are_rejected():
    def wrong(node, reply):
        if node == 3:
            return {S.STAGE: S.UNMASK, **{k: v for k, v in reply.items() if k != S.STAGE}}
        if node == 11:
            return reply | {S.PK1: b"not a key"}
        return reply
    server, _, rejected = _rejected(S.SETUP, wrong)
    assert "stage 'unmask' where 'setup'" in rejected[3]
    assert "does not parse" in rejected[11]
    assert server.unmasked_sum()[1] == 3


def test_a_copied_public_key_is_rejected():
    seen = {}

    def copy(node, reply):
        if node == 11:
            return reply | {S.PK1: seen[3][S.PK1]}
        seen[node] = reply
        return reply
    _, _, rejected = _rejected(S.SETUP, copy)
    assert "already sent" in rejected[11]


def test_masked_vectors_outside_the_field_or_misshaped_are_rejected():
    def bad(node, vector):
        if node == 3:
            return vector[:-1]
        if node == 11:
            return vector + S.MOD_RANGE
        return vector
    server, _, rejected = _rejected(S.TRAIN, bad)
    assert "not 8 int64 values" in rejected[3] and "outside the field" in rejected[11]
    assert server.unmasked_sum()[1] == 3  # the two are unmasked as dropouts
    with pytest.raises(MalformedReply, match="int64"):
        server.accept_masked(3, np.zeros(8))  # floats
    with pytest.raises(MalformedReply, match="not in this stage"):
        server.accept_masked(42, np.zeros(8, dtype=np.int64))  # a second vector


def test_an_out_of_range_value_cannot_pass_as_a_sum():
    """A hostile device adds half the field to its masked vector: the unmasked sum
    leaves the honest range, and the round is abandoned (nothing released)."""
    def hostile(node, vector):
        return np.mod(vector + S.MOD_RANGE // 2, S.MOD_RANGE) if node == 42 else vector
    server, _, rejected = _rejected(S.TRAIN, hostile)
    assert not rejected  # a valid field element: only the sum can tell
    with pytest.raises(Abandoned, match="outside what honest devices"):
        server.unmasked_sum()


def test_a_bad_share_is_outvoted_by_the_seed_commitment():
    """One holder sends a corrupt share of device 3's seed: another subset of the
    shares rebuilds the committed seed."""
    def corrupt(node, reply):
        if node == 11:
            owners = reply[S.OWNERS]
            shares = list(reply[S.SHARES])
            i = owners.index(3)
            shares[i] = shares[i][:4] + bytes(len(shares[i]) - 4)
            reply[S.SHARES] = shares
        return reply
    server, _, rejected = _rejected(S.UNMASK, corrupt)
    assert not rejected and server.unmasked_sum()[1] == 5


# --- a hostile server (the devices refuse) --------------------------------------

def test_devices_refuse_a_minority_threshold_and_bad_parameters():
    p = params(5)
    for bad in ({"threshold": 2}, {"target_range": 2**31}, {"clip": float("nan")},
                {"num_shares": 6}):
        with pytest.raises(D.Refused):
            D.setup(1, S.Params(**{**p.__dict__, **bad}))


def test_devices_refuse_out_of_order_and_contradictory_requests():
    p = params(5)
    _server, sessions, _ = play(p, _updates())
    s = sessions[3]  # has answered unmask already
    with pytest.raises(D.Refused, match="unmask request after stage 'unmask'"):
        D.unmask(s, [3, 11, 42], [])
    fresh, _ = D.setup(3, p)
    with pytest.raises(D.Refused, match="train request after stage 'setup'"):
        D.receive_shares(fresh, [], [])
    s.stage = S.TRAIN  # as if it had not answered: contradictory requests
    with pytest.raises(D.Refused, match="both alive and dropped"):
        D.unmask(s, [3, 11, 42], [11])
    with pytest.raises(D.Refused, match="called dropped"):
        D.unmask(s, [11, 42, 17], [3])
    with pytest.raises(D.Refused, match="fewer than the threshold"):
        D.unmask(s, [3, 11], [42, 17])


def test_a_device_refuses_a_forged_or_misrouted_share():
    p = params(5)

    def forge(node, reply):
        if node == 11:
            cts = list(reply[S.CIPHERTEXTS])
            cts[0] = cts[0][:-8] + b"AAAAAAAA"  # Fernet's HMAC fails
            reply[S.CIPHERTEXTS] = cts
        return reply
    server, sessions, _ = play(p, _updates(), tamper={S.SHARE_KEYS: forge})
    # The recipient of 11's first share refused to train: it is a dropout, and the
    # round still sums the others.
    victim = next(n for n in NODES if n not in server.masked)
    assert victim != 11 and sessions[victim].stage == S.SHARE_KEYS
    assert server.refused == {victim: "train: the share from node 11 does not decrypt"}
    assert server.unmasked_sum()[1] == 4
