"""A device's photo-level privacy ledger: every DP-SGD step it has ever run.

Why a ledger and not "the PrivacyEngine's accountant": a ClientApp is called
afresh every round, and a fresh ``PrivacyEngine`` per round forgets the earlier
rounds, so the epsilon it reports covers one participation only (this is what
Flower's own Opacus example does). The ledger is the accountant's *history* --
``(noise_multiplier, sample_rate, steps)`` events -- persisted in the device's
state; the epsilon after the k-th participation is computed from all k
participations' events, exactly as one accountant fed all their steps would.

The ledger enters and leaves Opacus only through an accountant's public
``state_dict()`` / ``load_state_dict()`` (``accountant_state``, ``events_of``),
which also checks that the ledger is loaded into the accountant it was kept by;
an RDP epsilon is Opacus' own RDP analysis (``compute_rdp``, ``get_privacy_spent``)
on kept one-step curves, the same number its accountant gives (``_rdp_epsilon``).
Its on-disk form (``to_config``: flat lists) is unchanged by that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

ACCOUNTANTS = ("rdp", "prv")
Event = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


def _merge(events: list[Event], new: Event) -> list[Event]:
    """Append ``new``, merging it with the last event when the mechanism is equal
    (the same normal form Opacus' accountants keep)."""
    out = list(events)
    if out and out[-1][0] == new[0] and out[-1][1] == new[1]:
        out[-1] = (new[0], new[1], out[-1][2] + new[2])
    elif new[2] > 0:
        out.append(new)
    return out


def _normal(events: list[Event]) -> list[Event]:
    """``events`` with equal consecutive mechanisms merged (Opacus' normal form)."""
    out: list[Event] = []
    for event in events:
        out = _merge(out, event)
    return out


def epsilon_of(events: list[Event], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (0 when empty)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")
    if not events:
        return 0.0
    return _epsilon(tuple((float(s), float(q), int(n)) for s, q, n in events), float(delta),
                    accountant)


@lru_cache(maxsize=4096)
def _epsilon(events: tuple[Event, ...], delta: float, accountant: str) -> float:
    """Memoised on the exact events: a device asks for the same value up to three
    times per round (budget check, after training, in its reply, and whether one
    more round would fit)."""
    if accountant == "rdp":
        return _rdp_epsilon(events, delta)
    acc = create_accountant(accountant)
    acc.load_state_dict(accountant_state(events, accountant))
    return float(acc.get_epsilon(delta=delta))


def _rdp_epsilon(events: tuple[Event, ...], delta: float) -> float:
    """What Opacus' ``RDPAccountant.get_epsilon`` computes for ``events``, with each
    mechanism's one-step RDP curve kept (``_one_step_rdp``).

    Why: the accountant evaluates the subsampled Gaussian's RDP at every order for
    every event on every call (~0.1 s each), and a device's histories differ only in
    their step counts and how many participations they hold; the curve of n steps
    is n times one step's (``compute_rdp`` returns ``rdp * steps``). The sum and the
    conversion are the accountant's own, in its order, so the epsilon is the same
    number (tests/privacy/test_ledger.py checks it against the accountant)."""
    rdp = sum([_one_step_rdp(s, q) * n for s, q, n in events])
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp,
                                            delta=delta)
    return float(eps)


@lru_cache(maxsize=256)
def _one_step_rdp(noise_multiplier: float, sample_rate: float):
    curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                     orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.flags.writeable = False
    return curve


def accountant_state(events: list[Event] | tuple[Event, ...], accountant: str) -> dict:
    """``events`` as an Opacus accountant ``state_dict`` (for ``load_state_dict``)."""
    return {"history": [(float(s), float(q), int(n)) for s, q, n in events],
            "mechanism": accountant}


def events_of(acc) -> list[Event]:
    """An Opacus accountant's events, read through its public ``state_dict``."""
    return [(float(s), float(q), int(n)) for s, q, n in acc.state_dict()["history"]]


@dataclass
class PhotoLedger:
    """Photo-level privacy spent by one device, across every round it trained."""

    accountant: str = "rdp"
    events: list[Event] = field(default_factory=list)
    participations: int = 0

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.events, delta, self.accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int,
                      delta: float) -> float:
        """The epsilon this ledger *would* show after one more participation."""
        planned = _merge(self.events, (noise_multiplier, sample_rate, steps))
        return epsilon_of(planned, delta, self.accountant)

    def admits(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
               budget: float) -> bool:
        """Whether one more participation keeps the ledger within ``budget`` (0: none)."""
        return budget <= 0 or self.epsilon_after(noise_multiplier, sample_rate, steps,
                                                 delta) <= budget

    def state_dict(self) -> dict:
        """The events as an Opacus accountant ``state_dict`` (its ``load_state_dict``
        refuses a ledger kept by another accountant)."""
        return accountant_state(self.events, self.accountant)

    def record(self, history: list[Event], planned: Event) -> None:
        """Replace the events with the accountant's history after one participation.

        The trainer loads ``self.events`` into its Opacus accountant, checks the
        budget for ``planned`` (noise multiplier, sample rate, steps), trains, and
        hands back the accountant's history. That history must be exactly the
        events plus ``planned``: fewer steps would forget privacy spent, and any
        other rate or step count means the budget was checked for a mechanism
        that did not run (a budget check on a different rate is no check).
        """
        history = [(float(s), float(q), int(n)) for s, q, n in history]
        if sum(n for *_, n in history) < self.steps:
            raise RuntimeError(
                f"accountant history has {sum(n for *_, n in history)} steps, fewer than "
                f"the {self.steps} already in the ledger: privacy spent would be lost")
        expected = _merge(self.events, planned)
        if _normal(history) != _normal(expected):
            raise RuntimeError(
                f"the accountant recorded {history}, but the budget was checked for "
                f"{expected} (noise multiplier, sample rate, steps): the privacy spent is "
                "not the privacy checked")
        self.events = history
        self.participations += 1

    def extended(self, planned: Event | None) -> PhotoLedger:
        """A copy with one more participation (``planned``'s events; None when it
        ran without photo-level DP)."""
        events = _merge(self.events, planned) if planned else list(self.events)
        return PhotoLedger(self.accountant, events, self.participations + 1)

    @property
    def steps(self) -> int:
        return sum(n for *_, n in self.events)

    def to_config(self) -> dict[str, list | int | str]:
        """Flat lists that fit a Flower ``ConfigRecord`` (the device's own state)."""
        return {
            "accountant": self.accountant,
            "noise": [float(s) for s, _, _ in self.events],
            "rate": [float(q) for _, q, _ in self.events],
            "steps": [int(n) for *_, n in self.events],
            "participations": self.participations,
        }

    @classmethod
    def from_config(cls, record: dict) -> PhotoLedger:
        events = list(zip(record.get("noise", []), record.get("rate", []),
                          record.get("steps", [])))
        return cls(
            accountant=str(record.get("accountant", "rdp")),
            events=[(float(s), float(q), int(n)) for s, q, n in events],
            participations=int(record.get("participations", 0)),
        )
