"""Exact quantities and money: decimal strings round-trip through integer nanos, and the rounding rule is
exactly "quantity / price_per_quantity * unit_price, rounded once, half to even" (checked against Fraction)."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.core.quantities import (
    MAX_EVENT_NANOS,
    NANOS,
    format_micros,
    format_nanos,
    line_amount_micros,
    parse_decimal,
    parse_event_quantity,
    parse_money,
    round_half_even,
)
from services.mesh.errors import InvalidArgument


@given(st.integers(min_value=0, max_value=MAX_EVENT_NANOS))
def test_event_quantities_round_trip_exactly(nanos: int) -> None:
    text = format_nanos(nanos)
    assert parse_event_quantity(text) == nanos
    assert Decimal(text) == Decimal(nanos) / NANOS  # the string means exactly that many units


@given(st.decimals(min_value=0, max_value=Decimal("999999999.999999999"), places=9, allow_nan=False))
def test_any_plain_decimal_of_nine_places_parses_to_its_exact_value(value: Decimal) -> None:
    assert parse_event_quantity(format(value, "f")) == int(value * NANOS)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("-1", "negative"),
        ("-0.5", "negative"),
        ("1e3", "not a plain decimal"),
        ("1.5.2", "not a plain decimal"),
        ("", "not a plain decimal"),
        (" 1", "not a plain decimal"),
        ("+1", "not a plain decimal"),
        ("NaN", "not a plain decimal"),
        ("0x10", "not a plain decimal"),
        ("1,5", "not a plain decimal"),
        (".5", "not a plain decimal"),
        ("1.", "not a plain decimal"),
        ("0.0000000001", "more than 9 fractional digits"),
        ("1000000000", "too large"),
        ("٣", "not a plain decimal"),  # a non-ASCII digit must not slip through
    ],
)
def test_malformed_quantities_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        parse_event_quantity(text)


def test_price_book_decimals_allow_bigger_values_but_stay_exact() -> None:
    assert parse_decimal("100000000000", "up_to") == 100_000_000_000 * NANOS
    assert parse_decimal("0.000000001", "x") == 1
    with pytest.raises(InvalidArgument, match="up_to"):
        parse_decimal("1" * 19, "up_to")


@pytest.mark.parametrize(
    ("numerator", "denominator", "rounded"),
    [(5, 2, 2), (7, 2, 4), (1, 2, 0), (3, 2, 2), (2, 3, 1), (1, 3, 0), (10, 5, 2), (0, 7, 0), (-5, 2, -2)],
)
def test_half_to_even(numerator: int, denominator: int, rounded: int) -> None:
    assert round_half_even(numerator, denominator) == rounded


@given(
    st.integers(min_value=0, max_value=10**24),
    st.integers(min_value=0, max_value=10**12),
    st.integers(min_value=1, max_value=10**18),
)
def test_line_amount_is_the_exact_product_rounded_once_half_even(quantity: int, price: int, per: int) -> None:
    exact = Fraction(quantity, NANOS) / Fraction(per, NANOS) * price
    floor = exact.numerator // exact.denominator
    remainder = exact - floor
    expected = floor + (1 if remainder > Fraction(1, 2) or (remainder == Fraction(1, 2) and floor % 2) else 0)
    assert line_amount_micros(quantity, price, per) == expected


def test_money_formatting_and_parsing() -> None:
    assert format_micros(1_500_000) == "1.50"
    assert format_micros(1_234_567) == "1.234567"
    assert format_micros(-250_000) == "-0.25"
    assert format_micros(7, min_decimals=6) == "0.000007"
    assert parse_money("12.5") == 12_500_000
    assert parse_money("-3") == -3_000_000
    with pytest.raises(InvalidArgument):
        parse_money("1.0000001")
