"""A SecAgg+ round played in memory between ``fl.secagg.server.Round`` and the
devices of ``fl.secagg.device`` (no Flower): the protocol tests' driver."""

from __future__ import annotations

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
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
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fl.protocol import MalformedReply
from fl.secagg import device as D
from fl.secagg import masks
from fl.secagg import params as S
from fl.secagg.server import Round


def params(cohort: int, sizes=(5, 3), clip: float = 1.0, num_shares: float = 1.0,
           threshold: float = 0.5) -> S.Params:
    s, t = S.share_counts(cohort, num_shares, threshold)
    return S.Params(round=1, cohort=cohort, num_shares=s, threshold=t, clip=clip,
                    target_range=S.target_range(cohort),
                    keys=tuple(f"w{i}" for i in range(len(sizes))), sizes=tuple(sizes))


def play(p: S.Params, updates: dict[int, np.ndarray | None], drop=None, tamper=None):
    """Run every stage; ``drop``: {stage: nodes that vanish before answering it};
    ``tamper``: {stage: f(node, reply) -> reply} (a hostile device's reply).
    Returns (round, sessions, rejected {node: reason}); raises ``Abandoned``.
    ``round.refused``: {node: why} of the devices that refused a request."""
    drop, tamper = drop or {}, tamper or {}
    server, sessions, rejected = Round(p, list(updates)), {}, {}

    refused = {}

    def answer(stage, node, make):
        if node in drop.get(stage, ()):
            return None
        try:
            reply = make()
        except D.Refused as err:  # the device answers nothing useful: a dropout
            refused[node] = str(err)
            return None
        return tamper[stage](node, reply) if stage in tamper else reply

    def accept(node, fn, reply):
        try:
            fn(node, reply)
        except MalformedReply as err:
            rejected[node] = str(err)

    for node in server.nodes:
        def make(node=node):
            sessions[node], reply = D.setup(node, S.Params.from_record(server.setup_request()))
            return reply
        reply = answer(S.SETUP, node, make)
        if reply is not None:
            accept(node, server.accept_keys, reply)
    _check(server, set(server.public), set(server.public))
    for node in sorted(server.public):
        req = server.share_keys_request(node)
        reply = answer(S.SHARE_KEYS, node, lambda node=node, req=req: D.share_keys(
            sessions[node], req[S.NEIGHBOURS], req[S.NEIGHBOUR_PK1], req[S.NEIGHBOUR_PK2]))
        if reply is not None:
            accept(node, server.accept_ciphertexts, reply)
    _check(server, server.shared, server.shared)
    for node in sorted(server.shared):
        req = server.train_request(node)

        def make(node=node, req=req):
            D.receive_shares(sessions[node], req[S.SOURCES], req[S.CIPHERTEXTS])
            return D.mask(sessions[node], updates[node])
        vector = answer(S.TRAIN, node, make)
        if vector is not None:
            accept(node, server.accept_masked, vector)
    _check(server, server.masked, server.shared)
    server.refused = refused
    for node in sorted(server.masked):
        req = server.unmask_request(node)
        reply = answer(S.UNMASK, node, lambda node=node, req=req: D.unmask(
            sessions[node], req[S.ACTIVE], req[S.DEAD]))
        if reply is not None:
            accept(node, server.accept_shares, reply)
    return server, sessions, rejected


def _check(server, live, who):
    from fl.secagg.server import Abandoned
    why = server.short_of_threshold(live, who)
    if why:
        raise Abandoned(why)


def substituted_keys_attack(p: S.Params, update: np.ndarray) -> np.ndarray:
    """The key-substitution attack (no PKI of device keys): the server puts its own
    keys in device 10's share_keys request for all its neighbours 11-14, so 10
    encrypts every share to the server; the server rebuilds 10's seed, forges
    neighbour shares so that 10 trains, and knows every pairwise key. Returns 10's
    masked vector with every mask removed (mod M), ready to decode."""
    x, others = 10, [11, 12, 13, 14]
    session, reply = D.setup(x, p)
    fake = {v: (generate_key_pairs(), generate_key_pairs()) for v in others}

    def pk(pair):
        return public_key_to_bytes(pair[1])
    reply = D.share_keys(session, [x, *others], [reply[S.PK1]] + [pk(fake[v][0]) for v in others],
                         [reply[S.PK2]] + [pk(fake[v][1]) for v in others])
    seed_shares = []
    for dst, c in zip(reply[S.DESTINATIONS], reply[S.CIPHERTEXTS], strict=True):
        key = generate_shared_key(fake[dst][1][0], bytes_to_public_key(session.pk2))
        seed_shares.append(share_keys_plaintext_separate(decrypt(key, c))[2])
    seed = combine_shares(seed_shares[:p.threshold])
    sources, ciphertexts = others[:p.threshold - 1], []
    for v in sources:
        key = generate_shared_key(fake[v][1][0], bytes_to_public_key(session.pk2))
        ciphertexts.append(encrypt(key, share_keys_plaintext_concat(v, x, b"\0" * 36,
                                                                    b"\0" * 36)))
    D.receive_shares(session, sources, ciphertexts)
    y = D.mask(session, update) - masks.stream(seed, p.dimension)
    for v in sources:
        y = y + masks.pairwise(private_key_to_bytes(fake[v][0][0]), v, session.pk1, x,
                               p.dimension)
    return np.mod(y, p.mod_range)
