"""What an evidence file may be called: the one definition, used by the publisher and by ``evhub publish``.

A file name is signed into events that are kept forever, and prosecution offices' tools may save downloads under
it, on any operating system. So a name is accepted only if it is safe to use as one path component everywhere:

- NFC-normalised (the normalised form is what is kept and signed), 1 to :data:`MAX_FILE_NAME_BYTES` bytes of UTF-8
  (the common file-system limit, ext4's and NTFS's);
- a single path component: no ``/`` or ``\\``, not ``.`` or ``..``, and none of the characters Windows refuses in
  a name (``< > : " | ? *``; ``:`` would name an NTFS alternate data stream);
- no control characters (Unicode category Cc: NUL, newline, DEL …), no format characters (Cf: the bidirectional
  overrides and isolates U+202A to U+202E and U+2066 to U+2069, U+200E/U+200F, zero-width characters, U+FEFF …), no line
  or paragraph separators (Zl, Zp), no surrogates, unassigned or private-use code points (Cs, Cn, Co) — so that a
  name displays as what it is (``photo<U+202E>gnp.exe`` would display as ``photoexe.png``);
- no leading or trailing whitespace, no trailing ``.`` (Windows drops both), and not a Windows device name
  (``CON``, ``NUL``, ``COM1`` …, with or without an extension).

Pure: no I/O. Does not own: where a file is stored (by digest, ``content``), or its media type (``media``).
"""

from __future__ import annotations

import unicodedata
from typing import Final

from services.shared.errors import ValidationFailed

MAX_FILE_NAME_BYTES: Final = 255
_REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Cn", "Co", "Zl", "Zp"})
_WINDOWS_RESERVED: Final = frozenset('<>:"|?*')
_DEVICE_NAMES: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789¹²³")}
)


def _problem(name: str) -> str | None:
    """Why ``name`` (already NFC) is not an acceptable file name, or None."""
    if not name:
        return "a file name cannot be empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES:
        return f"a file name has at most {MAX_FILE_NAME_BYTES} bytes in UTF-8"
    for index, char in enumerate(name):
        category = unicodedata.category(char)
        if category in _REFUSED_CATEGORIES:
            return f"character {index + 1} is U+{ord(char):04X} ({category}), which a file name may not contain"
        if char in "/\\":
            return "a file name is a single path component: no '/' or '\\'"
        if char in _WINDOWS_RESERVED:
            return f"character {index + 1} is {char!r}, which a file name may not contain"
    if name in {".", ".."}:
        return "'.' and '..' are not file names"
    if name != name.strip():
        return "a file name may not begin or end with whitespace"
    if name.endswith("."):
        return "a file name may not end with '.'"
    if name.split(".", 1)[0].rstrip().upper() in _DEVICE_NAMES:
        return f"{name.split('.', 1)[0]!r} is a device name on Windows"
    return None


def normalised_file_name(name: str) -> str:
    """The NFC form of ``name`` if it is an acceptable file name (for pydantic validators).

    Raises:
        ValueError: saying why it is not.
    """
    normal = unicodedata.normalize("NFC", name)
    problem = _problem(normal)
    if problem is not None:
        raise ValueError(problem)
    return normal


def check_file_name(name: str, *, field: str = "file_name") -> str:
    """The NFC form of ``name`` if it is an acceptable file name.

    Raises:
        ValidationFailed: naming ``field`` and saying why (HTTP 422; the CLI's exit 2).
    """
    try:
        return normalised_file_name(name)
    except ValueError as exc:
        raise ValidationFailed(
            f"the file name is not acceptable: {exc}", errors=[{"field": field, "message": str(exc)}]
        ) from None
