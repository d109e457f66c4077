"""Short number formats for terminal tables: 1.23M, 2.5e11, 1m30s."""

from __future__ import annotations

import math


def human(count: float) -> str:
    """1234567 -> '1.23M'."""
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return f"{count:.0f}"


def sci(value: float) -> str:
    """2.5e+11 -> '2.5e11'; NaN (a ladder grid's budget) -> '-'."""
    if math.isnan(value):
        return "-"
    mantissa, _, exponent = f"{value:.2g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def duration(seconds: float) -> str:
    """90 -> '1m30s'; 3 days and more in days, a year and more in years (a plan's estimate for a
    budget far beyond the machine should still be readable: '396,102 y', not '3472233592h45m')."""
    days = seconds / 86400
    if days >= 365:
        years = days / 365.25
        return f"{years:.3g} y" if years < 100 else f"{years:,.0f} y" if years < 1e6 else f"{years:.2e} y"
    if days >= 3:
        return f"{days:.1f} d"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
