"""Reading a ``text/event-stream`` (Server-Sent Events, WHATWG HTML §9.2) incrementally, with bounds.

Owns: turning the bytes of a stream, in whatever chunks they arrive, into messages (``event`` type, ``id``,
``data``), as the specification says — lines end in LF, CRLF or CR; ``field: value`` with one optional space
after the colon; several ``data`` lines joined by LF; a line starting with ``:`` is a comment; a blank line
dispatches; a message without data is not dispatched. The server is not trusted: a line or a message longer than
``max_message_bytes`` is refused (:class:`~services.shared.errors.DecodeError`) before it is held in memory.

Pure: no I/O. Does not own: what a message means (``subscription``), the connection (``subscribe_cmd``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from services.shared.errors import DecodeError

DEFAULT_MAX_MESSAGE_BYTES: Final = 8 << 20


@dataclass(frozen=True)
class Message:
    event: str
    data: str
    id: str | None


class EventStreamDecoder:
    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._max = max_message_bytes
        self._buffer = bytearray()
        self._skip_lf = False
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        self._id: str | None = None
        #: The last event id seen (the ``Last-Event-ID`` to resume with), kept across messages as the spec says.
        self.last_id: str | None = None

    def feed(self, chunk: bytes) -> list[Message]:
        """The messages completed by ``chunk``.

        Raises:
            DecodeError: a line or message over the bound, or a line that is not UTF-8.
        """
        out: list[Message] = []
        data = bytes(chunk)
        if self._skip_lf and data.startswith(b"\n"):
            data = data[1:]
        self._skip_lf = False
        self._buffer += data
        start = 0
        while True:
            cr, lf = self._buffer.find(b"\r", start), self._buffer.find(b"\n", start)
            ends = [i for i in (cr, lf) if i >= 0]
            if not ends:
                break
            end = min(ends)
            line = bytes(self._buffer[start:end])
            start = end + 1
            if self._buffer[end] == 0x0D:  # CR: a CRLF counts once, even when the LF is in the next chunk
                if start < len(self._buffer):
                    if self._buffer[start] == 0x0A:
                        start += 1
                else:
                    self._skip_lf = True
            message = self._line(line)
            if message is not None:
                out.append(message)
        del self._buffer[:start]
        if len(self._buffer) > self._max:
            raise DecodeError(f"an event-stream line longer than {self._max} bytes")
        return out

    def _line(self, raw: bytes) -> Message | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("an event-stream line that is not UTF-8") from exc
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._size += len(value) + 1
            if self._size > self._max:
                raise DecodeError(f"an event-stream message larger than {self._max} bytes")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None  # "retry" and unknown fields are ignored

    def _dispatch(self) -> Message | None:
        if self._id is not None:
            self.last_id = self._id
        message = Message(self._event or "message", "\n".join(self._data), self._id) if self._data else None
        self._event, self._data, self._size, self._id = "", [], 0, None
        return message
