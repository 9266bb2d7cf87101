"""Feed cursors: where an office is in a jurisdiction's feed, as an opaque, authenticated token.

A cursor is a versioned vector of per-partition *next Kafka offsets* (never sequence numbers: concurrent sends
make sequence order differ from offset order) plus the *embargo mark* — the last ``(embargo end, partition,
offset)`` whose delayed release the office has been given (see ``docs/gateway-api.md``) — encoded compactly,
MAC'd and base64url'd::

    version (1 byte = 1) | key id length (1 byte) | key id | varint n | n varint offsets |
    varint embargo micros | varint embargo partition | varint embargo offset | MAC (16 bytes)

The MAC is HMAC-SHA256 under the key named in the cursor, over a domain label, the office and the jurisdiction
and every byte before it, truncated to 128 bits. Office and jurisdiction are *bound* (MAC'd) but not stored, so a
cursor reveals nothing and one office's cursor, or one replayed onto another jurisdiction, fails like a forged one.
Keys rotate: new cursors use the current key; cursors under any configured key still verify; a cursor under a key
no longer configured is refused. Every way a cursor can be wrong is one :class:`InvalidCursor` (400) — never a
silent restart from the beginning.

Pure: keys are parameters. Does not own: which offsets exist (the reader), what is released (``release``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from services.shared.errors import ConfigurationError, InvalidCursor

VERSION: Final = 1
MAC_BYTES: Final = 16
MAX_PARTITIONS: Final = 1024
MAX_CURSOR_CHARS: Final = 8192
MIN_KEY_BYTES: Final = 32
#: An embargo mark covering every record whose embargo ends at or before its moment.
ALL: Final = (1 << 63) - 1
_DOMAIN: Final = b"evhub-feed-cursor\x00"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_KEY_ID_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

_ONE_BYTE: Final = tuple(bytes([n]) for n in range(0x80))
#: ``(embargo end in µs since the epoch, partition, offset)``: delayed releases up to here were handled.
EmbargoMark = tuple[int, int, int]


@dataclass(frozen=True)
class Cursor:
    positions: tuple[int, ...]
    embargo_mark: EmbargoMark

    def advanced(self, partition: int, next_offset: int) -> Cursor:
        positions = list(self.positions)
        positions[partition] = max(positions[partition], next_offset)
        return Cursor(tuple(positions), self.embargo_mark)

    def with_mark(self, mark: EmbargoMark) -> Cursor:
        return Cursor(self.positions, max(self.embargo_mark, mark))


def micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (what the embargo mark counts in)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def start(partitions: int, *, now_micros: int) -> Cursor:
    """The cursor of a feed read from its beginning, at ``now``: nothing before now is owed a delayed release."""
    return Cursor(tuple([0] * partitions), (now_micros, ALL, ALL))


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def byte(self) -> int:
        if self._at >= len(self._data):
            raise InvalidCursor("invalid cursor")
        self._at += 1
        return self._data[self._at - 1]

    def take(self, n: int) -> bytes:
        if self._at + n > len(self._data):
            raise InvalidCursor("invalid cursor")
        self._at += n
        return self._data[self._at - n : self._at]

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise InvalidCursor("invalid cursor")

    def rest(self) -> int:
        return len(self._data) - self._at


class CursorKeys:
    """The MAC keys, by key id, and the one new cursors are made with."""

    def __init__(self, keys: Mapping[str, bytes], *, current: str) -> None:
        """Raises: ConfigurationError for no keys, a short key, a malformed key id, or an unknown current id."""
        if not keys or current not in keys:
            raise ConfigurationError("cursor keys: the current key id must be one of the configured keys")
        for key_id, key in keys.items():
            if not key_id or len(key_id) > 32 or not set(key_id) <= _KEY_ID_CHARS:
                raise ConfigurationError(f"cursor key id {key_id!r}: 1 to 32 characters of [A-Za-z0-9._-]")
            if len(key) < MIN_KEY_BYTES:
                raise ConfigurationError(f"cursor key {key_id!r} is shorter than {MIN_KEY_BYTES} bytes")
        self._keys = dict(keys)
        self._current = current

    def _mac(self, key_id: str, office: str, jurisdiction: str, body: bytes) -> bytes:
        message = _DOMAIN + office.encode() + b"\x00" + jurisdiction.encode() + b"\x00" + body
        return hmac.digest(self._keys[key_id], message, "sha256")[:MAC_BYTES]

    def encode(self, cursor: Cursor, *, office: str, jurisdiction: str) -> str:
        key_id = self._current.encode("ascii")
        body = b"".join([bytes([VERSION, len(key_id)]), key_id, _varint(len(cursor.positions)),
                         *map(_varint, cursor.positions), *map(_varint, cursor.embargo_mark)])  # fmt: skip
        mac = self._mac(self._current, office, jurisdiction, body)
        return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode("ascii")

    def decode(self, text: str, *, office: str, jurisdiction: str) -> Cursor:
        """Raises: InvalidCursor — malformed, another version, an unknown key, or a MAC that does not match (tampered,
        another office's, another jurisdiction's). One opaque message for all."""
        if not text or len(text) > MAX_CURSOR_CHARS or not text.isascii():
            raise InvalidCursor("invalid cursor")
        try:
            data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError) as exc:
            raise InvalidCursor("invalid cursor") from exc
        if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != text:
            raise InvalidCursor("invalid cursor")  # one encoding per cursor: no padding, no stray characters
        if len(data) <= MAC_BYTES:
            raise InvalidCursor("invalid cursor")
        body, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
        reader = _Reader(body)
        if reader.byte() != VERSION:
            raise InvalidCursor("invalid cursor")
        key_id = reader.take(reader.byte()).decode("ascii", errors="replace")
        if key_id not in self._keys:
            raise InvalidCursor("invalid cursor")
        if not hmac.compare_digest(mac, self._mac(key_id, office, jurisdiction, body)):
            raise InvalidCursor("invalid cursor")
        count = reader.varint()
        if count > MAX_PARTITIONS:
            raise InvalidCursor("invalid cursor")
        positions = tuple(reader.varint() for _ in range(count))
        mark = (reader.varint(), reader.varint(), reader.varint())
        if reader.rest():
            raise InvalidCursor("invalid cursor")
        return Cursor(positions, mark)
