"""Byte sizes as a user writes them for ``--memory-limit``, and as messages show them."""

from __future__ import annotations

import pytest

from jupyter_dist.sizes import format_nbytes, parse_nbytes


@pytest.mark.parametrize(
    ("size", "nbytes"),
    [
        ("2GB", 2_000_000_000),
        ("512MB", 512_000_000),
        ("1.5GiB", 3 * 2**29),
        ("2 gb", 2_000_000_000),
        (" 300 MiB ", 300 * 2**20),
        ("64kB", 64_000),
        ("64KiB", 65_536),
        ("1TB", 10**12),
        (".5GB", 500_000_000),
        ("4096", 4096),
        ("100B", 100),
        (2_000_000_000, 2_000_000_000),
        (2e9, 2_000_000_000),
    ],
)
def test_sizes_in_every_accepted_form_are_parsed(size: int | float | str, nbytes: int) -> None:
    assert parse_nbytes(size) == nbytes


@pytest.mark.parametrize(
    "size", ["2G", "2 gigabytes", "GB", "", "1e9", "-1GB", "two GB", "1.2.3MB", float("nan"), True]
)
def test_a_malformed_size_says_which_forms_are_accepted(size: object) -> None:
    with pytest.raises(ValueError, match=r"not a size: give .*\"2GB\", \"512MB\" or \"1\.5GiB\""):
        parse_nbytes(size)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, -5, "0MB", 0.4])
def test_a_size_must_be_positive(size: int | float | str) -> None:
    with pytest.raises(ValueError, match="more than 0 bytes"):
        parse_nbytes(size)


@pytest.mark.parametrize(
    ("nbytes", "like", "shown"),
    [
        (2_100_000_000, None, "2.1 GB"),
        (2_000_000_000, None, "2 GB"),
        (3 * 2**29, None, "1.5 GiB"),
        (612_345_678, None, "612 MB"),
        (999_960_000, None, "1 GB"),  # rounded up a unit, not "1e+03 MB"
        (800, None, "800 B"),
        (1_700_000_000, 3 * 2**29, "1.58 GiB"),  # a usage shown in its limit's units
        (2_134_000_000, 2_000_000_000, "2.13 GB"),
    ],
)
def test_sizes_are_shown_in_the_family_they_were_given_in(
    nbytes: int, like: int | None, shown: str
) -> None:
    assert format_nbytes(nbytes, like=like) == shown
