"""Media types detected from the bytes, never from a file name.

Owns: recognising the formats evidence arrives in (images, video, audio, documents, archives, text) from the first
bytes of a file, and whether a declared type agrees with what the bytes are. Pure; bounded: only the first
``HEAD_BYTES`` bytes are looked at.
"""

from __future__ import annotations

from typing import Final

HEAD_BYTES: Final = 4096
OCTET_STREAM: Final = "application/octet-stream"

_PREFIXES: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"%PDF-", "application/pdf"),
    (b"\x1a\x45\xdf\xa3", "video/x-matroska"),
    (b"OggS", "audio/ogg"),
    (b"fLaC", "audio/flac"),
    (b"ID3", "audio/mpeg"),
    (b"PK\x03\x04", "application/zip"),
    (b"\x1f\x8b", "application/gzip"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
)
_FTYP_BRANDS: Final = {
    b"qt  ": "video/quicktime", b"heic": "image/heic", b"heix": "image/heic", b"mif1": "image/heif",
    b"avif": "image/avif", b"M4A ": "audio/mp4", b"3gp4": "video/3gpp", b"3gp5": "video/3gpp",
}  # fmt: skip


def sniff(head: bytes) -> str:
    """The media type of content starting with ``head`` (OCTET_STREAM when unknown)."""
    head = head[:HEAD_BYTES]
    for prefix, media_type in _PREFIXES:
        if head.startswith(prefix):
            return media_type
    if head[:4] == b"RIFF" and len(head) >= 12:
        return {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/x-msvideo"}.get(head[8:12], OCTET_STREAM)
    if head[4:8] == b"ftyp" and len(head) >= 12:
        return _FTYP_BRANDS.get(head[8:12], "video/mp4")
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "audio/mpeg"
    return _text_type(head)


def _text_type(head: bytes) -> str:
    if not head:
        return OCTET_STREAM
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a multi-byte character cut by the head boundary
            return OCTET_STREAM
        text = head[: exc.start].decode("utf-8")
    if any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return OCTET_STREAM
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        return "application/json"
    if stripped.lower().startswith(("<?xml", "<svg")):
        return "application/xml"
    return "text/plain"


_FAMILIES: Final = {
    "application/zip": {  # OOXML, ODF and EPUB are zip containers
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/vnd.oasis.opendocument.text", "application/epub+zip",
    },
    "application/x-ole-storage": {"application/msword", "application/vnd.ms-excel"},
    "text/plain": {"text/csv", "text/markdown"},
    "application/xml": {"image/svg+xml", "text/xml"},
    "video/x-matroska": {"video/webm", "audio/webm"},  # WebM is Matroska: same EBML magic
    "audio/ogg": {"video/ogg", "application/ogg"},  # Ogg is a container; "OggS" does not say audio or video
    "audio/mp4": {"video/mp4"},
    "video/mp4": {"audio/mp4"},
}  # fmt: skip


def agrees(declared: str, sniffed: str) -> bool:
    """Whether a declared media type is consistent with the detected one (parameters ignored)."""
    declared = declared.split(";")[0].strip().lower()
    return declared == sniffed or declared in _FAMILIES.get(sniffed, set())
