"""The shape STYLE.md asks for: pure cores that do no I/O, and one import root."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = [
    "services/publisher/core.py",
    "services/publisher/decide.py",
    "services/publisher/ledger.py",
    "services/shared/keys.py",
    "services/shared/disclosure.py",
    "services/shared/media.py",
    "services/shared/registry.py",
    "services/shared/envelope.py",
    "services/shared/audit_records.py",
    "services/shared/filenames.py",
    "services/shared/kafka_acls.py",
    "services/policy/attributes.py",
    "services/audit/merkle.py",
    "services/audit/tiles.py",
    "services/audit/note.py",
    "services/audit/checkpoint.py",
    "services/audit/verify.py",
    "services/audit/log.py",
    "services/audit/integrity.py",
    "services/cli/redecision.py",
    "services/cli/audit_report.py",
    "services/shared/principals.py",
    "services/shared/sequences.py",
    "services/gateway/cursor.py",
    "services/gateway/release.py",
    "services/gateway/ranges.py",
    "services/gateway/sse.py",
]
#: The policy *library* the gateway embeds (never the policy service's HTTP shell or its Kafka publishing).
POLICY_LIBRARY = {"model", "engine", "compiled", "version", "attributes", "state"}
FORBIDDEN = {"asyncio", "aiohttp", "aiokafka", "os", "time", "socket", "subprocess", "sqlite3", "random", "secrets"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_cores_do_no_io_and_read_no_clock(module: str) -> None:
    assert _imports(ROOT / module) & FORBIDDEN == set()


def test_nothing_reads_the_environment_outside_settings() -> None:
    offenders = []
    for path in (ROOT / "services").rglob("*.py"):
        text = path.read_text()
        if ("os.environ" in text or "os.getenv" in text) and path.name not in {"local_kafka.py", "supervise.py"}:
            offenders.append(str(path.relative_to(ROOT)))
    # local_kafka reads XDG_CACHE_HOME for a default path; supervise passes the environment on to a child process
    assert offenders == []


def test_importing_every_service_does_no_io_at_import_time() -> None:
    code = (
        "import socket\n"
        "def refuse(*a, **k):\n    raise SystemExit('network I/O at import time')\n"
        "socket.socket.connect = socket.socket.bind = socket.socket.connect_ex = refuse\n"
        "import services.publisher.service, services.policy.service, services.cli.main, services.shared.cluster\n"
        "import services.audit.service, services.gateway.service, services.gateway.__main__\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert run.stdout.strip() == "ok", run.stderr


def _service_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("services."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("services.")}
    return found


@pytest.mark.parametrize("service", ["publisher", "policy", "gateway", "audit"])
def test_services_depend_on_shared_and_the_gateway_only_on_the_policy_library(service: str) -> None:
    offenders = []
    for path in (ROOT / "services" / service).rglob("*.py"):
        for module in _service_imports(path):
            parts = module.split(".")
            allowed = parts[1] in {"shared", service} or (
                service == "gateway" and parts[1] == "policy" and len(parts) > 2 and parts[2] in POLICY_LIBRARY
            )
            if not allowed:
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert offenders == []


@pytest.mark.parametrize(
    ("module", "env", "message"),
    [
        ("services.publisher", {}, "TLS is required"),
        ("services.publisher", {"EVHUB_PUBLISHER_UNSAFE_PLAINTEXT": "true"}, "EVHUB_KAFKA_BOOTSTRAP is required"),
        ("services.policy", {}, "EVHUB_KAFKA_BOOTSTRAP is required"),
        ("services.policy", {"EVHUB_KAFKA_BOOTSTRAP": "127.0.0.1:9"}, "TLS is required"),
        (
            "services.publisher",
            {"EVHUB_PUBLISHER_TLS_CERT": "c.pem", "EVHUB_PUBLISHER_TLS_KEY": "k.pem", "EVHUB_PUBLISHER_TLS_CA": ""},
            "TLS_CA is missing or empty",
        ),
        (
            "services.publisher",
            {
                "EVHUB_PUBLISHER_TLS_CERT": "c.pem",
                "EVHUB_PUBLISHER_TLS_KEY": "k.pem",
                "EVHUB_PUBLISHER_TLS_CA": "nowhere.pem",
                "EVHUB_PUBLISHER_ALLOWED_CLIENTS": '["a"]',
            },
            "cannot load the client CA nowhere.pem",
        ),
        (
            "services.publisher",
            {"EVHUB_PUBLISHER_UNSAFE_PLAINTEXT": "true", "EVHUB_PUBLISHER_HOST": "0.0.0.0"},
            "allowed only on a loopback address",
        ),
        ("services.audit", {}, "EVHUB_KAFKA_BOOTSTRAP is required"),
        ("services.audit", {"EVHUB_KAFKA_BOOTSTRAP": "127.0.0.1:9"}, "TLS is required"),
        (
            "services.audit",
            {"EVHUB_KAFKA_BOOTSTRAP": "127.0.0.1:9", "EVHUB_AUDIT_UNSAFE_PLAINTEXT": "true"},
            "needs its signing key",
        ),
        (
            "services.audit",
            {
                "EVHUB_KAFKA_BOOTSTRAP": "127.0.0.1:9",
                "EVHUB_AUDIT_UNSAFE_PLAINTEXT": "true",
                "EVHUB_AUDIT_ORIGIN": "has space",
            },
            "key name",
        ),
    ],
    ids=[
        "publisher-no-tls",
        "publisher-no-kafka",
        "policy-no-kafka",
        "policy-no-tls",
        "publisher-empty-ca",
        "publisher-unreadable-ca",
        "publisher-plaintext-not-loopback",
        "audit-no-kafka",
        "audit-no-tls",
        "audit-no-key",
        "audit-bad-origin",
    ],
)
def test_a_misconfigured_service_exits_non_zero_with_one_clear_line(
    tmp_path: Path, module: str, env: dict[str, str], message: str
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", module], capture_output=True, text=True, cwd=tmp_path, check=False, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
    )  # fmt: skip
    assert run.returncode != 0
    assert message in run.stderr
    assert "Traceback" not in run.stderr
