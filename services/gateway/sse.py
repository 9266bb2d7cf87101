"""Server-Sent Events framing (the WHATWG ``text/event-stream`` format) for feed events.

Owns: turning one event (type, id, JSON data) into its bytes, so that a batch of events is written to the socket
at once rather than one write per event. Ids and types are checked for line breaks (they come from our own
cursor and type names, so a failure is a bug); JSON data has none (``json.dumps`` escapes them). Pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def frame(event: str, data: Mapping[str, Any], *, event_id: str | None = None) -> bytes:
    """``event: <type>\\nid: <id>\\ndata: <json>\\n\\n``.

    Raises:
        ValueError: a line break or NUL in the type or id.
    """
    for value in (event, event_id or ""):
        if any(c in value for c in "\r\n\0"):
            raise ValueError("SSE field with a line break")
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=True)
    lines = [f"event: {event}"] + ([f"id: {event_id}"] if event_id is not None else []) + [f"data: {text}", "", ""]
    return "\n".join(lines).encode("ascii")


def frame_json(event: str, text: str, *, event_id: str | None = None) -> bytes:
    """Like :func:`frame`, for data that is JSON text already (ASCII, one line).

    Raises:
        ValueError: a line break or NUL in the type, id or data, or data that is not ASCII.
    """
    for value in (event, event_id or "", text):
        if any(c in value for c in "\r\n\0"):
            raise ValueError("SSE field with a line break")
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return (head + f"data: {text}\n\n").encode("ascii")


def comment(text: str) -> bytes:
    """A comment line (ignored by clients; a keep-alive)."""
    return f": {text.replace(chr(10), ' ').replace(chr(13), ' ')}\n\n".encode()
