"""Shadow routes: a candidate asked a sampled share of a route's live requests, off the request
path, and compared with what the route served.

A shadow call starts only after the served answer is complete, only when the candidate's models
are not busy with served calls, and only while its hourly budget lasts; a served call that needs
a model a shadow call is using cancels the shadow call (what the shadow consumed is charged to
the shadow's budget and traced). Each pair goes to an outcome table, the same as `shoal replay`
writes, so `shoal route report NAME` can show how the candidate would have done on live traffic.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

from shoal.compare import Agreement, Pair, outcome_rows
from shoal.ledger import Account
from shoal.messages import ChatResponse
from shoal.routing.outcomes import RowWriter
from shoal.settings import ShadowSpec

log = logging.getLogger(__name__)

HOUR_S = 3600.0


class Shadow:
    """The shadow of route `route`: when to ask its candidate, with what money, and where the
    pairs go."""

    def __init__(
        self, route: str, spec: ShadowSpec, table: Path, *, rng: random.Random | None = None
    ) -> None:
        self.route = route
        self.spec = spec
        self.table = table
        self.agreement = Agreement.parse(spec.agreement)
        self.in_flight = 0
        self.asked = self.dropped = self.compared = 0
        self._rng = rng or random.Random()
        self._window = time.monotonic()
        self.account = Account.usd(f"shadow of {route}", spec.budget_usd_per_hour)
        # Only the answers of this model are shadowed (None: every answer); each listener is
        # told of every comparison, as (served answer, candidate's answer): a specialist
        # route's drift guard listens to the teacher shadowing the specialist.
        self.only: str | None = None
        self.listeners: list[Callable[[str, str], None]] = []

    @property
    def candidate(self) -> str:
        return self.spec.candidate

    def wants(self, served: ChatResponse | None = None) -> bool:
        """Whether this served answer is one to compare (of the model shadowed, sampled, within
        the hour's budget and the calls allowed in flight)."""
        if served is not None and self.only is not None and served.model != self.only:
            return False
        if self._rng.random() >= self.spec.share:
            return False
        now = time.monotonic()
        if now - self._window >= HOUR_S:  # a new hour: a new budget
            self._window = now
            self.account = Account.usd(f"shadow of {self.route}", self.spec.budget_usd_per_hour)
        if self.in_flight >= self.spec.max_in_flight or self.account.left_usd <= 0:
            self.dropped += 1
            return False
        return True

    def write(self, pair: Pair) -> None:
        self.compared += 1
        with RowWriter(self.table) as writer:
            for row in outcome_rows(pair, self.candidate):
                writer.write(row)
        for listener in self.listeners:
            listener(pair.recording.answer, pair.answer)
