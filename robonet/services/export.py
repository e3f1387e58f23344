"""``GET /api/export``: stream stored messages as MCAP, CSV or JSON Lines (issue 10 item 3).

``/api/export?device_id=&type=&since=&until=&format=mcap|csv|jsonl`` (docs/recording.rst): rows
come from the store's ``query_page(device_id, mtype, since, until, after_id, limit)`` (ordered by
id; the next page starts after the last id), one page at a time, so the whole result is never in
memory. The response is an ``IPushProducer`` registered on the request: while the downloader's
socket is full (``pauseProducing``) no further page is fetched, so a slow downloader costs one page.

Formats: ``jsonl`` (default) one ``{"id","device_id","type","received_at","hub","body"}`` object a
line; ``csv`` with the header ``id,device_id,type,received_at,received_at_iso,hub,body`` (body as
JSON text); ``mcap`` in robonet's recording layout (robonet.mcapio: channel ``/<device_id>/<type>``,
schema ``robonet.<type>``, log time = ``received_at``). Bad parameters get 400 ``{"error","param"}``;
no store, or a store without ``query_page``, 503.
"""

from __future__ import annotations

import csv
import io
from typing import IO, Any, cast

import orjson
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from robonet import mcapio
from robonet.model import iso_utc
from robonet.services.web import BadParam, JsonResource, WebLog, arg, json_error, parse_time

PAGE_ROWS = 1000  # rows fetched per store query
FORMATS = {
    "jsonl": (b"application/x-ndjson", "jsonl"),
    "csv": (b"text/csv; charset=utf-8", "csv"),
    "mcap": (b"application/octet-stream", "mcap"),
}
CSV_HEADER = ("id", "device_id", "type", "received_at", "received_at_iso", "hub", "body")


class _Encoder:
    """Turns pages of store rows into bytes of one format; ``end()`` gives the trailer."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._mcap: mcapio.McapSink | None = None
        self._buf: mcapio.BufferStream | None = None
        if fmt == "mcap":
            self._buf = mcapio.BufferStream()
            self._mcap = mcapio.McapSink(
                cast(IO[bytes], self._buf), chunk_size=256 * 1024, compression="zstd"
            )

    def start(self) -> bytes:
        if self.fmt == "csv":
            return self._csv([CSV_HEADER])
        if self._buf is not None:
            return self._buf.take()
        return b""

    def page(self, rows: list[dict[str, Any]]) -> bytes:
        if self.fmt == "jsonl":
            return b"".join(
                orjson.dumps(
                    {
                        "id": r["id"],
                        "device_id": r["device_id"],
                        "type": r["type"],
                        "received_at": r["received_at"],
                        "hub": r.get("hub", ""),
                        "body": orjson.Fragment(_body_bytes(r)),
                    }
                )
                + b"\n"
                for r in rows
            )
        if self.fmt == "csv":
            return self._csv(
                [
                    (
                        r["id"],
                        r["device_id"],
                        r["type"],
                        repr(float(r["received_at"])),
                        iso_utc(float(r["received_at"])),
                        r.get("hub", ""),
                        _body_bytes(r).decode(),
                    )
                    for r in rows
                ]
            )
        assert self._mcap is not None and self._buf is not None
        for r in rows:
            self._mcap.add_data(str(r["device_id"]), str(r["type"]), float(r["received_at"]), _body_bytes(r))
        return self._buf.take()

    def end(self) -> bytes:
        if self._mcap is not None and self._buf is not None:
            self._mcap.finish()
            return self._buf.take()
        return b""

    @staticmethod
    def _csv(rows: list[Any]) -> bytes:
        out = io.StringIO()
        csv.writer(out, lineterminator="\r\n").writerows(rows)
        return out.getvalue().encode()


def _body_bytes(row: dict[str, Any]) -> bytes:
    body = row["body"]
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    return orjson.dumps(body)


@implementer(IPushProducer)
class ExportProducer:
    """Fetches pages from ``store.query_page`` and writes them to ``request`` until done.

    Pauses (fetches nothing further) while the request's transport is full; stops when the client
    goes away. A store failure mid-stream is logged and counted (``export_failed``) and the
    connection is closed without the final chunk, so the client sees a truncated download.
    """

    def __init__(self, request: Request, store: Any, query: dict[str, Any], fmt: str, stats: Any) -> None:
        self.request = request
        self.store = store
        self.query = query
        self.encoder = _Encoder(fmt)
        self.stats = stats
        self.after_id: int | None = None
        self.rows = 0
        self.paused = False
        self.fetching = False
        self.done = False
        request.notifyFinish().addErrback(self._gone)

    def start(self) -> None:
        """Register on the request, write the format's preamble and fetch the first page."""
        self.request.registerProducer(self, True)
        head = self.encoder.start()
        if head:
            self.request.write(head)
        self._fetch()

    def _fetch(self) -> None:
        if self.done or self.paused or self.fetching:
            return
        self.fetching = True
        d = maybeDeferred(self.store.query_page, after_id=self.after_id, limit=PAGE_ROWS, **self.query)
        d.addCallbacks(self._page, self._failed)

    def _page(self, rows: list[dict[str, Any]]) -> None:
        self.fetching = False
        if self.done:
            return
        try:
            data = self.encoder.page(rows) if rows else b""
            if rows:
                self.after_id = int(rows[-1]["id"])
                self.rows += len(rows)
            if len(rows) < PAGE_ROWS:
                data += self.encoder.end()
        except Exception:
            self._failed(Failure())
            return
        if data:
            self.request.write(data)
        if len(rows) < PAGE_ROWS:
            self.done = True
            self.request.unregisterProducer()
            self.request.finish()
            return
        self._fetch()

    def _failed(self, failure: Failure) -> None:
        self.fetching = False
        if self.done:
            return
        self.done = True
        self.stats.error("export_failed")
        WebLog.log.failure("export after id {after_id} failed", failure, after_id=self.after_id)
        self.request.unregisterProducer()
        self.request.loseConnection()

    def _gone(self, _: Failure) -> None:
        self.done = True

    def pauseProducing(self) -> None:
        """The downloader is behind: fetch no further page until resumed."""
        self.paused = True

    def resumeProducing(self) -> None:
        """Continue with the next page."""
        self.paused = False
        self._fetch()

    def stopProducing(self) -> None:
        """The connection is going away."""
        self.done = True


class ExportResource(JsonResource):
    """``/api/export`` (see the module docstring)."""

    def get(self, request: Request) -> bytes | int:
        """Validate the parameters, set the headers and start streaming."""
        known = {b"device_id", b"type", b"since", b"until", b"format", b"token"}
        for name in request.args or {}:
            if name not in known:
                shown = name.decode("utf-8", "replace")
                raise BadParam(
                    shown, f"unknown parameter {shown!r}; use device_id, type, since, until, format"
                )
        fmt = (arg(request, "format") or "jsonl").lower()
        if fmt not in FORMATS:
            raise BadParam("format", f"format must be mcap, csv or jsonl, got {fmt!r}")
        since_s, until_s = arg(request, "since"), arg(request, "until")
        since = parse_time(since_s, "since") if since_s is not None else None
        until = parse_time(until_s, "until") if until_s is not None else None
        if since is not None and until is not None and until < since:
            raise BadParam("until", "until is before since")
        store = self.hub.store
        if store is None:
            return json_error(request, 503, "telemetry store is disabled")
        if not hasattr(store, "query_page"):
            return json_error(request, 503, "this store cannot export (no query_page)")
        query = {
            "device_id": arg(request, "device_id") or None,
            "mtype": arg(request, "type") or None,
            "since": since,
            "until": until,
        }
        ctype, ext = FORMATS[fmt]
        request.setHeader(b"content-type", ctype)
        request.setHeader(b"cache-control", b"no-store")
        name = "robonet-export" + (f"-{query['device_id']}" if query["device_id"] else "")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        request.setHeader(b"content-disposition", f'attachment; filename="{safe}.{ext}"'.encode())
        if request.method == b"HEAD":
            return b""
        ExportProducer(request, store, query, fmt, self.hub.stats).start()
        return NOT_DONE_YET
