"""``GET /api/export`` (robonet/services/export.py; issue 10 item 3), against a fake store that
implements the store branch's ``query_page`` API."""

from __future__ import annotations

import csv
import io
from typing import Any

import orjson
from mcap.reader import make_reader
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from robonet import mcapio
from robonet.config import load_config
from robonet.hub import Hub
from robonet.services import export
from robonet.services.web import make_site

T0 = 1_764_800_000.5


def rows(n: int, devices: tuple[str, ...] = ("r1", "r2")) -> list[dict[str, Any]]:
    """``n`` store rows as query_page returns them, alternating devices and types."""
    out = []
    for i in range(1, n + 1):
        mtype = "telemetry" if i % 3 else "sensor_data"
        body = {"type": mtype, "seq": i, "battery": 50.0 + i / 10, "note": 'a "quoted", comma'}
        out.append(
            {
                "id": i * 2,
                "device_id": devices[i % len(devices)],
                "type": mtype,
                "received_at": T0 + i * 0.125,
                "body": orjson.dumps(body).decode(),
                "hub": "",
            }
        )
    return out


class FakeStore:
    """``query_page`` over a list of rows, recording every call; ``hold`` keeps pages pending."""

    def __init__(self, data: list[dict[str, Any]], hold: bool = False) -> None:
        self.data = data
        self.hold = hold
        self.calls: list[dict[str, Any]] = []
        self.pending: list[tuple[defer.Deferred[list[dict[str, Any]]], list[dict[str, Any]]]] = []
        self.fail_at: int | None = None

    def query_page(
        self,
        device_id: str | None = None,
        mtype: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after_id: int | None = None,
        limit: int = 1000,
    ) -> defer.Deferred[list[dict[str, Any]]]:
        self.calls.append(
            {
                "device_id": device_id,
                "mtype": mtype,
                "since": since,
                "until": until,
                "after_id": after_id,
                "limit": limit,
            }
        )
        if self.fail_at is not None and len(self.calls) >= self.fail_at:
            return defer.fail(RuntimeError("database is locked"))
        page = [
            r
            for r in self.data
            if (device_id is None or r["device_id"] == device_id)
            and (mtype is None or r["type"] == mtype)
            and (since is None or r["received_at"] >= since)
            and (until is None or r["received_at"] <= until)
            and (after_id is None or r["id"] > after_id)
        ][:limit]
        if self.hold:
            d: defer.Deferred[list[dict[str, Any]]] = defer.Deferred()
            self.pending.append((d, page))
            return d
        return defer.succeed(page)

    def append(self, *args: Any) -> None:
        raise AssertionError("not used")


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


class ExportTests(unittest.SynchronousTestCase):
    """Every format round-trips the store's rows; bad parameters are 400."""

    def setUp(self) -> None:
        self.patch(export, "PAGE_ROWS", 7)  # several pages from a small data set

    def site(self, store: Any) -> Any:
        config = load_config(environ={}, overrides={"hub": {"state_dir": self.mktemp()}})
        clock = MemoryReactorClock()
        clock.advance(T0)
        self.hub = Hub(config, clock, store=store)
        site = make_site(config, self.hub, clock)
        self.addCleanup(site.relay.shutdown)
        return site

    def fetch(self, store: Any, query: str) -> tuple[int, dict[bytes, bytes], bytes, StringTransport]:
        site = self.site(store)
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(f"GET /api/export?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.channel = channel
        return self.parse(transport) + (transport,)

    def parse(self, transport: StringTransport) -> tuple[int, dict[bytes, bytes], bytes]:
        if not transport.value():
            return 0, {}, b""  # nothing written yet (headers go out with the first page)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        code = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        if headers.get(b"transfer-encoding") == b"chunked":
            body = dechunk(body)
        return code, headers, body

    def test_jsonl_every_row_in_pages(self) -> None:
        """jsonl: one object a line, every row, bodies as JSON objects; pages chain by after_id."""
        data = rows(30)
        store = FakeStore(data)
        code, headers, body, _ = self.fetch(store, "format=jsonl")
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"content-type"], b"application/x-ndjson")
        self.assertIn(b'filename="robonet-export.jsonl"', headers[b"content-disposition"])
        got = [orjson.loads(line) for line in body.splitlines()]
        self.assertEqual(len(got), 30)
        for g, r in zip(got, data, strict=True):
            self.assertEqual(
                g,
                {
                    **{k: r[k] for k in ("id", "device_id", "type", "received_at", "hub")},
                    "body": orjson.loads(r["body"]),
                },
            )
        self.assertEqual([c["after_id"] for c in store.calls], [None, 14, 28, 42, 56])
        self.assertEqual({c["limit"] for c in store.calls}, {7})

    def test_filters_passed_to_store(self) -> None:
        """device_id, type, since and until (Unix or ISO-8601) reach query_page."""
        store = FakeStore(rows(10))
        code, _, body, _ = self.fetch(
            store, "device_id=r1&type=telemetry&since=1764800000.5&until=2025-12-09T10:30:45Z"
        )
        self.assertEqual(code, 200)
        call = store.calls[0]
        self.assertEqual((call["device_id"], call["mtype"], call["since"]), ("r1", "telemetry", T0))
        self.assertEqual(call["until"], 1765276245.0)

    def test_csv(self) -> None:
        """csv: a header line and one row per stored row; the body column is the JSON text."""
        data = rows(9)
        code, headers, body, _ = self.fetch(FakeStore(data), "format=csv")
        self.assertEqual(code, 200)
        self.assertTrue(headers[b"content-type"].startswith(b"text/csv"))
        table = list(csv.reader(io.StringIO(body.decode())))
        self.assertEqual(tuple(table[0]), export.CSV_HEADER)
        self.assertEqual(len(table), 10)
        for line, r in zip(table[1:], data, strict=True):
            self.assertEqual(
                (int(line[0]), line[1], line[2], float(line[3])),
                (r["id"], r["device_id"], r["type"], r["received_at"]),
            )
            self.assertEqual(orjson.loads(line[6]), orjson.loads(r["body"]))

    def test_mcap_reads_back(self) -> None:
        """mcap: every row is a message on /<device>/<type> with schema robonet.<type> and log
        time = received_at, readable by the mcap library's seeking reader (summary intact)."""
        data = rows(25)
        code, headers, body, _ = self.fetch(FakeStore(data), "format=mcap")
        self.assertEqual(code, 200)
        reader = make_reader(io.BytesIO(body))
        got = list(reader.iter_messages(log_time_order=False))
        self.assertEqual(len(got), 25)
        for (schema, channel, message), r in zip(got, data, strict=True):
            assert schema is not None
            self.assertEqual(channel.topic, f"/{r['device_id']}/{r['type']}")
            self.assertEqual(schema.name, f"robonet.{r['type']}")
            self.assertEqual(message.log_time, mcapio.to_ns(r["received_at"]))
            self.assertEqual(orjson.loads(message.data), orjson.loads(r["body"]))
        summary = reader.get_summary()
        assert summary is not None and summary.statistics is not None
        self.assertEqual(summary.statistics.message_count, 25)

    def test_empty_result(self) -> None:
        """No rows: a complete, empty export (an MCAP file with no messages)."""
        code, _, body, _ = self.fetch(FakeStore([]), "format=mcap")
        self.assertEqual(code, 200)
        self.assertEqual(list(make_reader(io.BytesIO(body)).iter_messages()), [])

    def test_slow_downloader_fetches_no_more_pages(self) -> None:
        """While the transport is paused no new page is fetched: memory stays at one page."""
        store = FakeStore(rows(30), hold=True)
        _, _, _, transport = self.fetch(store, "format=jsonl")
        self.assertEqual(len(store.calls), 1)
        transport.producer.pauseProducing()  # what a full socket buffer does
        d, page = store.pending.pop()
        d.callback(page)
        self.assertEqual(len(store.calls), 1)
        transport.producer.resumeProducing()
        self.assertEqual(len(store.calls), 2)
        while store.pending:
            d, page = store.pending.pop()
            d.callback(page)
        code, _, body = self.parse(transport)
        self.assertEqual(len(body.splitlines()), 30)

    def test_client_gone_stops_fetching(self) -> None:
        """A downloader that disconnects stops the export."""
        store = FakeStore(rows(30), hold=True)
        self.fetch(store, "format=csv")
        self.channel.connectionLost(Exception("gone"))
        d, page = store.pending.pop()
        d.callback(page)
        self.assertEqual(len(store.calls), 1)

    def test_store_failure_mid_stream(self) -> None:
        """A failing page is logged and counted, and the download is cut (never a clean end)."""
        store = FakeStore(rows(30))
        store.fail_at = 2
        _, _, _, transport = self.fetch(store, "format=jsonl")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.hub.stats.errors["export_failed"], 1)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.value().endswith(b"0\r\n\r\n"))

    def test_bad_params(self) -> None:
        """Bad format, times, until < since, unknown parameters: 400 naming the parameter."""
        for query, param in (
            ("format=xml", "format"),
            ("since=yesterday", "since"),
            ("until=nan", "until"),
            ("since=100&until=50", "until"),
            ("device=r1", "device"),
        ):
            store = FakeStore(rows(3))
            code, headers, body, _ = self.fetch(store, query)
            self.assertEqual(code, 400, query)
            err = orjson.loads(body)
            self.assertEqual(err["param"], param, query)
            self.assertIn(param, err["error"])
            self.assertEqual(store.calls, [])

    def test_no_store_or_no_query_page(self) -> None:
        """503 when the store is off, or when it lacks query_page (the store branch's API)."""
        code, _, body, _ = self.fetch(None, "format=csv")
        self.assertEqual(code, 503)

        class OldStore:
            def query(self, **kw: Any) -> None:
                raise AssertionError

        code, _, body, _ = self.fetch(OldStore(), "format=csv")
        self.assertEqual((code, b"query_page" in body), (503, True))
