"""The drift guard of a specialist route: is the specialist still agreeing with its teacher?

The guard has the teacher shadow the route (`shoal.shadow`): a sampled share of the answers the
specialist gave is asked of the teacher too, after the served answer, off the request path,
never on a model busy with served calls, within an hourly budget of its own; each such call is
planned, charged and traced like any (step `shadow of ROUTE`), and the pairs go to the route's
shadow table (`shoal route report ROUTE`). The guard compares each pair as the specialist reads
answers (its labels, its JSON fields). Over its last checks, when even the upper end of a 95%
interval of their agreement is below the floor (what the specialist's file says its answers
must keep, or the route's `min_agreement`), the route stops using the specialist: a warning is
logged, a trace record says why (status `switched_off`, step `drift-guard`), the metrics show
it, and a small state file beside the specialist keeps it off across restarts until it is
trained again.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass

from shoal.routing.base import Caller
from shoal.settings import DriftSpec, ShadowSpec
from shoal.specialists.calibrate import wilson_upper
from shoal.specialists.manage import drift_state_path, switched_off
from shoal.specialists.model import Specialist
from shoal.traces.store import CallRecord

log = logging.getLogger(__name__)

GUARD_STEP = "drift-guard"  # the step of the record that says it switched the specialist off
SWITCHED_OFF = "switched_off"
WINDOW = 200  # the checks agreement is judged over (the most recent)


@dataclass
class DriftCounts:
    """What the guard has compared since the process started."""

    checks: int = 0
    agreed: int = 0
    unparsed: int = 0  # the teacher's answer did not parse: counted neither way


class DriftGuard:
    def __init__(self, route: str, specialist: Specialist, teacher: str, spec: DriftSpec) -> None:
        self.route = route
        self.specialist = specialist
        self.teacher = teacher
        self.spec = spec
        self.counts = DriftCounts()
        self.recent: deque[bool] = deque(maxlen=WINDOW)
        self._caller: Caller | None = None
        self._off: str | None = None
        self._state_read = False

    def bind(self, caller: Caller) -> None:
        """Have the teacher shadow the specialist's answers on `caller` (the engine)."""
        self._caller = caller
        if self.spec.share <= 0:
            return
        shadow = caller.shadow(
            self.route,
            ShadowSpec(
                candidate=self.teacher,
                share=self.spec.share,
                budget_usd_per_hour=self.spec.budget_usd_per_hour,
                max_in_flight=self.spec.max_in_flight,
                agreement="exact",
            ),
        )
        shadow.only = self.specialist.id
        shadow.listeners.append(self.observe)

    # -- on or off -----------------------------------------------------------------------------

    @property
    def off_reason(self) -> str | None:
        """Why the route no longer uses the specialist (None while it does)."""
        if not self._state_read:
            self._state_read = True
            self._off = self._off or switched_off(
                self.specialist.path, self.specialist.trained().checksum
            )
        return self._off

    @property
    def switched(self) -> bool:
        """Whether the guard has switched the specialist off (as this process knows)."""
        return self._off is not None

    @property
    def floor(self) -> float:
        if self.spec.min_agreement is not None:
            return self.spec.min_agreement
        return self.specialist.trained().live_floor

    def _switch_off(self, reason: str) -> None:
        self._off = f"switched off by its drift guard: {reason}"
        log.warning(
            "route %s: specialist %s switched off: %s", self.route, self.specialist.id, reason
        )
        now = time.time()
        state = {"checksum": self.specialist.trained().checksum, "at": now, "reason": reason}
        try:
            drift_state_path(self.specialist.path).write_text(json.dumps(state) + "\n", "utf-8")
        except OSError as exc:
            log.warning("route %s: cannot keep the drift state: %s", self.route, exc)
        if self._caller is not None:
            self._caller.traces.record_call(
                CallRecord(
                    model=self.specialist.id,
                    route=self.route,
                    step=GUARD_STEP,
                    status=SWITCHED_OFF,
                    error=reason,
                    started_at=now,
                    finished_at=now,
                )
            )

    # -- checks --------------------------------------------------------------------------------

    def observe(self, served: str, teacher: str) -> None:
        """One of the specialist's answers and the teacher's to the same request."""
        if self._off is not None:
            return
        agreed = self.specialist.agree(served, teacher)
        if agreed is None:
            self.counts.unparsed += 1
            return
        self.counts.checks += 1
        self.counts.agreed += int(agreed)
        self.recent.append(agreed)
        n, kept = len(self.recent), sum(self.recent)
        if n < self.spec.min_checks:
            return
        upper, floor = wilson_upper(kept, n), self.floor
        if upper < floor:
            self._switch_off(
                f"its last {n} answers checked agreed with {self.teacher} on {kept} "
                f"({kept / n:.0%}; at most {upper:.0%} at 95% confidence), below the floor "
                f"of {floor:.0%}; train it again on newer traffic (shoal distil)"
            )
