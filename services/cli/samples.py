"""Generated sample evidence for ``make demo`` and the tests: small files with real formats, realistic metadata.

No real evidence, names or places of real people: every value is invented. The files are valid PNG, PDF, WAV and
UTF-8 text so that media-type detection from the bytes is exercised for real.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any


def png(width: int = 8, height: int = 8, seed: int = 0) -> bytes:
    """A valid greyscale PNG with a seed-dependent gradient (different seeds → different bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    rows = b"".join(b"\x00" + bytes((seed * 7 + x + 2 * y) % 256 for x in range(width)) for y in range(height))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x00\x00\x00\x00"
    # the gradient repeats every 256 seeds; the text chunk keeps "different seeds → different bytes" true for all
    seed_text = chunk(b"tEXt", b"seed\x00" + str(seed).encode())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + seed_text + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))  # fmt: skip


def pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` (ASCII)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text.encode('ascii', 'replace').decode()}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def wav(seconds: float = 0.5, rate: int = 8000, seed: int = 0) -> bytes:
    """Mono 8-bit PCM WAV of a seed-dependent saw tone."""
    samples = bytes(((i * (seed + 3)) % 256) for i in range(int(seconds * rate)))
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate, 1, 8)
    return (b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(samples)) + samples)  # fmt: skip


CASES = {  # the case ids the sample policy pack (policies/offices.json) assigns to the demo offices
    "CASE-SY-001": ["DE", "FR", "SE"],
    "CASE-SY-002": ["DE"],
    "CASE-SY-003": ["FR", "SE"],
}


def write_sample(folder: Path, *, photos_per_case: int = 3) -> Path:
    """Write sample files and a ``manifest.json`` describing them into ``folder``; return the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for c, (case, jurisdictions) in enumerate(CASES.items()):
        for n in range(photos_per_case):
            name = f"{case.lower()}-photo-{n + 1:03d}.png"
            (folder / name).write_bytes(png(64, 48, seed=c * 100 + n))
            rows.append({
                "file": name, "item_id": f"SDG-{c + 1}-PHOTO-{n + 1:04d}", "case_ids": [case],
                "jurisdictions": jurisdictions, "kind": "PHOTOGRAPH",
                "title": f"Detention facility photograph {n + 1} ({case})",
                "captured_at": "2013-03-02T09:15:00Z", "device": "camera-A", "region": "governorate (coarse)",
                "classification": "CONFIDENTIAL" if n else "RESTRICTED", "sensitivity": ["GRAPHIC"],
                "custody": [{"at": "2014-01-15T12:00:00Z", "actor": "archive", "action": "ingested and hashed"}],
                "sharing": {"purposes": ["prosecution"]},
                "protected": [{"field": "victim.identity", "label": "VICTIM_IDENTIFYING", "value": f"detainee #{n}"}],
            })  # fmt: skip
        statement = f"{case.lower()}-witness-statement.pdf"
        (folder / statement).write_bytes(pdf(f"Witness statement for {case} (invented sample text)"))
        rows.append({
            "file": statement, "item_id": f"SDG-{c + 1}-TESTIMONY-0001", "case_ids": [case],
            "jurisdictions": jurisdictions, "kind": "TESTIMONY", "title": f"Witness statement ({case})",
            "classification": "SECRET", "sensitivity": ["WITNESS_IDENTIFYING"],
            "sharing": {"allowed_jurisdictions": jurisdictions, "purposes": ["prosecution"],
                        "consent_reference": f"CONSENT-{c + 1:03d}"},
            "protected": [{"field": "witness.name", "label": "WITNESS_IDENTIFYING", "value": "invented name"},
                          {"field": "witness.location", "label": "LOCATION_EXACT", "value": "invented place"}],
        })  # fmt: skip
        audio = f"{case.lower()}-interview.wav"
        (folder / audio).write_bytes(wav(seed=c))
        rows.append({"file": audio, "item_id": f"SDG-{c + 1}-AUDIO-0001", "case_ids": [case],
                     "jurisdictions": jurisdictions, "kind": "AUDIO", "title": f"Interview recording ({case})",
                     "classification": "CONFIDENTIAL",
                     "sharing": {"embargo_until": "2030-01-01T00:00:00Z"}})  # fmt: skip
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return manifest
