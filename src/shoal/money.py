"""Money: exact integer picodollars (1e-12 USD) for sums, and USD figures rounded to them.

Every cost shoal computes (`ModelCard.cost`) is a whole number of picodollars, so a response's
cost, its trace and the ledger's charge are the same number.
"""

from __future__ import annotations

import math

PICO = 10**12


def to_pico(usd: float) -> int:
    """USD to picodollars, rounded up (a cost is never undercounted). A figure that is a whole
    number of picodollars but for the float's own rounding (a few units in its last place, more
    than 1e-6 picodollar above a cent) reads back as that number."""
    pusd = usd * PICO
    whole = round(pusd)
    if abs(pusd - whole) <= max(1e-6, abs(pusd) * 1e-15):
        return whole
    return math.ceil(pusd)


def to_usd(pusd: int) -> float:
    return pusd / PICO


def whole_pico(usd: float) -> float:
    """`usd` rounded up to a whole picodollar."""
    return to_usd(to_pico(usd))
