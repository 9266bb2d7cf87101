"""``evhub certs issue``: client and server certificates from the development CA (never for production).

Offices and auditors are named by a SAN URI in their certificate (``urn:evhub:office:<ID>``,
``urn:evhub:auditor:<NAME>``, see ``services.shared.principals``); services by their CN. Production certificates
come from the operator's own PKI with the same SAN URIs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from services.shared.errors import ValidationFailed
from services.shared.principals import principal_uri
from services.shared.tls import issue_leaf


def register(sub: Any) -> None:
    certs = sub.add_parser("certs", help="development certificates (mTLS)").add_subparsers(
        dest="certs_command", required=True
    )
    issue = certs.add_parser("issue", help="issue a certificate from the development CA in --dir (created if missing)")
    issue.add_argument("--dir", type=Path, required=True, help="folder of the development CA (ca.pem, ca.key)")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--office", help="an office id, e.g. DE-GBA-WCU (SAN urn:evhub:office:<ID>)")
    who.add_argument("--auditor", help="an auditor name (SAN urn:evhub:auditor:<NAME>)")
    who.add_argument("--service", help="a service or client CN without a hub principal, e.g. gateway")
    issue.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    issue.add_argument("--replace", action="store_true", help="replace an existing certificate of that name")
    issue.set_defaults(handler=run_issue)


async def run_issue(args: argparse.Namespace) -> int:
    """Raises: ValidationFailed for a malformed name or a validity outside 1 to 825 days."""
    if not 1 <= args.days <= 825:
        raise ValidationFailed("--days must be between 1 and 825")
    uris: tuple[str, ...] = ()
    try:
        if args.office:
            name, uris = f"office-{args.office}", (principal_uri("office", args.office),)
        elif args.auditor:
            name, uris = f"auditor-{args.auditor}", (principal_uri("auditor", args.auditor),)
        else:
            name = principal_uri("office", args.service).rsplit(":", 1)[1]  # same identifier rules
    except ValueError as exc:
        raise ValidationFailed(f"not a valid name: {exc}") from exc
    files = issue_leaf(args.dir, name, uris=uris, days=args.days, replace=args.replace)
    print(f"{name}: certificate {files.cert}  key {files.key}  CA {files.ca}" + (f"  ({uris[0]})" if uris else ""))
    return 0
