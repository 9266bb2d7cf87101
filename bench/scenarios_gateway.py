"""The gateway's scenarios: delivery to offices with policy, redaction and write-ahead audit on, next to raw aiokafka
consuming the same kind of topic with the gateway's own consumer settings, in the same run on the same broker.

Owns:
- ``aiokafka-consume-gateway`` (baseline): one consumer built like the gateway's live reader
  (``services.shared.kafka.make_consumer``: no group, read_committed, auto-commit off; assign, seek, ``getmany`` of
  at most ``reader.MAX_RECORDS`` with the same timeout) reads N signed envelopes from the beginning;
- ``gateway-deliver-1``: one office drains the same N records from the beginning of its feed, through a gateway
  running as its own process (``python -m services.gateway``) over mutual TLS 1.3 — Server-Sent Events, pages of
  500. The gateway has verified the records before the timed region (verification is once per gateway, not per
  office); every release is decided (``ReadItem``, cached), redacted (the offices lack the PROTECTION clearance, so
  every event loses a disclosure) and audited to ``hub.audit`` (acks=all) before a byte is sent;
- ``aiokafka-consume-gateway-10`` / ``gateway-deliver-10``: the same with ten readers, ten offices, at once;
  aggregate events/s;
- ``aiokafka-latency`` / ``gateway-latency``: publish → delivery latency at a steady 1,000 events/s: signed
  envelopes are produced (acks=all) on a clock; the latency of each is the time from handing it to the producer to
  the moment its event arrived, at a raw consumer or at an office following with SSE;
- ``gateway-idle-0`` / ``gateway-idle-1000``: a gateway inside this process with 0 or 1,000 idle SSE subscribers
  (held by another process), while another office's long polls are timed; the row's *peak RSS* is the gateway's
  memory with that many subscribers.

Does not own: the rig (``bench.gateway_rig``), timing and repeats (``bench.harness``).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.gateway_rig import OFFICES, ROOT, Rig, delete_topics, make_rig, rig_topics
from bench.harness import Context, Latencies, scenario
from services.gateway.__main__ import tune_tls_read_buffer
from services.gateway.reader import MAX_RECORDS
from services.gateway.service import create_app
from services.shared.kafka import make_consumer, make_producer, partitions_of
from services.shared.tls import server_context

#: The signed envelopes the rig produces are ~1,058 bytes (the N x size column; nothing is padded to a size).
ENVELOPE_BYTES: Final = 1_058
DELIVER_N: Final = 12_000  # within the gateway's default tail (4,096 per partition x 3): the live path
PAGE: Final = 500
RATE: Final = 1_000
LATENCY_SECONDS: Final = 8.0
IDLE: Final = 1_000
DEADLINE_S: Final = 300.0
RECONNECTS: Counter[str] = Counter()


# --- set-up -----------------------------------------------------------------------------------------------------


async def _deliver_setup(ctx: Context) -> None:
    rig = await make_rig(ctx.bootstrap)
    await rig.produce(ctx.events)
    ctx.state["rig"] = rig
    if not ctx.scenario.startswith("aiokafka"):
        await rig.start_process(verified=ctx.events)


async def _latency_setup(ctx: Context) -> None:
    rig = await make_rig(ctx.bootstrap)
    ctx.state["rig"] = rig
    if not ctx.scenario.startswith("aiokafka"):
        await rig.start_process()


async def _teardown(ctx: Context) -> None:
    if RECONNECTS:
        print(
            f"bench: {ctx.scenario}: offices reconnected {sum(RECONNECTS.values())} times (a 503 or an ended "
            "stream, e.g. hub.audit slower than the audit timeout): included in the figures",
            file=sys.stderr,
        )
    rig: Rig = ctx.state["rig"]
    await rig.stop()
    await delete_topics(ctx.bootstrap, rig_topics(rig))


# --- raw aiokafka, configured like the gateway's reader ---------------------------------------------------------


async def _raw_consumers(ctx: Context, rig: Rig, n: int) -> list[tuple[AIOKafkaConsumer, list[TopicPartition]]]:
    """``n`` started consumers built like the gateway's reader, assigned to every partition (untimed: a reader is
    long-lived)."""
    partitions = await partitions_of(ctx.bootstrap, rig.topic)
    out = []
    for i in range(n):
        consumer = make_consumer(ctx.bootstrap, group_id=None, client_id=f"bench-raw-{i}")
        await consumer.start()
        tps = [TopicPartition(rig.topic, p) for p in partitions]
        consumer.assign(tps)
        out.append((consumer, tps))
    return out


async def _raw_read(ctx: Context, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> int:
    """Read the topic from the beginning as the gateway's live reader does (``getmany`` of ``MAX_RECORDS``)."""
    for tp in tps:
        consumer.seek(tp, 0)
    seen = 0
    deadline = time.monotonic() + DEADLINE_S
    while seen < ctx.events:
        batches = await consumer.getmany(*tps, timeout_ms=500, max_records=MAX_RECORDS)
        seen += sum(len(records) for records in batches.values())
        if time.monotonic() > deadline:
            raise TimeoutError(f"read {seen} of {ctx.events} records")
    return seen


async def _raw(ctx: Context, n: int) -> int:
    consumers = await _raw_consumers(ctx, ctx.state["rig"], n)
    try:
        with ctx.timed():
            counts = await asyncio.gather(*(_raw_read(ctx, c, tps) for c, tps in consumers))
    finally:
        for consumer, _ in consumers:
            await consumer.stop()
    return sum(counts)


@scenario(name="aiokafka-consume-gateway", unit="events/s", events=DELIVER_N, quick_events=500,
          record_size=ENVELOPE_BYTES, setup=_deliver_setup, teardown=_teardown)  # fmt: skip
async def aiokafka_consume_gateway(ctx: Context) -> int:
    """aiokafka configured like the gateway's reader: read N signed envelopes from the beginning."""
    return await _raw(ctx, 1)


@scenario(name="aiokafka-consume-gateway-10", unit="events/s", events=DELIVER_N, quick_events=500,
          record_size=ENVELOPE_BYTES, setup=_deliver_setup, teardown=_teardown)  # fmt: skip
async def aiokafka_consume_gateway_10(ctx: Context) -> int:
    """Ten such consumers reading the N envelopes at once (aggregate)."""
    return await _raw(ctx, 10)


# --- offices through the gateway --------------------------------------------------------------------------------


async def _follow_sse(rig: Rig, office: str, on_event: Callable[[dict[str, Any], float], bool], *,
                      cursor: str | None = None) -> None:  # fmt: skip
    """Follow the office's feed with SSE, as a client does: on a 503 or an ``error`` event, wait (``Retry-After``,
    at most a second here) and reconnect with ``Last-Event-ID``. ``on_event(event, arrived)`` returns True to stop.
    Reconnections are counted in ``RECONNECTS`` (the bench prints them: they are part of what was measured)."""
    connector = aiohttp.TCPConnector(ssl=rig.ssl_for(office))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=DEADLINE_S)) as session:
        while True:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": cursor} if cursor else {})}
            async with session.get(rig.feed_url(), params={"max": str(PAGE)}, headers=headers) as response:
                if response.status == 503:
                    RECONNECTS[office] += 1
                    await asyncio.sleep(min(1.0, float(response.headers.get("Retry-After", "1"))))
                    continue
                if response.status != 200:
                    raise RuntimeError(f"{office}: {response.status} {await response.text()}")
                buffer = b""
                async for chunk in response.content.iter_any():
                    arrived = time.perf_counter()
                    buffer += chunk
                    *frames, buffer = buffer.split(b"\n\n")
                    for frame in frames:
                        for line in frame.split(b"\n"):
                            if line.startswith(b"data: "):
                                event = json.loads(line[6:])
                                cursor = event.get("cursor", cursor)
                                if on_event(event, arrived):
                                    return
            RECONNECTS[office] += 1  # the gateway ended the stream (an error event): resume where it stopped
            await asyncio.sleep(0.2)


async def _drain_sse(rig: Rig, office: str, want: int) -> int:
    """Read the office's feed from the beginning until ``want`` events arrived; every event is parsed."""
    got = 0

    def count(event: dict[str, Any], _arrived: float) -> bool:
        nonlocal got
        got += event["type"] in ("event", "withheld")
        return got >= want

    await _follow_sse(rig, office, count)
    return got


@scenario(name="gateway-deliver-1", unit="events/s", baseline="aiokafka-consume-gateway", events=DELIVER_N,
          quick_events=500, record_size=ENVELOPE_BYTES, setup=_deliver_setup, teardown=_teardown)  # fmt: skip
async def gateway_deliver_1(ctx: Context) -> int:
    """One office drains N records over mTLS (SSE): decided, redacted, audited write-ahead, sent."""
    with ctx.timed():
        return await _drain_sse(ctx.state["rig"], OFFICES[0], ctx.events)


@scenario(name="gateway-deliver-10", unit="events/s", baseline="aiokafka-consume-gateway-10", events=DELIVER_N,
          quick_events=500, record_size=ENVELOPE_BYTES, setup=_deliver_setup, teardown=_teardown)  # fmt: skip
async def gateway_deliver_10(ctx: Context) -> int:
    """Ten offices drain the N records at once (aggregate events/s)."""
    with ctx.timed():
        counts = await asyncio.gather(*(_drain_sse(ctx.state["rig"], o, ctx.events) for o in OFFICES))
    return sum(counts)


# --- latency ------------------------------------------------------------------------------------------------------


async def _paced(ctx: Context, rig: Rig, sent: dict[str, float], stop: asyncio.Event) -> None:
    """Produce signed events at ``RATE``/s for the scenario's duration, noting when each was handed over."""
    producer = make_producer(ctx.bootstrap, client_id="bench-latency")
    await producer.start()
    try:
        count = int((ctx.seconds or LATENCY_SECONDS) * RATE)
        envelopes = [rig.envelope(n) for n in range(count)]  # signed before the clock starts
        began = time.perf_counter()
        pending = []
        for n, (event_id, envelope) in enumerate(envelopes):
            delay = began + n / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[event_id] = time.perf_counter()
            pending.append(await producer.send(rig.topic, envelope, key=f"CASE-SY-{n % 64:03d}".encode()))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
        stop.set()


async def _collect(received: dict[str, float], sent: dict[str, float], stop: asyncio.Event,
                   reader: asyncio.Task[None]) -> None:  # fmt: skip
    try:
        async with asyncio.timeout(60):
            await stop.wait()
            while len(received) < len(sent):
                if reader.done():
                    reader.result()  # raises what stopped it
                    raise RuntimeError(f"the reader stopped with {len(received)} of {len(sent)} events")
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise RuntimeError(
            f"{len(sent) - len(received)} of {len(sent)} events did not arrive within 60 s "
            f"(reconnections: {dict(RECONNECTS)})"
        ) from None


def _latencies(sent: dict[str, float], received: dict[str, float]) -> Latencies:
    return Latencies([received[e] - sent[e] for e in sent if e in received])


async def _latency_run(ctx: Context, read: Any) -> Latencies:
    sent: dict[str, float] = {}
    received: dict[str, float] = {}
    stop = asyncio.Event()
    ready = asyncio.Event()
    reader = asyncio.create_task(read(received, ready))
    try:
        waiting = asyncio.ensure_future(ready.wait())
        try:  # the reader is at the head of the feed before the first event is sent
            await asyncio.wait([reader, waiting], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if reader.done():
            reader.result()
            raise RuntimeError("the reader stopped before the first event")
        with ctx.timed():
            await _paced(ctx, ctx.state["rig"], sent, stop)
            await _collect(received, sent, stop, reader)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    if len(received) < len(sent):
        raise RuntimeError(f"{len(sent) - len(received)} of {len(sent)} events never arrived")
    return _latencies(sent, received)


@scenario(name="aiokafka-latency", unit="ms", events=int(RATE * LATENCY_SECONDS), quick_events=500,
          record_size=ENVELOPE_BYTES, seconds=LATENCY_SECONDS, quick_seconds=0.5, setup=_latency_setup,
          teardown=_teardown)  # fmt: skip
async def aiokafka_latency(ctx: Context) -> Latencies:
    """Produce (acks=all) → a raw consumer configured like the gateway's reader, at a steady 1,000 events/s."""
    rig: Rig = ctx.state["rig"]
    codec = rig.codec

    async def read(received: dict[str, float], ready: asyncio.Event) -> None:
        partitions = await partitions_of(ctx.bootstrap, rig.topic)
        consumer = make_consumer(ctx.bootstrap, group_id=None, client_id="bench-latency-raw")
        await consumer.start()
        try:
            tps = [TopicPartition(rig.topic, p) for p in partitions]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:
                await consumer.position(tp)  # resolved now: nothing sent from here on is skipped
            ready.set()
            while True:
                for records in (await consumer.getmany(*tps, timeout_ms=500, max_records=MAX_RECORDS)).values():
                    now = time.perf_counter()
                    for record in records:
                        payload = codec.decode(codec.decode(record.value, expect="signed_envelope")["payload"],
                                               expect="evidence_event")  # fmt: skip
                        received[payload["event_id"]] = now
        finally:
            await consumer.stop()

    return await _latency_run(ctx, read)


@scenario(name="gateway-latency", unit="ms", baseline="aiokafka-latency", events=int(RATE * LATENCY_SECONDS),
          quick_events=500, record_size=ENVELOPE_BYTES, seconds=LATENCY_SECONDS, quick_seconds=0.5,
          setup=_latency_setup, teardown=_teardown)  # fmt: skip
async def gateway_latency(ctx: Context) -> Latencies:
    """Produce (acks=all) → the gateway → an office following with SSE, at a steady 1,000 events/s."""
    rig: Rig = ctx.state["rig"]

    async def read(received: dict[str, float], ready: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(ssl=rig.ssl_for(OFFICES[0]))
        async with aiohttp.ClientSession(connector=connector) as session:
            cursor = await _head_cursor(session, rig)
        ready.set()  # everything sent from now on is after this cursor

        def note(event: dict[str, Any], arrived: float) -> bool:
            if event["type"] == "event":
                received[event["event"]["event_id"]] = arrived
            return False

        await _follow_sse(rig, OFFICES[0], note, cursor=cursor)

    return await _latency_run(ctx, read)


async def _head_cursor(session: aiohttp.ClientSession, rig: Rig) -> str:
    """A cursor at the end of the feed (what a follower has once it caught up)."""
    cursor = ""
    while True:
        async with session.get(rig.feed_url(), params={"max": str(PAGE), "cursor": cursor}) as response:
            body = await response.json()
        cursor = body["cursor"]
        if body["caught_up"]:
            return str(cursor)


# --- idle subscribers ---------------------------------------------------------------------------------------------


async def _idle_setup(ctx: Context) -> None:
    rig = await make_rig(ctx.bootstrap, offices=2)
    tune_tls_read_buffer()  # as python -m services.gateway does
    app = create_app(rig.settings, bootstrap=ctx.bootstrap)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5, access_log=None)
    await runner.setup()
    tls = server_context(rig.certs["gateway"], minimum_version=ssl.TLSVersion.TLSv1_3)
    await web.TCPSite(runner, "127.0.0.1", rig.settings.port, ssl_context=tls).start()
    rig.url = f"https://127.0.0.1:{rig.settings.port}"
    ctx.state.update(rig=rig, runner=runner, clients=None)
    await _wait_healthy(rig)
    idle = (20 if ctx.quick else IDLE) if ctx.scenario.endswith("-1000") else 0
    if idle:
        files = rig.certs[OFFICES[1]]
        clients = subprocess.Popen(  # noqa: ASYNC220, S603 - our own module; returns at once, readiness awaited below
            [sys.executable, "-m", "bench.idle_clients", "--url", rig.feed_url(), "--n", str(idle), "--cert",
             str(files.cert), "--key", str(files.key), "--ca", str(files.ca)],
            cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        ctx.state["clients"] = clients
        assert clients.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(clients.stdout.readline), 300)
        if not line.startswith(b"ready"):
            raise RuntimeError(f"the idle subscribers did not connect: {line!r}")


async def _wait_healthy(rig: Rig) -> None:
    connector = aiohttp.TCPConnector(ssl=rig.ssl_for(OFFICES[0]))
    async with aiohttp.ClientSession(connector=connector) as session, asyncio.timeout(60):
        while True:
            async with session.get(f"{rig.url}/healthz") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.1)


async def _idle_teardown(ctx: Context) -> None:
    clients = ctx.state.get("clients")
    if clients is not None:
        clients.kill()
        await asyncio.to_thread(clients.wait)
    await ctx.state["runner"].cleanup()
    await delete_topics(ctx.bootstrap, rig_topics(ctx.state["rig"]))


async def _polls(ctx: Context) -> Latencies:
    rig: Rig = ctx.state["rig"]
    samples = []
    connector = aiohttp.TCPConnector(ssl=rig.ssl_for(OFFICES[0]))
    async with aiohttp.ClientSession(connector=connector) as session:
        with ctx.timed():
            for _ in range(ctx.events):
                began = time.perf_counter()
                async with session.get(rig.feed_url(), params={"wait": "0"}) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"long poll: {response.status}")
                samples.append(time.perf_counter() - began)
    return Latencies(samples)


@scenario(name="gateway-idle-0", unit="ms", events=50, quick_events=10, setup=_idle_setup, teardown=_idle_teardown)
async def gateway_idle_0(ctx: Context) -> Latencies:
    """A gateway in this process, no idle subscribers: an office's long poll (peak RSS: the gateway's)."""
    return await _polls(ctx)


@scenario(name="gateway-idle-1000", unit="ms", baseline="gateway-idle-0", events=50, quick_events=10,
          setup=_idle_setup, teardown=_idle_teardown)  # fmt: skip
async def gateway_idle_1000(ctx: Context) -> Latencies:
    """The same gateway with 1,000 idle SSE subscribers over mTLS: another office's long poll, and peak RSS."""
    return await _polls(ctx)
