"""Read the durations users write as text ("30m", "1h30m", 90) into numbers."""

from __future__ import annotations

import argparse
import re

_DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")


def parse_duration_s(value: float | int | str) -> float:
    """Seconds from a number of seconds or a text like ``"90"``, ``"30m"``, ``"1h30m"``, ``"2d"``.

    Raises ``ValueError`` naming the accepted forms.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or _DURATION_PART.sub("", text).strip():
                raise ValueError(
                    f"{value!r} is not a duration: write seconds (90) or a number with a unit, "
                    "s, m, h or d (30m, 1h30m, 2d)."
                ) from None
            seconds = sum(float(n) * _DURATION_UNITS_S[unit] for n, unit in parts)
    else:
        raise ValueError(f"{value!r} is not a duration: give seconds or a text like '30m'.")
    if seconds <= 0:
        raise ValueError(f"A duration must be more than 0 seconds, not {value!r}.")
    return seconds


def duration_argument(text: str) -> float:
    """``parse_duration_s`` as an argparse ``type``: a bad value is a usage error naming the forms."""
    try:
        return parse_duration_s(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def format_duration(seconds: float) -> str:
    """``1h 05m``, ``12m 03s`` or ``45s``: how long, for people."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
