"""What a file name may be: one named row per refused kind, names from real archives accepted, and a property
that nothing accepted contains what the rule forbids."""

from __future__ import annotations

import unicodedata
from typing import Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.shared.errors import ValidationFailed
from services.shared.filenames import MAX_FILE_NAME_BYTES, check_file_name, normalised_file_name

REFUSED: Final = {
    "parent traversal": ("../../etc/passwd", "single path component"),
    "absolute path": ("/etc/passwd", "single path component"),
    "windows path": ("C:\\evidence\\x.jpg", ":"),
    "backslash component": ("..\\x.jpg", "single path component"),
    "dot": (".", "'.' and '..'"),
    "dot dot": ("..", "'.' and '..'"),
    "NUL": ("photo\x00.jpg", "U+0000 (Cc)"),
    "newline": ("photo\n.jpg", "U+000A (Cc)"),
    "DEL": ("photo\x7f.jpg", "U+007F (Cc)"),
    "C1 control": ("photo\x85.jpg", "U+0085 (Cc)"),
    "right-to-left override (photoexe.png)": ("photo\u202egnp.exe", "U+202E (Cf)"),
    "left-to-right embedding": ("\u202aphoto.jpg", "U+202A (Cf)"),
    "first strong isolate": ("photo\u2068.jpg", "U+2068 (Cf)"),
    "pop directional isolate": ("photo\u2069.jpg", "U+2069 (Cf)"),
    "right-to-left mark": ("photo\u200f.jpg", "U+200F (Cf)"),
    "left-to-right mark": ("photo\u200e.jpg", "U+200E (Cf)"),
    "zero-width space": ("pho\u200bto.jpg", "U+200B (Cf)"),
    "byte order mark": ("\ufeffphoto.jpg", "U+FEFF (Cf)"),
    "line separator": ("photo\u2028.jpg", "U+2028 (Zl)"),
    "lone surrogate": ("photo\ud800.jpg", "U+D800 (Cs)"),
    "unassigned code point": ("photo\U000e0080.jpg", "(Cn)"),
    "private use": ("photo\ue000.jpg", "U+E000 (Co)"),
    "NTFS alternate data stream": ("photo.jpg:hidden.exe", "':'"),
    "wildcard": ("photo*.jpg", "'*'"),
    "leading space": (" photo.jpg", "whitespace"),
    "trailing space": ("photo.jpg ", "whitespace"),
    "trailing dot": ("photo.jpg.", "end with '.'"),
    "empty": ("", "empty"),
    "windows device": ("NUL.txt", "device name"),
    "windows device, lower case": ("com1", "device name"),
    "256 bytes": ("a" * 252 + ".jpg", f"{MAX_FILE_NAME_BYTES} bytes"),
    "255 characters, more bytes": ("ص" * 200 + ".jpg", f"{MAX_FILE_NAME_BYTES} bytes"),
}  # fmt: skip


@pytest.mark.parametrize(("name", "why"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_with_the_field_and_the_reason(name: str, why: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        check_file_name(name, field="file.filename")
    [error] = caught.value.extensions["errors"]
    assert error["field"] == "file.filename"
    assert why in error["message"]


ACCEPTED: Final = {
    "plain": ("IMG_4711.jpg", "IMG_4711.jpg"),
    "spaces inside": ("Detention facility 227 - frame 14.jpg", "Detention facility 227 - frame 14.jpg"),
    "arabic": ("صورة المعتقل ٢٢٧.jpg", "صورة المعتقل ٢٢٧.jpg"),
    "cyrillic": ("Свидетельство №4.pdf", "Свидетельство №4.pdf"),
    "hidden file": (".metadata.json", ".metadata.json"),
    "decomposed é becomes composed": ("te\u0301moignage.wav", "t\u00e9moignage.wav"),
    "255 bytes": ("a" * 251 + ".jpg", "a" * 251 + ".jpg"),
    "device name inside a word": ("console.log", "console.log"),
}


@pytest.mark.parametrize(("name", "kept"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_names_are_kept_in_nfc(name: str, kept: str) -> None:
    assert check_file_name(name) == kept


@given(st.text(min_size=0, max_size=80))
def test_an_accepted_name_holds_nothing_the_rule_forbids(name: str) -> None:
    try:
        kept = normalised_file_name(name)
    except ValueError:
        return
    assert kept == unicodedata.normalize("NFC", kept) == normalised_file_name(kept)
    assert 0 < len(kept.encode("utf-8")) <= MAX_FILE_NAME_BYTES
    assert kept not in {".", ".."}
    assert kept == kept.strip()
    assert not kept.endswith(".")
    assert not any(unicodedata.category(c) in {"Cc", "Cf", "Cs", "Cn", "Co", "Zl", "Zp"} for c in kept)
    assert not set(kept) & set('/\\<>:"|?*')
