"""HTTP byte ranges for downloads (RFC 9110 §14): one ``bytes=`` range, or the whole representation.

Owns: parsing a ``Range`` header against the content's size into the inclusive byte range to send, and the
``Content-Range`` values. Several ranges in one request are answered with the whole content (RFC 9110 lets a
server ignore Range); a syntactically invalid header is ignored the same way; a range that starts beyond the end
is :class:`RangeNotSatisfiable` (416). Pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.shared.errors import RangeNotSatisfiable

_ONE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")


@dataclass(frozen=True)
class ByteRange:
    first: int
    last: int  # inclusive

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.first}-{self.last}/{size}"

    def audit_text(self) -> str:
        return f"{self.first}-{self.last}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range to send, or None for the whole content (no header, several ranges, or an unparseable one).

    Raises:
        RangeNotSatisfiable: the range starts at or beyond ``size`` (or asks for the last 0 bytes);
            ``extensions["size"]`` carries the size for the ``Content-Range: bytes */size`` header.
    """
    if header is None:
        return None
    match = _ONE.fullmatch(header.strip())
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:  # a suffix: the last N bytes
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"the content has {size} bytes", size=size)
        return ByteRange(max(0, size - suffix), size - 1)
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None  # invalid: ignored, like any malformed Range
    if first >= size:
        raise RangeNotSatisfiable(f"the content has {size} bytes; the range starts at {first}", size=size)
    return ByteRange(first, min(last, size - 1))
