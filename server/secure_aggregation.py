"""SecAgg+ over the Grid: the server's stages around one training round.

``collect`` (step 3 of the loop) runs, over the sampled devices:

1. ``setup``: the round's parameters out (``fl.secagg.params``), two public keys
   back from each device;
2. ``share_keys``: each device gets its neighbours' public keys and returns its
   encrypted shares, one per neighbour, which the server only forwards;
3. ``train``: the strategy's training message plus the shares forwarded to that
   device; the reply carries the training report and a masked vector instead of
   the weights (``clients.secagg``).

``release`` (step 5) adds the masked vectors of the devices whose report passed
validation, runs stage 4, ``unmask`` (seed shares of the survivors, key shares of
the devices that dropped after sharing their keys), and hands only the decoded sum
and its count to the release (``Release.release_sum``). The server never holds an
update in the clear. Under ``privacy.user.noise_at=devices`` the parameters carry
sigma, each device adds its share of the noise before masking, and the sum handed
on carries the noise multiplier its survivors' noise delivers (never below sigma:
a sum of fewer than the threshold is abandoned).

Failures are handled where they happen: a device that errs, times out or sends a
malformed reply at a stage (``fl.secagg.server`` checks every one) is out of the
protocol from then on, rejected with the reason if malformed. If too few
devices are left for the threshold of shares, or the sum cannot be rebuilt,
the round is abandoned: nothing is released, ``fleet/secagg_abandoned`` is 1 for
it (0 for a round that finished), and the log says why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fl import protocol as P
from fl.privacy.release import Release, Released, SecureSum
from fl.secagg import params as S
from fl.secagg.server import Abandoned, Round
from fl.tracking import keys as K
from server.transport import PULL_INTERVAL, PullBackoff, Transport


class SecureAggregation:
    def __init__(self, transport: Transport, release: Release, num_shares: float,
                 threshold: float, log: Callable[[str], None] = print,
                 min_survivors: int = S.MIN_SURVIVORS) -> None:
        if release.secure_clip() <= 0:
            raise ValueError("secure aggregation needs a bound on each update: user-level "
                             "DP's clip, or strategy.update_norm_bound")
        self.transport, self._release, self.log = transport, release, log
        self.num_shares, self.threshold = num_shares, threshold
        self.min_survivors = min_survivors
        self.bytes_received = 0  # of every protocol reply (measured by the benchmark)

    # --- step 3 -----------------------------------------------------------------
    def collect(self, rnd, messages, devices):
        messages = list(messages)
        self.devices, self.rejected, self.why_abandoned = dict(devices), {}, ""
        self.excused: dict[int, str] = {}
        self.round = None
        if len(messages) < self.min_survivors:
            self.why_abandoned = (f"{len(messages)} devices sampled, fewer than "
                                  f"aggregation.min_survivors={self.min_survivors}")
            self.excused = dict.fromkeys(devices.values(), self.why_abandoned)
            return []
        shared = messages[0].content[P.ARRAYS].to_torch_state_dict()
        keys = self._release.secure_keys(shared)
        s, t = S.share_counts(len(messages), self.num_shares, self.threshold)
        params = S.Params(round=rnd, cohort=len(messages), num_shares=s, threshold=t,
                          clip=self._release.secure_clip(),
                          target_range=S.target_range(len(messages)), keys=tuple(keys),
                          sizes=tuple(int(shared[k].numel()) for k in keys),
                          min_survivors=self.min_survivors,
                          noise_multiplier=self._release.device_noise_multiplier())
        if params.problems():  # devices would refuse them: say so here, once
            raise ValueError(f"secure aggregation cannot run round {rnd}: {params.problems()}")
        self.round = r = Round(params, [int(m.metadata.dst_node_id) for m in messages])
        live: set[int] = set()  # devices that answered every stage so far
        try:
            self._stage(rnd, S.SETUP, r.nodes, lambda n: r.setup_request(), r.accept_keys)
            live = set(r.public)
            self._check(r.short_of_threshold(live, live))
            self._stage(rnd, S.SHARE_KEYS, sorted(r.public), r.share_keys_request,
                        r.accept_ciphertexts)
            live = set(r.shared)
            self._check(r.short_of_threshold(live, live))
        except Abandoned as err:
            self.why_abandoned = str(err)
            # Devices still in the protocol were never asked to train: not their fault.
            self.excused = {self.devices[n]: self.why_abandoned for n in live}
            return []
        # Each device gets its own shares; Flower's strategies give every message of
        # a round one shared content object, so each message gets its own copy.
        train = [Message(content=RecordDict(dict(m.content.items())
                                            | {S.RECORD: ConfigRecord(r.train_request(n))}),
                         dst_node_id=n, message_type=m.metadata.message_type,
                         group_id=m.metadata.group_id)
                 for m in messages if (n := int(m.metadata.dst_node_id)) in r.shared]
        return self.transport.send(train, "trained")

    # --- step 5 -----------------------------------------------------------------
    def release(self, rnd, shared, reports):
        r = self.round
        try:
            self._check(self.why_abandoned)
            for device, (report, reply) in sorted(reports.items()):
                node = int(reply.metadata.src_node_id)
                try:
                    vector = _masked_vector(reply)
                    if vector is not None and not report.trained:
                        raise P.MalformedReply("a masked vector with trained=0")
                    if vector is not None:
                        self.bytes_received += vector.nbytes
                        r.accept_masked(node, vector)
                except P.MalformedReply as err:
                    self.rejected[device] = f"malformed reply ({err})"
            self._check(r.short_of_threshold(r.masked, r.shared))
            self._stage(rnd, S.UNMASK, sorted(r.masked), r.unmask_request, r.accept_shares)
            try:
                total, count = r.unmasked_sum()
            finally:
                self._reject_bad_shares(rnd, r)
        except Abandoned as err:
            if r is not None and r.unmasked and r.params.noise_multiplier > 0:
                # The server decoded the noised sum before it was found out of range: it
                # saw one more output of the mechanism, so the accountant composes it.
                self._release.released += 1
                self.log(f"round {rnd}: its noised sum was decoded before it was abandoned; "
                         "the round is counted in user-level epsilon")
            return self._abandon(rnd, shared, str(err))
        p = r.params
        summed = SecureSum({k: torch.from_numpy(v).reshape(shared[k].shape)
                            for k, v in total.items()}, count,
                           sorted(self.devices[n] for n in r.masked),
                           # each survivor added sigma C / sqrt(t): together sigma sqrt(m/t)
                           p.noise_multiplier * math.sqrt(count / p.threshold))
        released = self._release.release_sum(rnd, shared, summed)
        return Released(released.state, released.metrics | self._metrics(),
                        released.accepted, self.rejected)

    def _reject_bad_shares(self, rnd: int, r: Round) -> None:
        """Devices whose unmasking shares disagree with the secret the others rebuild
        are rejected like any malformed reply, and named in the log (the operator
        can leave them out)."""
        for node, why in sorted(r.bad_shares.items()):
            device = self.devices[node]
            self.rejected[device] = f"malformed reply ({why})"
            self.log(f"round {rnd}: device {device} sent bad unmasking shares, rejected: "
                     f"{why}")

    def _abandon(self, rnd: int, shared, why: str) -> Released:
        """Nothing is released or counted as released; the round is logged and counted."""
        self.log(f"round {rnd}: secure aggregation abandoned, nothing released: {why}")
        return Released(dict(shared), self._release.metrics() | self._metrics(True), [],
                        self.rejected, self.excused)

    @staticmethod
    def _metrics(abandoned: bool = False) -> dict[str, float]:
        """Per round, so a resumed run needs no count carried over: the series sums
        to the rounds abandoned."""
        return {K.SECAGG_ABANDONED: float(abandoned)}

    @staticmethod
    def _check(why: str) -> None:
        if why:
            raise Abandoned(why)

    def _stage(self, rnd: int, stage: str, nodes: list[int], request, accept) -> None:
        """One query stage: the request to each node, its checked reply back."""
        messages = [Message(content=RecordDict({S.RECORD: ConfigRecord(request(n))}),
                            dst_node_id=n, message_type=S.MESSAGE_TYPE[stage],
                            group_id=str(rnd)) for n in nodes]
        for reply in exchange(self.transport, messages):
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                continue  # dropped: the threshold checks decide whether that matters
            record = reply.content.get(S.RECORD, None)
            self.bytes_received += _size(record)
            try:
                accept(node, record)
            except P.MalformedReply as err:
                self.rejected[self.devices[node]] = f"malformed reply ({err})"


def exchange(transport: Transport, messages: list[Message]) -> list[Message]:
    """Push a protocol stage's messages; pull replies until all came or the round's
    timeout passed. One reply per asked node, the first."""
    grid = transport.grid
    asked = {int(m.metadata.dst_node_id) for m in messages}
    waiting = set(grid.push_messages(messages))
    replies, seen = [], set()
    deadline, backoff = time.time() + transport.timeout, PullBackoff(PULL_INTERVAL / 5)
    while waiting and time.time() < deadline:
        got = list(grid.pull_messages(waiting))
        waiting -= {reply.metadata.reply_to_message_id for reply in got}
        for reply in got:
            node = int(reply.metadata.src_node_id)
            if node in asked and node not in seen:
                seen.add(node)
                replies.append(reply)
        if waiting:
            backoff.after(bool(got))
    return replies


def _masked_vector(reply: Message) -> np.ndarray | None:
    if S.MASKED not in reply.content:
        return None
    record = reply.content[S.MASKED]
    try:
        if list(record.keys()) != [S.MASKED]:
            raise ValueError
        return record[S.MASKED].numpy()
    except Exception:  # noqa: BLE001 - anything undecodable is a bad reply
        raise P.MalformedReply("the masked vector cannot be decoded") from None


def _size(record) -> int:
    if record is None:
        return 0
    total = 0
    for value in record.values():
        items = value if isinstance(value, list) else [value]
        total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
    return total
