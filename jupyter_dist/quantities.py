"""Sizes and durations as people write them ("2GB", "30m") and read them ("2.1 GB", "12m 03s").

Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB,
GiB, TiB) powers of 1024, as on a disk's label and in ``free -h``
respectively. A size is shown in the family it was most likely given in, so
a limit of "1.5GiB" reads back as "1.5 GiB", not "1.61 GB". Durations are
seconds, or numbers with s, m, h or d ("1h30m").
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "argument_type",
    "format_duration",
    "format_nbytes",
    "parse_duration_s",
    "parse_nbytes",
]

Quantity = TypeVar("Quantity", int, float)

_DECIMAL = (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("kB", 1000))
_BINARY = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
_UNITS = {name.lower(): factor for name, factor in (*_DECIMAL, *_BINARY, ("B", 1))}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
ACCEPTED_FORMS = (
    "a number of bytes (2000000000) or a number with a unit: "
    "B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), "
    'as in "2GB", "512MB" or "1.5GiB"'
)


def parse_nbytes(size: int | float | str) -> int:
    """The number of bytes ``size`` names: ``2_000_000_000``, ``"2GB"``, ``"512 MiB"``.

    Raises ``ValueError`` naming the accepted forms for anything else, and for
    sizes that are not positive.
    """
    not_a_size = ValueError(f"{size!r} is not a size: give {ACCEPTED_FORMS}")
    if isinstance(size, bool) or not isinstance(size, int | float | str):
        raise not_a_size
    number, factor = size, 1
    if isinstance(size, str):
        match = _SIZE.fullmatch(size)
        unit = _UNITS.get(match.group(2).lower() or "b") if match else None
        if match is None or unit is None:
            raise not_a_size
        number, factor = float(match.group(1)), unit
    try:
        nbytes = int(number * factor)
    except (ValueError, OverflowError):  # nan, inf
        raise not_a_size from None
    if nbytes <= 0:
        raise ValueError(f"a size must be more than 0 bytes, not {size!r}")
    return nbytes


def _is_binary(nbytes: int) -> bool:
    """Whether ``nbytes`` was most likely given in KiB, MiB...: a multiple of 1024 but not of 1000."""
    return nbytes % 1024 == 0 and nbytes % 1000 != 0


def format_nbytes(nbytes: int, like: int | None = None, digits: int = 3) -> str:
    """``nbytes`` for a person: ``"2.1 GB"``, ``"512 MiB"``, ``"800 B"``.

    ``like``: show it in the unit family of that other size (a usage beside
    its limit); ``digits``: significant digits shown.
    """
    units = _BINARY if _is_binary(nbytes if like is None else like) else _DECIMAL
    for name, factor in units:
        shown = f"{nbytes / factor:.{digits}g}"
        if float(shown) >= 1:  # rounded: 999.96 MB is "1 GB", not "1e+03 MB"
            return f"{shown} {name}"
    return f"{nbytes} B"


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


def argument_type(parse: Callable[[str], Quantity]) -> Callable[[str], Quantity]:
    """``parse`` as an argparse ``type``: a bad value is a usage error that names the accepted forms."""

    def read(text: str) -> Quantity:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    read.__name__ = parse.__name__  # argparse names it in its own messages
    return read
