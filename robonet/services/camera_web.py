"""twisted.web resources for the camera service (docs/camera.rst, "Web API").

:func:`camera_resources` returns the resources the web face mounts:

- ``api/camera``: ``GET`` -> the :meth:`CameraService.status` object (JSON).
- ``api/camera/settings``: ``GET`` -> ``{"settings": {...}}``; ``POST`` a JSON object with any subset
  of the six settings in the original units -> 200 ``{"settings": {...}}`` or 400
  ``{"error": "...", "field": "..."}``. Applied through exactly the same code path as a port 5001
  update (to bytes, validated, applied, persisted, pipeline restarted).
- ``camera/preview.mjpg``: ``multipart/x-mixed-replace`` MJPEG from the running pipeline's preview
  output (``camera.preview_fps``, default 2 fps); 503 with a JSON error when there is none. A viewer
  whose transport is paused (not reading) gets no frames queued: frames are skipped, and a viewer
  paused for ``camera.slow_timeout`` seconds is disconnected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from twisted.internet import interfaces
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from robonet.protocols.camera import SettingsError

if TYPE_CHECKING:
    from robonet.services.camera import CameraService

MAX_BODY = 4096
MAX_VIEWERS = 8
BOUNDARY = b"robonetframe"


def _json(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return orjson.dumps(body)


def _unavailable(camera: CameraService) -> str | None:
    if not camera.enabled:
        return "the camera service is disabled (camera.enabled = false)"
    return None


class CameraStatusResource(Resource):
    """``GET api/camera`` -> status JSON; ``settings`` is its child (so either mounting works)."""

    def __init__(self, camera: CameraService, settings: Resource) -> None:
        super().__init__()
        self.camera = camera
        self.putChild(b"settings", settings)

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)  # type: ignore[no-any-return]

    def render_GET(self, request: Request) -> bytes:
        problem = _unavailable(self.camera)
        if problem:
            return _json(request, http.SERVICE_UNAVAILABLE, {"error": problem})
        return _json(request, http.OK, self.camera.status())


class CameraSettingsResource(Resource):
    """``GET``/``POST api/camera/settings`` (see the module docstring)."""

    isLeaf = True
    log = Logger()

    def __init__(self, camera: CameraService) -> None:
        super().__init__()
        self.camera = camera

    def render_GET(self, request: Request) -> bytes:
        problem = _unavailable(self.camera)
        if problem:
            return _json(request, http.SERVICE_UNAVAILABLE, {"error": problem})
        return _json(request, http.OK, {"settings": self.camera.settings.as_dict()})

    def _origin_ok(self, request: Request) -> bool:
        origin = request.getHeader(b"origin")
        if origin is None:
            return True
        text = origin.decode("latin-1")
        if text in self.camera.config.web.allowed_origins:
            return True
        host = (request.getHeader(b"host") or b"").decode("latin-1").lower()
        return urlsplit(text).netloc.lower() == host

    def render_POST(self, request: Request) -> bytes:
        problem = _unavailable(self.camera)
        if problem:
            return _json(request, http.SERVICE_UNAVAILABLE, {"error": problem})
        if not self._origin_ok(request):
            return _json(request, http.FORBIDDEN, {"error": "cross-origin request refused", "field": ""})
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            return _json(
                request, http.UNSUPPORTED_MEDIA_TYPE, {"error": "expected application/json", "field": ""}
            )
        body = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(body) > MAX_BODY:
            return _json(request, http.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large", "field": ""})
        try:
            values = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _json(request, http.BAD_REQUEST, {"error": "invalid JSON", "field": ""})
        try:
            settings = self.camera.update_settings(values) if isinstance(values, dict) else None
        except SettingsError as e:
            self.camera.hub.stats.error("camera_settings_rejected")
            return _json(request, http.BAD_REQUEST, {"error": e.message, "field": e.field})
        if settings is None:
            return _json(request, http.BAD_REQUEST, {"error": "expected a JSON object", "field": ""})
        return _json(request, http.OK, {"settings": settings.as_dict()})


@implementer(interfaces.IPushProducer)
class _PreviewStream:
    """One MJPEG viewer: writes one multipart part per frame unless its transport is paused."""

    log = Logger()

    def __init__(self, resource: CameraPreviewResource, request: Request) -> None:
        self.resource = resource
        self.request = request
        self.paused_since: float | None = None
        self.sent = 0
        self.dropped = 0
        self.done = False

    def frame(self, jpeg: bytes) -> None:
        if self.done:
            return
        camera = self.resource.camera
        if self.paused_since is not None:
            self.dropped += 1
            camera.hub.stats.drop("camera_preview_slow")
            if camera.reactor.seconds() - self.paused_since >= camera.camera.slow_timeout:
                self.log.info("camera preview: closing a viewer that stopped reading")
                self.finish()
                abort = getattr(getattr(self.request.channel, "transport", None), "abortConnection", None)
                if abort is not None:
                    abort()
            return
        head = b"--%s\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % (BOUNDARY, len(jpeg))
        self.request.write(head + jpeg + b"\r\n")
        self.sent += 1

    def pauseProducing(self) -> None:
        if self.paused_since is None:
            self.paused_since = self.resource.camera.reactor.seconds()

    def resumeProducing(self) -> None:
        self.paused_since = None

    def stopProducing(self) -> None:
        self.finish()

    def finish(self, request_gone: bool = False) -> None:
        """Stop sending (idempotent); finish the request unless it is already over (``request_gone``)."""
        if self.done:
            return
        self.done = True
        self.resource.camera.pipeline.preview_listeners.discard(self.frame)
        self.resource.viewers.discard(self)
        if not request_gone and not self.request.finished:
            self.request.unregisterProducer()
            self.request.finish()


class CameraPreviewResource(Resource):
    """``GET camera/preview.mjpg``: the MJPEG preview (see the module docstring)."""

    isLeaf = True

    def __init__(self, camera: CameraService, max_viewers: int = MAX_VIEWERS) -> None:
        super().__init__()
        self.camera = camera
        self.max_viewers = max_viewers
        self.viewers: set[_PreviewStream] = set()

    def render_GET(self, request: Request) -> bytes | int:
        camera = self.camera
        problem = _unavailable(camera)
        if problem is None and not camera.pipeline.preview_enabled:
            problem = (
                "the camera pipeline is off (camera.pipeline)"
                if camera.pipeline.mode == "off"
                else "the preview is off (camera.preview_fps = 0)"
            )
        if problem is None and camera.pipeline.state not in ("starting", "running"):
            problem = f"the camera pipeline is {camera.pipeline.state}"
        if problem is None and len(self.viewers) >= self.max_viewers:
            problem = "too many preview viewers"
        if problem:
            return _json(request, http.SERVICE_UNAVAILABLE, {"error": problem})
        request.setHeader(b"content-type", b"multipart/x-mixed-replace; boundary=" + BOUNDARY)
        request.setHeader(b"cache-control", b"no-store")
        stream = _PreviewStream(self, request)
        self.viewers.add(stream)
        request.registerProducer(stream, True)
        camera.pipeline.preview_listeners.add(stream.frame)
        request.notifyFinish().addBoth(lambda _: stream.finish(request_gone=True))
        if camera.pipeline.last_jpeg is not None:
            stream.frame(camera.pipeline.last_jpeg)
        return NOT_DONE_YET

    def close_all(self) -> None:
        """Finish every open viewer (e.g. when the service stops)."""
        for stream in list(self.viewers):
            stream.finish()


def camera_resources(camera: CameraService) -> dict[str, Resource]:
    """The camera's web resources keyed by path (no leading slash): ``api/camera``,
    ``api/camera/settings`` (also a child of ``api/camera``) and ``camera/preview.mjpg``, whose
    :meth:`CameraPreviewResource.close_all` runs when ``camera`` stops (``camera.stop_hooks``)."""
    settings = CameraSettingsResource(camera)
    preview = CameraPreviewResource(camera)
    camera.stop_hooks.append(preview.close_all)  # viewers are finished when the camera stops
    return {
        "api/camera": CameraStatusResource(camera, settings),
        "api/camera/settings": settings,
        "camera/preview.mjpg": preview,
    }
