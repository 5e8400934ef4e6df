"""Page tokens that carry an offset, parsed in one place: a token no service issued (any text a caller sends) is
INVALID_ARGUMENT, never a database error (SQLite fails an OFFSET past 2**63 as INTERNAL; found by fuzzing)."""

from __future__ import annotations

from services.mesh.errors import InvalidArgument

__all__ = ["MAX_OFFSET", "parse_offset"]

#: Far past any listing a service will ever page through, far below SQL's integer limits.
MAX_OFFSET = 2**31 - 1


def parse_offset(text: str) -> int:
    """The offset ``text`` names ("" is 0): ASCII digits up to MAX_OFFSET, else InvalidArgument."""
    if not text:
        return 0
    # str.isdigit() accepts "²" and other digits int() refuses; only ASCII digits were ever issued.
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or int(text) > MAX_OFFSET:
        raise InvalidArgument("page_token is not one this service issued")
    return int(text)
