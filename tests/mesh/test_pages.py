"""Offset page tokens: whatever text a caller sends as one, it is an offset a service issued or INVALID_ARGUMENT."""

from __future__ import annotations

import pytest

from services.mesh.errors import InvalidArgument
from services.mesh.pages import MAX_OFFSET, parse_offset


@pytest.mark.parametrize(("text", "offset"), [("", 0), ("0", 0), ("50", 50), (str(MAX_OFFSET), MAX_OFFSET)])
def test_issued_offsets_parse(text: str, offset: int) -> None:
    assert parse_offset(text) == offset


# Found by fuzzing: "9223372036854775808" reached SQLite as an OFFSET past 2**63 (INTERNAL); "²" passes isdigit().
@pytest.mark.parametrize(
    "text", ["9223372036854775808", str(MAX_OFFSET + 1), "²", "-1", "1e3", " 5", "５", "x" * 70_000]
)
def test_anything_else_is_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        parse_offset(text)
