"""Autobahn options shared by every robonet WebSocket endpoint (HARDENING.md, web rows).

:func:`configure_factory` applies the limits (frame/message caps, the permessage-deflate inflation
cap, UTF-8 validation, handshake deadlines, keepalive) and :func:`use_clock` puts Autobahn's timers
on the injected clock (:class:`ClockTimer`). The relay (``/ws/telemetry/``), ``/ws/echo``
(:class:`EchoFactory`, for the Autobahn|Testsuite) and other WebSocket faces use the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

import robonet

if TYPE_CHECKING:
    from robonet.config import Config

# Autobahn's WebSocket-level keepalive: ping an idle peer, drop it when no pong comes back.
AUTO_PING_INTERVAL = 25.0
AUTO_PING_TIMEOUT = 20.0
CLOSE_HANDSHAKE_TIMEOUT = 3.0


def deflate_accept(max_message: int) -> Callable[[list[Any]], PerMessageDeflateOfferAccept | None]:
    """Accept a client's permessage-deflate offer only with an inflation cap of ``max_message``."""

    def accept(offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return PerMessageDeflateOfferAccept(offer, max_message_size=max_message)
        return None

    return accept


class _Bucket:
    """The calls of one ClockTimer window and the one reactor timer that runs them."""

    __slots__ = ("owner", "due", "delayed", "calls", "live")

    def __init__(self, owner: dict[int, _Bucket], due: int) -> None:
        self.owner = owner
        self.due = due
        self.delayed: IDelayedCall | None = None
        self.calls: list[_TimerCall] = []
        self.live = 0


class _TimerCall:
    """One call waiting in a :class:`ClockTimer` window; ``cancel()`` is safe after it ran."""

    __slots__ = ("func", "args", "kwargs", "bucket")

    def __init__(
        self, func: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any], bucket: _Bucket
    ) -> None:
        self.func: Callable[..., object] | None = func
        self.args = args
        self.kwargs = kwargs
        self.bucket = bucket

    def cancel(self) -> None:
        """Do not run; the window's reactor timer is cancelled with its last live call."""
        if self.func is None:
            return
        self.func = None
        bucket = self.bucket
        bucket.live -= 1
        if bucket.live == 0:  # nothing left to run in that window: drop it and its reactor timer
            if bucket.owner.get(bucket.due) is bucket:
                del bucket.owner[bucket.due]
            if bucket.delayed is not None and bucket.delayed.active():
                bucket.delayed.cancel()
            bucket.delayed = None


class ClockTimer:
    """txaio's ``IBatchedTimer`` (``call_later(delay, func, *args, **kwargs)``) on an injected clock.

    Autobahn starts its opening/closing-handshake and auto-ping timers through its factory's
    ``_batched_timer``, which it builds from txaio's global loop (the global reactor). Autobahn
    has no public hook for this: :func:`use_clock` is the one place robonet replaces it.

    Like txaio's own timer it batches: calls due within the same ``bucket_ms`` window share one
    ``clock.callLater`` (10,000 idle connections keep a handful of reactor timers, not 10,000).
    A call runs at the end of its window, so at most ``bucket_ms`` late and never early; a window
    whose calls were all cancelled leaves no reactor timer behind.
    """

    __slots__ = ("clock", "bucket_ms", "_buckets")
    log = Logger()

    def __init__(self, clock: IReactorTime, bucket_ms: int = 200) -> None:
        self.clock = clock
        self.bucket_ms = bucket_ms
        self._buckets: dict[int, _Bucket] = {}

    def call_later(self, delay: float, func: Callable[..., object], *args: Any, **kwargs: Any) -> _TimerCall:
        """Call ``func(*args, **kwargs)`` after ``delay`` seconds of the injected clock."""
        now = self.clock.seconds()
        due = -(-round((now + delay) * 1000) // self.bucket_ms) * self.bucket_ms  # window end, ms
        bucket = self._buckets.get(due)
        if bucket is None:
            bucket = self._buckets[due] = _Bucket(self._buckets, due)
            bucket.delayed = self.clock.callLater(max(0.0, due / 1000 - now), self._fire, due)
        call = _TimerCall(func, args, kwargs, bucket)
        bucket.calls.append(call)
        bucket.live += 1
        return call

    def pending(self) -> int:
        """Calls waiting to run (not cancelled)."""
        return sum(b.live for b in self._buckets.values())

    def _fire(self, due: int) -> None:
        bucket = self._buckets.pop(due, None)
        if bucket is None:
            return
        bucket.delayed = None
        bucket.live = 0
        for call in bucket.calls:
            func, call.func = call.func, None
            if func is None:
                continue
            try:
                func(*call.args, **call.kwargs)
            except Exception:  # one failing timer must not stop the others in its window
                self.log.failure("WebSocket timer failed")


def use_clock(factory: WebSocketServerFactory, clock: IReactorTime) -> None:
    """Run Autobahn's handshake/ping/close timers on ``clock`` instead of the global reactor.

    The one place robonet touches an Autobahn internal (``factory._batched_timer``, set by
    ``WebSocketServerFactory.__init__``; Autobahn 26 has no public hook for it). Raises
    RuntimeError if that attribute is gone (a new Autobahn): timers on the global reactor would
    escape the injected clock silently, so robonet refuses to start instead.
    """
    if not hasattr(factory, "_batched_timer"):
        raise RuntimeError(
            "autobahn's WebSocketServerFactory has no _batched_timer any more: robonet cannot put its "
            "WebSocket timers on the injected clock; check robonet.protocols.websocket.use_clock"
        )
    factory._batched_timer = ClockTimer(clock)


def configure_factory(factory: WebSocketServerFactory, config: Config, clock: IReactorTime) -> None:
    """Apply robonet's WebSocket limits to ``factory`` (HARDENING.md, web rows).

    Frame and message payloads are capped at ``web.max_message`` (bigger -> close 1009, decided
    from the frame header or while inflating); permessage-deflate is accepted only with that same
    cap on the inflated size; UTF-8 is validated (invalid -> close 1007); failing connections get
    a close frame rather than a bare TCP drop; the opening handshake must finish within
    ``web.header_timeout``; idle peers are pinged. The echo resource uses the same options.
    """
    web = config.web
    factory.setProtocolOptions(
        maxFramePayloadSize=web.max_message,
        maxMessagePayloadSize=web.max_message,
        perMessageCompressionAccept=deflate_accept(web.max_message),
        utf8validateIncoming=True,
        failByDrop=False,
        openHandshakeTimeout=web.header_timeout,
        closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
        autoPingInterval=AUTO_PING_INTERVAL,
        autoPingTimeout=AUTO_PING_TIMEOUT,
        autoFragmentSize=0,
        webStatus=False,
    )
    use_clock(factory, clock)


class EchoProtocol(WebSocketServerProtocol):
    """``/ws/echo``: echoes every message, for running the Autobahn|Testsuite against real options."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Send the message back unchanged."""
        self.sendMessage(payload, isBinary)


class EchoFactory(WebSocketServerFactory):
    """The echo endpoint's factory, configured by :func:`configure_factory` exactly like the relay."""

    protocol = EchoProtocol

    def __init__(self, config: Config, reactor: IReactorTime) -> None:
        super().__init__(reactor=reactor, server=f"robonet/{robonet.__version__}")
        configure_factory(self, config, reactor)
