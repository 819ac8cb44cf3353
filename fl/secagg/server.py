"""The server's side of one SecAgg+ round: routing, sums and reconstruction.

The server holds only public keys, ciphertexts it cannot read, masked vectors and,
at the end, the shares that remove the masks of the *sum*: for each surviving
device the shares of its self-mask seed, for each device that dropped after
sharing its keys the shares of its pairwise-mask key. Never both for one device,
which is what keeps a single masked vector unreadable while this server follows
the protocol (an honest device refuses one unmask request that would give both;
it cannot stop a server that deviates: ``fl.secagg.device`` says how).

Every device reply is checked here (``MalformedReply``, the reason is recorded
like any rejected reply): the stage it answers, the types, counts and sizes of its
keys, recipients, ciphertexts, vector and shares. A reply that fails leaves that
device out of the protocol from that stage on. A round the protocol cannot finish
(too few devices left to hold the threshold of shares, a secret that does not
rebuild, a sum outside the honest range) raises ``Abandoned``: nothing is
released, and the loop counts it.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    public_key_to_bytes,
)

from fl.protocol import MalformedReply
from fl.secagg import masks
from fl.secagg import params as S
from fl.secagg.quantize import decode_sum, sum_bound

MAX_CIPHERTEXT = 4096  # bytes: a Fernet token of two shares is about 600
RECONSTRUCTION_TRIES = 64  # subsets of shares tried when devices sent bad shares


class Abandoned(RuntimeError):
    """The round cannot be unmasked; nothing is released. The message says why."""


def _typed_list(record, key: str, kind: type, stage: str) -> list:
    value = record.get(key)
    if not isinstance(value, list) or any(type(v) is not kind for v in value):
        raise MalformedReply(f"{stage}: {key!r} is not a list of {kind.__name__}")
    return value


def _stage(record, stage: str) -> None:
    got = record.get(S.STAGE) if record is not None else None
    if got == stage and S.REASON in record:
        raise MalformedReply(f"{stage}: the device refused ({str(record[S.REASON])[:200]})")
    if got != stage:
        raise MalformedReply(f"a reply to stage {got!r} where {stage!r} was asked")


class Round:
    """One round's protocol state at the server, keyed by Flower node id."""

    def __init__(self, params: S.Params, nodes: list[int]) -> None:
        self.params = params
        self.nodes = sorted(nodes)
        self.neighbours = S.neighbours(self.nodes, params.num_shares)
        self.public: dict[int, tuple[bytes, bytes]] = {}  # S0: set up
        self.seed_hash: dict[int, bytes] = {}
        self.shared: set[int] = set()  # S1: shared their keys
        self.forward: dict[int, list[tuple[int, bytes]]] = {}
        self.masked: set[int] = set()  # A: sent a masked vector
        self.total = np.zeros(params.dimension, dtype=np.int64)
        self.shares: dict[int, dict[int, bytes]] = {}  # owner -> holder -> share
        self.asked: dict[int, tuple[list[int], list[int]]] = {}
        self.bad_shares: dict[int, str] = {}  # holder -> why its unmask reply is rejected
        self.unmasked = False  # the sum was decoded (seen by the server), even if abandoned

    # --- requests -------------------------------------------------------------
    def setup_request(self) -> dict:
        return {S.STAGE: S.SETUP} | self.params.to_record()

    def share_keys_request(self, node: int) -> dict:
        live = [u for u in self.neighbours[node] if u in self.public]
        return {S.STAGE: S.SHARE_KEYS, S.ROUND: self.params.round, S.NEIGHBOURS: live,
                S.NEIGHBOUR_PK1: [self.public[u][0] for u in live],
                S.NEIGHBOUR_PK2: [self.public[u][1] for u in live]}

    def train_request(self, node: int) -> dict:
        sent = [(src, c) for src, c in self.forward.get(node, []) if src in self.shared]
        return {S.STAGE: S.TRAIN, S.ROUND: self.params.round, S.SOURCES: [s for s, _ in sent],
                S.CIPHERTEXTS: [c for _, c in sent]}

    def unmask_request(self, node: int) -> dict:
        dropped = self.shared - self.masked
        active = [u for u in self.neighbours[node] if u in self.masked]
        dead = [u for u in self.neighbours[node] if u in dropped]
        self.asked[node] = (active, dead)
        return {S.STAGE: S.UNMASK, S.ROUND: self.params.round, S.ACTIVE: active, S.DEAD: dead}

    # --- replies ----------------------------------------------------------------
    def accept_keys(self, node: int, record) -> None:
        _stage(record, S.SETUP)
        pk1, pk2 = record.get(S.PK1), record.get(S.PK2)
        if type(pk1) is not bytes or type(pk2) is not bytes or pk1 == pk2:
            raise MalformedReply("setup: two different public keys expected")
        try:
            for key in (pk1, pk2):
                if public_key_to_bytes(bytes_to_public_key(key)) != key:
                    raise ValueError
        except Exception:  # noqa: BLE001 - anything unparsable is a bad reply
            raise MalformedReply("setup: a public key does not parse") from None
        taken = {k for pair in self.public.values() for k in pair}
        if pk1 in taken or pk2 in taken:
            raise MalformedReply("setup: a public key another device already sent")
        self.public[node] = (pk1, pk2)

    def accept_ciphertexts(self, node: int, record) -> None:
        _stage(record, S.SHARE_KEYS)
        destinations = _typed_list(record, S.DESTINATIONS, int, S.SHARE_KEYS)
        ciphertexts = _typed_list(record, S.CIPHERTEXTS, bytes, S.SHARE_KEYS)
        expected = {u for u in self.neighbours[node] if u in self.public} - {node}
        if len(destinations) != len(ciphertexts) or len(set(destinations)) != \
                len(destinations) or set(destinations) != expected:
            raise MalformedReply(f"share_keys: {len(ciphertexts)} shares for "
                                 f"{len(set(destinations))} recipients, expected one for "
                                 f"each of its {len(expected)} neighbours")
        if any(not 64 <= len(c) <= MAX_CIPHERTEXT for c in ciphertexts):
            raise MalformedReply("share_keys: a ciphertext of implausible size")
        seed_hash = record.get(S.SEED_HASH)
        if type(seed_hash) is not bytes or len(seed_hash) != 32:
            raise MalformedReply("share_keys: no seed commitment")
        self.seed_hash[node] = seed_hash
        for dst, ciphertext in zip(destinations, ciphertexts, strict=True):
            self.forward.setdefault(dst, []).append((node, ciphertext))
        self.shared.add(node)

    def accept_masked(self, node: int, vector) -> None:
        """Add one device's masked vector to the running sum (the only thing kept)."""
        if node not in self.shared or node in self.masked:
            raise MalformedReply("train: a masked vector from a device not in this stage")
        p = self.params
        if not isinstance(vector, np.ndarray) or vector.shape != (p.dimension,) \
                or vector.dtype != np.int64:
            raise MalformedReply(f"train: the masked vector is not {p.dimension} int64 values")
        if vector.size and (vector.min() < 0 or vector.max() >= p.mod_range):
            raise MalformedReply("train: masked values outside the field")
        self.total = np.mod(self.total + vector, p.mod_range)
        self.masked.add(node)

    def accept_shares(self, node: int, record) -> None:
        _stage(record, S.UNMASK)
        owners = _typed_list(record, S.OWNERS, int, S.UNMASK)
        shares = _typed_list(record, S.SHARES, bytes, S.UNMASK)
        active, dead = self.asked.get(node, ([], []))
        if owners != [*active, *dead] or len(shares) != len(owners):
            raise MalformedReply(f"unmask: {len(shares)} shares for {len(owners)} devices, "
                                 f"expected one for each of the {len(active) + len(dead)} "
                                 "asked for")
        if any(len(s) < 20 or (len(s) - 4) % 16 for s in shares):
            raise MalformedReply("unmask: a share of impossible length")
        for owner, share in zip(owners, shares, strict=True):
            self.shares.setdefault(owner, {})[node] = share

    # --- checks and the result --------------------------------------------------
    def short_of_threshold(self, live: set[int], who: set[int]) -> str:
        """Why the protocol cannot go on ("" if it can): a device in ``who`` whose
        live neighbours (those in ``live``) are fewer than the threshold."""
        t = self.params.threshold
        short = sorted(u for u in who if len(set(self.neighbours[u]) & live) < t)
        if short:
            return (f"{len(short)} devices have fewer than the threshold of {t} surviving "
                    f"neighbours ({len(live)} of {len(self.nodes)} devices left)")
        if len(live) < self.params.min_survivors:
            return (f"{len(live)} of {len(self.nodes)} devices left, fewer than "
                    f"aggregation.min_survivors={self.params.min_survivors}")
        return ""

    def _rebuild(self, owner: int, check) -> bytes:
        """The owner's secret from the threshold of its shares, checked by ``check``
        (its commitment). Bad shares of the right length are found, not just
        outvoted: subsets leaving out first one holder, then two, ... (so a bad
        share from any one holder is always passed by), and when the first subset
        failed, once another rebuilds the secret every other holder's share is tested
        against it (``bad_shares``: the holders whose share disagrees, rejected by
        the caller). A bad share that no reconstruction needed is not looked for: it
        did no harm, and it is found in the round where it first stands in the way."""
        held = self.shares.get(owner, {})
        # Holders already caught sending a bad share are tried last.
        holders = sorted(held, key=lambda h: (h in self.bad_shares, h))
        t = self.params.threshold
        if len(holders) < t:
            raise Abandoned(f"only {len(holders)} shares of node {owner}'s secret came "
                            f"back, the threshold is {t}")
        for tried, subset in enumerate(itertools.islice(_leave_out(holders, t),
                                                        RECONSTRUCTION_TRIES)):
            secret = _combine([held[h] for h in subset])
            if secret is None or not check(secret):
                continue
            if tried == 0:
                # The first t shares rebuilt it: no bad share stood in the way. The
                # others are tested only once a bad share is known to be there (each
                # test is a combine of t shares: testing all of them in every round
                # made the server's unmasking (s - t + 1)x slower, 22 s at 30 devices).
                return secret
            base = [held[h] for h in subset[:t - 1]]
            for holder in holders:
                if holder not in subset and _combine([*base, held[holder]]) != secret:
                    self.bad_shares.setdefault(holder, (
                        f"unmask: its share of node {owner}'s secret disagrees with the "
                        f"{t} shares that rebuild it"))
            return secret
        raise Abandoned(f"node {owner}'s secret does not rebuild from its shares "
                        "(bad shares were sent, or it sent a wrong commitment)")

    def unmasked_sum(self) -> tuple[dict[str, np.ndarray], int]:
        """The float sum of the survivors' clipped updates (by array name) and their
        number. Raises ``Abandoned`` if it cannot be had."""
        p = self.params
        if len(self.masked) < p.min_survivors:
            raise Abandoned(f"{len(self.masked)} devices sent a masked update, fewer than "
                            f"aggregation.min_survivors={p.min_survivors}")
        if p.noise_multiplier > 0 and len(self.masked) < p.threshold:
            # Each device added sigma C / sqrt(t): fewer than t would deliver less
            # noise than is accounted (never reached while the threshold checks hold).
            raise Abandoned(f"{len(self.masked)} devices sent a masked update, fewer than "
                            f"the {p.threshold} whose noise makes up the accounted sigma")
        total = self.total.copy()
        for owner in sorted(self.masked):
            seed = self._rebuild(owner, lambda s, o=owner:
                                 hashlib.sha256(s).digest() == self.seed_hash[o])
            total = total - masks.stream(seed, p.dimension)
        for owner in sorted(self.shared - self.masked):
            pk1 = self.public[owner][0]
            sk1 = self._rebuild(owner, lambda s, pk=pk1: _matches(s, pk))
            for partner in self.neighbours[owner]:
                if partner != owner and partner in self.masked:
                    total = total + masks.pairwise(sk1, owner, self.public[partner][0],
                                                   partner, p.dimension)
        total = np.mod(total, p.mod_range)
        count = len(self.masked)
        # From here the server holds the decoded (noised, under distributed noise) sum,
        # whether or not the range check below passes: the caller accounts for it.
        self.unmasked = True
        if total.size and int(total.max()) > sum_bound(count, p.target_range):
            raise Abandoned("the unmasked sum is outside what honest devices can send: a "
                            "device sent an out-of-range value")
        flat = decode_sum(total, count, p.quantization_range, p.target_range)
        out, start = {}, 0
        for key, size in zip(p.keys, p.sizes, strict=True):
            out[key] = flat[start:start + size]
            start += size
        return out, count


def _leave_out(holders: list[int], t: int):
    """t-subsets of ``holders`` (in order), each once: the first t, then those leaving
    out one of the first t + 1, then two of the first t + 2, ..."""
    seen = set()
    for k in range(len(holders) - t + 1):
        for out in itertools.combinations(range(t + k), k):
            subset = tuple(h for i, h in enumerate(holders[:t + k]) if i not in out)
            if subset not in seen:
                seen.add(subset)
                yield subset


def _combine(shares: list[bytes]) -> bytes | None:
    try:
        return combine_shares(shares)
    except Exception:  # noqa: BLE001 - a bad share (pycryptodome's or unpad's error)
        return None


def _matches(secret: bytes, public: bytes) -> bool:
    try:
        return public_key_to_bytes(bytes_to_private_key(secret).public_key()) == public
    except Exception:  # noqa: BLE001 - not a key at all
        return False
