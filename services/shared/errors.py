"""The one exception root of Evidence Hub, and its families by origin.

    EvidenceHubError                 (http_status 500, retriable False)
    ├── InputError                   the caller sent something wrong            → 4xx, never retried
    │   ├── ValidationFailed         a model or field is malformed (422, carries field errors)
    │   ├── PayloadTooLarge          over a configured size limit (413)
    │   ├── TooManyRequests          over a per-client limit, e.g. concurrent uploads (429)
    │   ├── UnsupportedMediaType     bytes don't match the declared type (415)
    │   ├── Forbidden                authenticated, but not allowed (403)
    │   ├── DigestMismatch           bytes differ from the digest the sender announced (422)
    │   ├── UploadInterrupted        the client's upload stopped before its end (400)
    │   │   └── UploadStalled        no bytes arrived for the idle timeout (408)
    │   ├── NotFound                 no such item / version (404)
    │   ├── Conflict                 an idempotency or append race (409)
    │   ├── InvalidCursor            a feed cursor that is malformed, forged or not this caller's (400)
    │   └── RangeNotSatisfiable      a byte range outside the content (416)
    ├── TrustError                   a signature, key or envelope can't be trusted (one opaque message)
    │   ├── InvalidSignature         any way a signature can be wrong (422 at the edge)
    │   ├── UntrustedKey             unknown, expired, revoked or weak key
    │   ├── ReplayDetected           a sequence number reused by a different envelope
    │   └── InvalidProof             a Merkle proof, tile, entry or checkpoint does not match a signed tree
    ├── DecodeError                  untrusted bytes failed bounded decoding (Avro, cursor, …) (422)
    ├── PolicyError                  a policy version failed to parse, validate or verify (422)
    ├── InfrastructureError          a dependency failed                        → 503, retriable
    │   ├── KafkaUnavailable         the cluster did not accept or answer in time
    │   ├── StoreUnavailable         the content store or database failed
    │   ├── AuditUnavailable         hub.audit did not acknowledge in time: nothing is released
    │   ├── StaleView                a followed topic (keys, policy) is older than allowed
    │   ├── BrokerStartError         the embedded development broker could not start
    │   └── NotReady                 the service is up but cannot serve right now (Kafka not answering) (503)
    └── ConfigurationError           the service is misconfigured; it refuses to start (500)
        ├── StateRefused             the publisher's state is damaged, in use, or behind what Kafka holds
        └── PublisherFenced          another publisher took over the signing key on a topic

Classification lives on the classes (``http_status``, ``retriable``, ``title``): the HTTP layer turns errors
into RFC 9457 problem+json and the CLI into exit codes, and nothing else inspects them.
"""

from __future__ import annotations

from typing import Any, ClassVar


class EvidenceHubError(Exception):
    http_status: ClassVar[int] = 500
    retriable: ClassVar[bool] = False
    title: ClassVar[str] = "Internal error"
    type_slug: ClassVar[str] = "internal"

    def __init__(self, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extensions = extensions


class InputError(EvidenceHubError):
    http_status = 400
    title = "Bad request"
    type_slug = "bad-request"


class ValidationFailed(InputError):
    http_status = 422
    title = "Invalid input"
    type_slug = "validation"


class PayloadTooLarge(InputError):
    http_status = 413
    title = "Payload too large"
    type_slug = "too-large"


class TooManyRequests(InputError):
    http_status = 429
    title = "Too many requests"
    type_slug = "too-many-requests"


class UnsupportedMediaType(InputError):
    http_status = 415
    title = "Media type does not match content"
    type_slug = "media-type"


class DigestMismatch(InputError):
    http_status = 422
    title = "Content digest mismatch"
    type_slug = "digest-mismatch"


class UploadInterrupted(InputError):
    title = "Upload interrupted"
    type_slug = "upload-interrupted"


class UploadStalled(UploadInterrupted):
    http_status = 408
    title = "Upload stalled"
    type_slug = "upload-stalled"


class Forbidden(InputError):
    http_status = 403
    title = "Forbidden"
    type_slug = "forbidden"


class NotFound(InputError):
    http_status = 404
    title = "Not found"
    type_slug = "not-found"


class Conflict(InputError):
    http_status = 409
    title = "Conflict"
    type_slug = "conflict"


class InvalidCursor(InputError):
    title = "Invalid cursor"
    type_slug = "invalid-cursor"


class RangeNotSatisfiable(InputError):
    http_status = 416
    title = "Range not satisfiable"
    type_slug = "range-not-satisfiable"


class TrustError(EvidenceHubError):
    http_status = 422
    title = "Untrusted"
    type_slug = "untrusted"


class InvalidSignature(TrustError):
    title = "Invalid signature"
    type_slug = "invalid-signature"


class UntrustedKey(TrustError):
    title = "Untrusted key"
    type_slug = "untrusted-key"


class ReplayDetected(TrustError):
    title = "Replayed event"
    type_slug = "replay"


class InvalidProof(TrustError):
    """The log does not prove what it claims. ``index`` (when known) names the first entry or tile index at fault."""

    title = "Invalid proof"
    type_slug = "invalid-proof"

    def __init__(self, detail: str, *, index: int | None = None, **extensions: Any) -> None:
        super().__init__(detail, **({"index": index} if index is not None else {}), **extensions)
        self.index = index


class DecodeError(EvidenceHubError):
    http_status = 422
    title = "Undecodable input"
    type_slug = "decode"


class PolicyError(EvidenceHubError):
    http_status = 422
    title = "Invalid policy"
    type_slug = "policy"


class InfrastructureError(EvidenceHubError):
    http_status = 503
    retriable = True
    title = "Service unavailable"
    type_slug = "unavailable"


class KafkaUnavailable(InfrastructureError):
    title = "Kafka unavailable"
    type_slug = "kafka-unavailable"


class StoreUnavailable(InfrastructureError):
    title = "Store unavailable"
    type_slug = "store-unavailable"


class AuditUnavailable(KafkaUnavailable):
    title = "Audit log unavailable"
    type_slug = "audit-unavailable"


class StaleView(InfrastructureError):
    title = "Trust or policy view too old"
    type_slug = "stale-view"


class BrokerStartError(InfrastructureError):
    title = "Local Kafka broker failed to start"
    type_slug = "broker-start"


class NotReady(InfrastructureError):
    title = "Not ready"
    type_slug = "not-ready"


class ConfigurationError(EvidenceHubError):
    title = "Configuration error"
    type_slug = "configuration"


class StateRefused(ConfigurationError):
    """The publisher will not sign with this state: damaged, used by another process, or behind what Kafka holds
    (restored from an old copy, emptied, lost). The detail names what to do (docs/operations.md, recovery)."""

    title = "Publisher state refused"
    type_slug = "state-refused"


class PublisherFenced(ConfigurationError):
    """Another process acquired this signing key's transactional id on a topic: this one must stop signing."""

    title = "Publisher fenced"
    type_slug = "fenced"
