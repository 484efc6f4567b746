"""The one ledger: money held for calls in flight and charged when they end.

Every budget in shoal is an `Account`: a pipeline run's budget and an API key's alike. Money is
counted in integer picodollars (1e-12 USD), so sums are exact and a trace, a key and a run that
record the same charges agree to the last picodollar.

    hold = account.reserve(plan.worst_usd)   # refuses a call the budget cannot cover
    ...                                      # the call runs, capped at what is held
    hold.settle(charged_pusd)                # the hold is released, the charge is spent

A hold is checked and taken in one synchronous step, so on one event loop any number of
concurrent calls cannot both take the last picodollar. A call is charged what it cost, never
less: a budget is protected by capping the work at what was held (a local model stops
generating when its cost would pass the hold), not by charging less than the work cost. What a
call spends past its hold (a prompt that took longer than expected) is charged, and counted in
`Account.overrun_pusd`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.errors import BudgetExceededError, RateLimitedError
from shoal.money import PICO, to_pico, to_usd

__all__ = ["PICO", "Account", "Hold", "to_pico", "to_usd"]

log = logging.getLogger(__name__)


@dataclass
class Account:
    """A budget (`limit_pusd`, None for none), what is spent and what calls in flight hold.

    `on_charge(pusd)` is told of every settled charge (the key store writes them to its file).
    `owner` names whose money it is (an API key), recorded with the traces of its calls.
    """

    name: str
    limit_pusd: int | None = None
    spent_pusd: int = 0
    held_pusd: int = 0
    overrun_pusd: int = 0
    on_charge: Callable[[int], None] | None = field(default=None, repr=False)
    # Who the account belongs to (an API key's name), written on the traces of its calls.
    owner: str | None = None

    @classmethod
    def usd(cls, name: str, limit_usd: float | None) -> Account:
        return cls(name, None if limit_usd is None else to_pico(limit_usd))

    @property
    def left_pusd(self) -> int | None:
        """What a new call may still hold (None: no limit)."""
        if self.limit_pusd is None:
            return None
        return self.limit_pusd - self.spent_pusd - self.held_pusd

    @property
    def left_usd(self) -> float:
        left = self.left_pusd
        return math.inf if left is None else to_usd(left)

    @property
    def spent_usd(self) -> float:
        return to_usd(self.spent_pusd)

    def fits(self, usd: float) -> bool:
        left = self.left_pusd
        return left is None or to_pico(usd) <= left

    def reserve(self, usd: float) -> Hold:
        """Hold `usd` for one call, or refuse it: `BudgetExceededError` when the budget cannot
        cover it, `RateLimitedError` when it could once calls in flight settle."""
        amount = to_pico(usd)
        if self.limit_pusd is not None:
            free = self.limit_pusd - self.spent_pusd
            if amount > free:
                raise BudgetExceededError(
                    f"{self.name} has ${to_usd(max(free, 0)):.6f} of its budget left; this call "
                    f"may cost up to ${usd:.6f} (lower max_tokens to ask less)"
                )
            if amount > free - self.held_pusd:
                raise RateLimitedError(
                    f"{self.name}: the rest of its budget is held by calls in flight",
                    retry_after_s=1.0,
                )
        self.held_pusd += amount
        return Hold(self, amount)


@dataclass
class Hold:
    """Money held on an account for one call. Settle it exactly once; later calls return the
    first charge and change nothing."""

    account: Account
    amount_pusd: int
    charged_pusd: int | None = None

    @property
    def amount_usd(self) -> float:
        return to_usd(self.amount_pusd)

    @property
    def settled(self) -> bool:
        return self.charged_pusd is not None

    def settle(self, charged_pusd: int) -> int:
        """Release the hold and charge the call what it cost; returns the charge."""
        if self.charged_pusd is not None:
            return self.charged_pusd
        charged = max(0, charged_pusd)
        self.charged_pusd = charged
        account = self.account
        account.held_pusd -= self.amount_pusd
        account.spent_pusd += charged
        if charged > self.amount_pusd:
            account.overrun_pusd += charged - self.amount_pusd
            log.warning(
                "%s: a call cost $%.9f, more than the $%.9f held for it",
                account.name,
                to_usd(charged),
                to_usd(self.amount_pusd),
            )
        if account.on_charge is not None:
            account.on_charge(charged)
        return charged

    def release(self) -> None:
        """The call never ran: give the money back."""
        self.settle(0)
