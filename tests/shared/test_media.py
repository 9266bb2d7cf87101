"""Media types come from the bytes: real magic numbers, and whether a declared type agrees with them."""

from __future__ import annotations

from typing import Final

import pytest

from services.shared.media import HEAD_BYTES, OCTET_STREAM, agrees, sniff

# Real file beginnings (first bytes of actual files of each format), padded with what usually follows.
MAGIC: Final[list[tuple[str, bytes, str]]] = [
    ("jpeg_jfif", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01", "image/jpeg"),
    ("jpeg_exif", b"\xff\xd8\xff\xe1\x1b\xfeExif\x00\x00MM", "image/jpeg"),
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png"),
    ("gif87a", b"GIF87a\x01\x00\x01\x00", "image/gif"),
    ("gif89a", b"GIF89a\x01\x00\x01\x00\x80", "image/gif"),
    ("tiff_little_endian", b"II*\x00\x08\x00\x00\x00", "image/tiff"),
    ("tiff_big_endian", b"MM\x00*\x00\x00\x00\x08", "image/tiff"),
    ("webp", b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
    ("wav", b"RIFF\x24\x08\x00\x00WAVEfmt ", "audio/wav"),
    ("avi", b"RIFF\x00\x10\x00\x00AVI LIST", "video/x-msvideo"),
    ("riff_unknown_form", b"RIFF\x00\x10\x00\x00XXXXLIST", OCTET_STREAM),
    ("heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "image/heic"),
    ("heif_mif1", b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00", "image/heif"),
    ("avif", b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "image/avif"),
    ("mp4_isom", b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00", "video/mp4"),
    ("mp4_iphone_mp42", b"\x00\x00\x00\x1cftypmp42\x00\x00\x00\x00", "video/mp4"),
    ("quicktime", b"\x00\x00\x00\x14ftypqt  \x20\x05\x03\x00", "video/quicktime"),
    ("m4a", b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00", "audio/mp4"),
    ("3gp", b"\x00\x00\x00\x18ftyp3gp4\x00\x00\x02\x00", "video/3gpp"),
    ("matroska_webm", b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01", "video/x-matroska"),
    ("ogg", b"OggS\x00\x02\x00\x00\x00\x00", "audio/ogg"),
    ("flac", b"fLaC\x00\x00\x00\x22", "audio/flac"),
    ("mp3_id3", b"ID3\x04\x00\x00\x00\x00\x00\x23", "audio/mpeg"),
    ("mp3_frame_sync", b"\xff\xfb\x90\x64\x00", "audio/mpeg"),
    ("pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "application/pdf"),
    ("zip_docx", b"PK\x03\x04\x14\x00\x06\x00\x08\x00", "application/zip"),
    ("gzip", b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "application/gzip"),
    ("ole_doc", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00\x00", "application/x-ole-storage"),
    ("json", b'  {"case": "DE-2024-17"}', "application/json"),
    ("json_array", b"[1, 2]", "application/json"),
    ("xml", b'<?xml version="1.0"?><a/>', "application/xml"),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "application/xml"),
    ("utf8_text", "Zeugenaussage — Ольга\n".encode(), "text/plain"),
    ("csv", b"id,sha256\n1,ab\n", "text/plain"),
    ("nul_byte_is_binary", b"abc\x00def", OCTET_STREAM),
    ("invalid_utf8_is_binary", b"\xfe\xfeabcdefgh", OCTET_STREAM),
    ("empty", b"", OCTET_STREAM),
    ("unknown_binary", b"\x00\x01\x02\x03\x04", OCTET_STREAM),
]


@pytest.mark.parametrize(("head", "media_type"), [row[1:] for row in MAGIC], ids=[row[0] for row in MAGIC])
def test_sniff_real_magic_numbers(head: bytes, media_type: str) -> None:
    assert sniff(head) == media_type


def test_a_multibyte_character_cut_at_the_head_boundary_is_still_text() -> None:
    head = ("a" * (HEAD_BYTES - 1) + "Ж").encode()[:HEAD_BYTES]  # "Ж" is 2 bytes: only its first byte is in the head
    assert len(head) == HEAD_BYTES
    assert sniff(head) == "text/plain"


def test_only_the_head_is_looked_at() -> None:
    assert sniff(b"a" * HEAD_BYTES + b"\x00\x00\x00\x00binary after the head") == "text/plain"


AGREES: Final[list[tuple[str, str, str, bool]]] = [
    ("same_type", "image/jpeg", "image/jpeg", True),
    ("case_and_parameters_ignored", "Image/JPEG; q=0.9", "image/jpeg", True),
    ("docx_is_a_zip", "application/vnd.openxmlformats-officedocument.wordprocessingml.document", "application/zip",
     True),
    ("epub_is_a_zip", "application/epub+zip", "application/zip", True),
    ("word_97_is_ole", "application/msword", "application/x-ole-storage", True),
    ("csv_is_text", "text/csv; charset=utf-8", "text/plain", True),
    ("svg_is_xml", "image/svg+xml", "application/xml", True),
    ("mp4_audio_video", "video/mp4", "audio/mp4", True),
    ("webm_is_matroska", "video/webm", "video/x-matroska", True),
    ("ogg_video", "video/ogg", "audio/ogg", True),
    ("jpeg_declared_as_pdf", "application/pdf", "image/jpeg", False),
    ("pdf_declared_as_jpeg", "image/jpeg", "application/pdf", False),
    ("png_declared_as_jpeg", "image/jpeg", "image/png", False),
    ("zip_declared_as_pdf", "application/pdf", "application/zip", False),
    ("text_declared_as_zip", "application/zip", "text/plain", False),
    ("docx_claim_for_ole_file", "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
     "application/x-ole-storage", False),
    ("family_is_one_way", "application/zip", "application/vnd.oasis.opendocument.text", False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("declared", "detected", "expected"), [row[1:] for row in AGREES], ids=[row[0] for row in AGREES]
)
def test_agrees(declared: str, detected: str, expected: bool) -> None:
    assert agrees(declared, detected) is expected


def test_a_jpeg_declared_as_pdf_disagrees_with_its_bytes() -> None:
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(100)
    assert not agrees("application/pdf", sniff(jpeg))
    assert agrees("image/jpeg", sniff(jpeg))
