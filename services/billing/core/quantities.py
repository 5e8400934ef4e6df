"""Exact quantities and money: decimal strings <-> integer billionths of a unit, micros, and the rounding rule.

No float ever touches a quantity or an amount. Quantities are stored as integer nanos (10**-9 of a unit), money
as integer micros (10**-6 of the currency unit); a line amount is computed exactly with integers and rounded
once, half to even, to whole micros.
"""

from __future__ import annotations

import re

from services.mesh.errors import InvalidArgument

__all__ = [
    "NANOS",
    "MICROS",
    "MAX_EVENT_NANOS",
    "parse_event_quantity",
    "parse_decimal",
    "format_nanos",
    "format_micros",
    "parse_money",
    "round_half_even",
    "line_amount_micros",
]

#: Nanos per unit of a quantity.
NANOS = 10**9
#: Micros per currency unit.
MICROS = 10**6
#: Largest quantity of one usage event, in nanos (999,999,999.999999999 units).
MAX_EVENT_NANOS = 10**18 - 1

_EVENT_QUANTITY = re.compile(r"([0-9]{1,9})(?:\.([0-9]{1,9}))?")
_DECIMAL = re.compile(r"([0-9]+)(?:\.([0-9]+))?")
_MONEY = re.compile(r"(-?)([0-9]+)(?:\.([0-9]{1,6}))?")


def parse_event_quantity(text: str) -> int:
    """A usage event's quantity in nanos; InvalidArgument (saying what is wrong) unless it is a plain decimal
    string >= 0 with at most 9 integer and 9 fractional digits."""
    match = _EVENT_QUANTITY.fullmatch(text)
    if match is not None:
        whole, fraction = match.groups()
        return int(whole) * NANOS + (int(fraction.ljust(9, "0")) if fraction else 0)
    raise InvalidArgument(_quantity_problem(text, 9))


def parse_decimal(text: str, what: str, *, max_integer_digits: int = 18) -> int:
    """A non-negative decimal string (price book values) in nanos; InvalidArgument naming ``what`` otherwise."""
    match = _DECIMAL.fullmatch(text)
    if match is None or len(match.group(1)) > max_integer_digits or len(match.group(2) or "") > 9:
        raise InvalidArgument(f"{what}: {_quantity_problem(text, max_integer_digits)}")
    whole, fraction = match.groups()
    return int(whole) * NANOS + (int(fraction.ljust(9, "0")) if fraction else 0)


def _quantity_problem(text: str, max_integer_digits: int) -> str:
    shown = repr(text if len(text) <= 40 else text[:40] + "...")
    if text.startswith("-") and _DECIMAL.fullmatch(text[1:]):
        return f"quantity {shown} is negative"
    match = _DECIMAL.fullmatch(text)
    if match is None:
        return f"quantity {shown} is not a plain decimal number (digits, optional '.' and digits; no sign, no exponent)"
    if len(match.group(2) or "") > 9:
        return f"quantity {shown} has more than 9 fractional digits"
    return f"quantity {shown} is too large (at most {max_integer_digits} integer digits)"


def format_nanos(nanos: int) -> str:
    """The shortest exact decimal string of a quantity in nanos: 12_500_000_000 -> "12.5"."""
    sign = "-" if nanos < 0 else ""
    whole, fraction = divmod(abs(nanos), NANOS)
    if not fraction:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:09d}".rstrip("0")


def format_micros(micros: int, *, min_decimals: int = 2) -> str:
    """An amount in micros as a decimal string with at least ``min_decimals`` decimals: 1_500_000 -> "1.50"."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS)
    digits = f"{fraction:06d}".rstrip("0").ljust(min_decimals, "0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def parse_money(text: str) -> int:
    """A decimal amount of currency ("12.50", "-3") in micros; InvalidArgument beyond micro precision."""
    match = _MONEY.fullmatch(text.strip())
    if match is None:
        raise InvalidArgument(f"amount {text!r} is not a decimal number with at most 6 decimals")
    sign, whole, fraction = match.groups()
    micros = int(whole) * MICROS + (int(fraction.ljust(6, "0")) if fraction else 0)
    return -micros if sign else micros


def round_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded to an integer, ties to the even neighbour (banker's rounding)."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def line_amount_micros(quantity_nanos: int, unit_price_micros: int, price_per_quantity_nanos: int) -> int:
    """The rounding rule: quantity / price_per_quantity * unit_price, exactly, rounded once half to even."""
    return round_half_even(quantity_nanos * unit_price_micros, price_per_quantity_nanos)
