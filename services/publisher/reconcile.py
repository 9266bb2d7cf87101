"""Reading an evidence topic back to establish what this key signed there (the shell around ``ledger``).

Owns: the bounded scan. Per partition it reads, with a read_committed consumer, from the offset this state has
already checked (``state.kafka_checked``; 0 for a new or lost state) up to the partition's high watermark taken at
the start of the scan — so it also waits for other producers' open transactions below that mark to end, never
skipping a committed record hidden behind one. Records of this key are looked up in the state in batches and fed to
:class:`ledger.TopicLedger`. Then either the verdict refuses the state, or the delivery marks found and the new
checked offsets are written in one transaction.

Why from the checked offsets and not from 0: every record of this key below them is in this state's outbox (the
state recorded them, or a previous scan checked them), and a copy of the state can only lack what was signed after
it was taken — which Kafka placed after every offset the copy knows. So a restart reads only what arrived since the
last delivery, and a state restored from a backup reads from where the backup stopped. A new, emptied or lost state
reads the whole topic; that is bounded by ``timeout_s`` (its cost per record is measured in docs/reliability.md) and
``evhub publisher recover`` does the same without a deadline.

Does not own: the decisions (``ledger``), fencing (``outbox`` scans only once it holds the key's fence on the topic,
so nothing of this key can be written behind the scan's back).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError

from services.publisher import state
from services.publisher.committer import GroupCommitter
from services.publisher.ledger import Found, TopicLedger, claimed
from services.shared.avro import AvroCodec
from services.shared.errors import KafkaUnavailable, StateRefused
from services.shared.kafka import make_consumer, partitions_of
from services.shared.kafka_connection import Kafka
from services.shared.keys import PublicKey

log = logging.getLogger(__name__)
#: Consumer options for scanning: large fetches (envelopes are up to 1 MiB; most are ~2 KiB).
SCAN_OPTIONS = {"max_partition_fetch_bytes": 4 << 20, "fetch_max_bytes": 32 << 20, "auto_offset_reset": "none"}


@dataclass(frozen=True)
class Scan:
    ledger: TopicLedger
    ends: dict[int, int]  # per partition: the offset the scan read up to (the high watermark at its start)
    seconds: float


async def scan(
    *, bootstrap: Kafka, topic: str, codec: AvroCodec, key: PublicKey, committer: GroupCommitter, timeout_s: float,
    from_offsets: dict[int, int] | None = None,
    adopt: Callable[[list[Found]], Awaitable[None]] | None = None,
) -> Scan:  # fmt: skip
    """Read ``topic`` from this state's checked offsets (or ``from_offsets``) to the end and feed the ledger.
    ``adopt`` (recovery) takes each batch's envelopes of this key that the state lacks, instead of the ledger
    keeping them all in memory.

    Raises:
        KafkaUnavailable: the cluster did not answer, or the scan did not finish within ``timeout_s``.
        StateRefused: records this state had checked are gone (the topic was deleted, recreated or truncated).
    """
    began = time.monotonic()
    key_id = key.key_id
    checked = await committer.run(lambda conn: state.checked_offsets(conn, topic))
    counter = await committer.run(lambda conn: state.counter(conn, key_id, topic))
    starts = checked if from_offsets is None else from_offsets
    ledger = TopicLedger(topic=topic, key=key, counter=counter)
    partitions = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    consumer = make_consumer(bootstrap, group_id=None, client_id=f"evhub-publisher-scan-{topic}", **SCAN_OPTIONS)
    ends: dict[TopicPartition, int] = {}
    try:
        await consumer.start()
        consumer.assign(partitions)
        first = await consumer.beginning_offsets(partitions)
        for tp in partitions:
            start = starts.get(tp.partition, 0)
            if start < first[tp]:
                raise StateRefused(f"{topic} partition {tp.partition} no longer holds records below offset {first[tp]}"
                                   f" (this state checked up to {start}): evidence was deleted from Kafka, so what "
                                   "this key signed cannot be established")  # fmt: skip
            consumer.seek(tp, start)
        deadline = began + timeout_s
        while True:
            batch = await consumer.getmany(*partitions, timeout_ms=200, max_records=2000)
            for tp in partitions:
                if tp not in ends and (hw := consumer.highwater(tp)) is not None:
                    if hw < starts.get(tp.partition, 0):
                        raise StateRefused(f"{topic} partition {tp.partition} ends at offset {hw}, before offset "
                                           f"{starts.get(tp.partition, 0)} this state already checked: the topic "
                                           "was deleted or recreated, so what this key signed cannot be "
                                           "established")  # fmt: skip
                    ends[tp] = hw
            found = [
                f for tp, records in batch.items() for r in records
                if (f := claimed(codec, key_id, tp.partition, r.offset, r.value, r.key)) is not None
            ]  # fmt: skip
            ledger.records += sum(len(records) for records in batch.values())
            if found:
                held = await committer.run(_lookup(key_id, topic, found))
                for f in found:
                    ledger.observe(f, held.get(f.sequence))
                if adopt is not None and ledger.unknown:
                    ledger.adopted += len(ledger.unknown)
                    await adopt(ledger.unknown)
                    ledger.unknown = []
            if len(ends) == len(partitions) and await _reached(consumer, ends):
                break
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"could not read {topic} back within {timeout_s:.0f}s to establish what this key signed there "
                    f"({ledger.records} records read); `evhub publisher recover` has no deadline"
                )
    except OffsetOutOfRangeError as exc:
        raise StateRefused(f"{topic} no longer holds offsets this state checked ({exc}): the topic was deleted or "
                           "recreated, so what this key signed cannot be established") from exc  # fmt: skip
    except KafkaError as exc:
        raise KafkaUnavailable(f"Kafka at {bootstrap} did not answer while reading {topic} back: {exc!r}") from exc
    finally:
        await consumer.stop()
    seconds = time.monotonic() - began
    ours = ledger.known + len(ledger.unknown) + ledger.adopted + len(ledger.conflicts)
    log.info("read back %s: %d records, %d of this key (%d known, %d forged) in %.2fs",
             topic, ledger.records, ours, ledger.known, ledger.forged, seconds)  # fmt: skip
    return Scan(ledger, {tp.partition: end for tp, end in ends.items()}, seconds)


def _lookup(key_id: str, topic: str, found: list[Found]) -> Callable[[sqlite3.Connection], dict[int, state.OutboxRow]]:
    return lambda conn: state.signed(conn, key_id, topic, [f.sequence for f in found])


async def _reached(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


async def establish(
    *, bootstrap: Kafka, topic: str, codec: AvroCodec, key: PublicKey, committer: GroupCommitter, timeout_s: float
) -> TopicLedger:
    """Scan, refuse a state Kafka contradicts, else write the marks found and the new checked offsets.

    Raises:
        StateRefused: the state is behind Kafka or in conflict with it, or checked records are gone.
        KafkaUnavailable: as :func:`scan`.
    """
    result = await scan(bootstrap=bootstrap, topic=topic, codec=codec, key=key, committer=committer,
                        timeout_s=timeout_s)  # fmt: skip
    ledger = result.ledger
    ledger.verdict()
    now = datetime.now(UTC).isoformat()
    marks: list[tuple[int | None, int | None, str, str, str]] = [
        (f.partition, f.offset, now, held.event_id, held.jurisdiction) for held, f in ledger.marks
    ]

    def write(conn: sqlite3.Connection) -> None:
        state.mark_delivered(conn, marks)
        state.advance_checked(conn, topic, result.ends)

    await committer.run(write)
    if marks:
        log.warning("%s: %d envelopes were acknowledged by Kafka before a crash but never marked; marked now "
                    "(they will not be sent again)", topic, len(marks))  # fmt: skip
    return ledger
