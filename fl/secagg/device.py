"""One device's side of one SecAgg+ round, as pure functions over its state.

The device keeps its secrets (two key pairs, the mask seed, the shares others sent
it) in its own state between the stages; none of them ever leaves it in the
clear. It checks every request against what it already knows, and refuses
(``Refused``) instead of answering a request an honest server would not send:

* parameters whose threshold is not a majority of the shares (``Params.problems``);
* a stage out of order, or a second answer to a stage of the same round;
* a neighbour list without this device's own keys, with repeated keys, or with
  fewer devices than the threshold;
* a forwarded share that does not decrypt under the pair's key, or names another
  sender or recipient (Fernet authenticates it, the plaintext names both ends);
* an unmask request that calls this device dead, names a device as both alive and
  dead, names devices it holds no share of, or has fewer survivors than the
  threshold or than the round's minimum of survivors (``Params.min_survivors``, at
  least ``MIN_SURVIVORS``): answering it could hand the server both secrets of one
  device, or unmask a sum of too few devices.

What these checks do not stop: they protect against an honest-but-curious server
(one that follows the protocol) and catch accidents, not a server that deviates.
A device cannot authenticate its neighbours' public keys (there is no PKI of device
keys; Flower 1.41 gives devices no way to verify other nodes' keys), so a server
that substitutes its own keys receives the device's shares; and each device sees
only its own unmask request (there is no consistency-check round), so a server
that forwards a device only some shares and gives different devices different
survivor lists rebuilds that device's seed and its partners' keys (split views).
Both recover one device's update with no colluding device. A threshold of about
2/3 of the shares or more stops the split views a search found (a search result,
not a proof: the default is 3/4); only Bell et al.'s consistency check with
signatures over a PKI of device keys closes both. docs/privacy.md says more.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fl.secagg import masks
from fl.secagg import noise as device_noise
from fl.secagg import params as S
from fl.secagg.quantize import clip_and_quantize, quantize_noise


class Refused(ValueError):
    """The device will not answer this request; the message says why."""


@dataclass
class Session:
    """A device's protocol state for one round (kept in its own storage)."""

    node: int
    params: S.Params
    stage: str = ""  # the last stage answered
    sk1: bytes = b""
    pk1: bytes = b""
    sk2: bytes = b""
    pk2: bytes = b""
    seed: bytes = b""  # the self-mask seed b
    neighbours: list[int] = field(default_factory=list)
    neighbour_pk1: list[bytes] = field(default_factory=list)
    neighbour_pk2: list[bytes] = field(default_factory=list)
    holders: list[int] = field(default_factory=list)  # whose shares this device holds
    seed_shares: list[bytes] = field(default_factory=list)
    key_shares: list[bytes] = field(default_factory=list)
    partners: list[int] = field(default_factory=list)  # pairwise masks with these

    def to_record(self) -> dict:
        out = {k: getattr(self, k) for k in (
            "node", "stage", "sk1", "pk1", "sk2", "pk2", "seed", "neighbours",
            "neighbour_pk1", "neighbour_pk2", "holders", "seed_shares", "key_shares",
            "partners")}
        return out | self.params.to_record()

    @classmethod
    def from_record(cls, record) -> Session:
        kw = {k: record[k] for k in (
            "node", "stage", "sk1", "pk1", "sk2", "pk2", "seed")}
        lists = {k: list(record.get(k, [])) for k in (
            "neighbours", "neighbour_pk1", "neighbour_pk2", "holders", "seed_shares",
            "key_shares", "partners")}
        return cls(params=S.Params.from_record(record), **kw, **lists)


def _expect(session: Session, previous: str, stage: str) -> None:
    if session.stage != previous:
        raise Refused(f"{stage} request after stage {session.stage or 'none'!r} "
                      f"(expected after {previous!r})")


def setup(node: int, params: S.Params) -> tuple[Session, dict]:
    """Stage 0: two fresh key pairs; the reply carries the public halves."""
    problem = params.problems()
    if problem:
        raise Refused(f"setup parameters refused: {problem}")
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    session = Session(node=node, params=params, stage=S.SETUP,
                      sk1=private_key_to_bytes(sk1), pk1=public_key_to_bytes(pk1),
                      sk2=private_key_to_bytes(sk2), pk2=public_key_to_bytes(pk2))
    return session, {S.STAGE: S.SETUP, S.PK1: session.pk1, S.PK2: session.pk2}


def share_keys(session: Session, nodes: list[int], pk1s: list[bytes], pk2s: list[bytes]
               ) -> dict:
    """Stage 1: Shamir-share the mask seed and the first secret key among the
    neighbours (this device keeps one share of each), each encrypted for its
    recipient under a key agreed from the second key pair."""
    _expect(session, S.SETUP, S.SHARE_KEYS)
    p = session.params
    if not len(nodes) == len(pk1s) == len(pk2s) or len(set(nodes)) != len(nodes):
        raise Refused("share_keys: neighbour lists of different lengths or repeated nodes")
    if not p.threshold <= len(nodes) <= p.num_shares:
        raise Refused(f"share_keys: {len(nodes)} neighbours, outside the threshold "
                      f"{p.threshold} .. {p.num_shares} shares")
    if session.node not in nodes:
        raise Refused("share_keys: this device is not among its own neighbours")
    own = nodes.index(session.node)
    if (pk1s[own], pk2s[own]) != (session.pk1, session.pk2):
        raise Refused("share_keys: this device's public keys were altered")
    if len(set(pk1s) | set(pk2s)) != 2 * len(nodes):
        raise Refused("share_keys: repeated public keys")
    try:
        for key in (*pk1s, *pk2s):
            bytes_to_public_key(key)
    except Exception:  # noqa: BLE001 - any unparsable key is a bad request
        raise Refused("share_keys: a public key does not parse") from None
    session.seed = os.urandom(32)
    seed_shares = create_shares(session.seed, p.threshold, len(nodes))
    key_shares = create_shares(session.sk1, p.threshold, len(nodes))
    destinations, ciphertexts = [], []
    own_sk2 = bytes_to_private_key(session.sk2)
    for i, node in enumerate(nodes):
        if node == session.node:
            continue
        key = generate_shared_key(own_sk2, bytes_to_public_key(pk2s[i]))
        plaintext = share_keys_plaintext_concat(session.node, node, seed_shares[i],
                                                key_shares[i])
        destinations.append(node)
        ciphertexts.append(encrypt(key, plaintext))
    session.neighbours, session.neighbour_pk1, session.neighbour_pk2 = (
        list(nodes), list(pk1s), list(pk2s))
    session.holders = [session.node]
    session.seed_shares, session.key_shares = [seed_shares[own]], [key_shares[own]]
    session.stage = S.SHARE_KEYS
    return {S.STAGE: S.SHARE_KEYS, S.DESTINATIONS: destinations, S.CIPHERTEXTS: ciphertexts,
            S.SEED_HASH: hashlib.sha256(session.seed).digest()}


def receive_shares(session: Session, sources: list[int], ciphertexts: list[bytes]) -> None:
    """Stage 2, before training: decrypt and keep the shares the neighbours sent."""
    _expect(session, S.SHARE_KEYS, S.TRAIN)
    p = session.params
    if len(sources) != len(ciphertexts) or len(set(sources)) != len(sources):
        raise Refused("train: forwarded shares and their senders do not match")
    if len(sources) + 1 < p.threshold:
        raise Refused(f"train: shares from {len(sources)} neighbours, fewer than the "
                      f"threshold {p.threshold} needs")
    own_sk2 = bytes_to_private_key(session.sk2)
    for source, ciphertext in zip(sources, ciphertexts, strict=True):
        if source == session.node or source not in session.neighbours:
            raise Refused(f"train: a share from node {source}, not a neighbour")
        their = session.neighbour_pk2[session.neighbours.index(source)]
        try:
            plaintext = decrypt(generate_shared_key(own_sk2, bytes_to_public_key(their)),
                                ciphertext)
            sender, recipient, seed_share, key_share = share_keys_plaintext_separate(plaintext)
        except Exception:  # noqa: BLE001 - Fernet's InvalidToken or a mangled plaintext
            raise Refused(f"train: the share from node {source} does not decrypt") from None
        if (sender, recipient) != (source, session.node):
            raise Refused(f"train: the share from node {source} names {sender} -> {recipient}")
        session.holders.append(source)
        session.seed_shares.append(seed_share)
        session.key_shares.append(key_share)
    session.partners = list(sources)
    session.stage = S.TRAIN


def mask(session: Session, delta: np.ndarray | None) -> np.ndarray | None:
    """Stage 2, after training: the clipped, quantized update (plus, under
    distributed noise, this device's share of the Gaussian noise, from the OS's
    CSPRNG: ``fl.secagg.noise``) plus the self mask and the pairwise masks, mod M
    (None: this device has no update this round)."""
    if session.stage != S.TRAIN:
        raise Refused("masking before the shares arrived")
    if delta is None:
        return None
    p = session.params
    total = clip_and_quantize(delta, p.clip, p.target_range, p.quantization_range)
    if total.size != p.dimension:
        raise Refused(f"update of {total.size} values, expected {p.dimension}")
    if p.noise_multiplier > 0:
        total = total + quantize_noise(device_noise.gaussian(p.dimension, p.device_noise_std),
                                       p.clip, p.target_range, p.quantization_range)
    total = total + masks.stream(session.seed, p.dimension)
    for partner in session.partners:
        their_pk1 = session.neighbour_pk1[session.neighbours.index(partner)]
        total = total + masks.pairwise(session.sk1, session.node, their_pk1, partner,
                                       p.dimension)
    return np.mod(total, p.mod_range)


def unmask(session: Session, active: list[int], dead: list[int]) -> dict:
    """Stage 3: the seed shares of surviving neighbours and the key shares of those
    that dropped, never both of one device."""
    _expect(session, S.TRAIN, S.UNMASK)
    p = session.params
    if set(active) & set(dead) or len(set(active)) != len(active) \
            or len(set(dead)) != len(dead):
        raise Refused("unmask: a device is named twice, or both alive and dropped")
    if session.node in dead or session.node not in active:
        raise Refused("unmask: this device, which sent its update, is called dropped")
    unknown = sorted((set(active) | set(dead)) - set(session.holders))
    if unknown:
        raise Refused(f"unmask: no share held for nodes {unknown[:3]}")
    if len(active) < p.threshold:
        raise Refused(f"unmask: {len(active)} survivors, fewer than the threshold "
                      f"{p.threshold}")
    if len(active) < max(p.min_survivors, S.MIN_SURVIVORS):
        raise Refused(f"unmask: {len(active)} survivors, fewer than the minimum of "
                      f"{max(p.min_survivors, S.MIN_SURVIVORS)} whose sum may be unmasked")
    where = {node: i for i, node in enumerate(session.holders)}
    session.stage = S.UNMASK  # one answer per round
    return {S.STAGE: S.UNMASK, S.OWNERS: [*active, *dead],
            S.SHARES: [session.seed_shares[where[n]] for n in active]
            + [session.key_shares[where[n]] for n in dead]}
