"""The camera service (spec/camera.md): settings store, password, supervised pipeline, three ports.

:func:`make_camera_service` builds a :class:`CameraService` (a ``MultiService``) holding, in start
order: the :class:`CameraSettingsStore` (loads ``<state_dir>/camera_settings.json``), the
:class:`~robonet.services.camera_pipeline.CameraPipeline` supervisor (its own module: process
chain, argv templates, restarts) and the strports services for the data (5000), settings (5001)
and auth (5002) ports, whose factories live in :mod:`robonet.protocols.camera`.
"""

from __future__ import annotations

import math
import os
import random
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.logger import Logger

from robonet.config import Config, with_backlog
from robonet.files import atomic_write
from robonet.protocols.camera import (
    SETTINGS_FIELDS,
    UNIT_RANGES,
    AuthGate,
    CameraAuthFactory,
    CameraDataFactory,
    CameraSettings,
    CameraSettingsFactory,
    SettingsError,
    settings_from_bytes,
    settings_from_json_object,
    settings_from_units,
    settings_to_bytes,
)
from robonet.services.camera_pipeline import CameraPipeline, check_camera_config

SETTINGS_FILE = "camera_settings.json"
PASSWORD_FILE = "camera_password"


def clamp_sample(value: Any) -> int:
    """A registry value as the data byte: numbers truncated and clamped to 0..255; anything else 0."""
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, (int, float)):
        try:
            value = float(value) if isinstance(value, str) else None
        except ValueError:
            value = None
        if value is None:
            return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return 0 if value < 0 else 255 if value > 255 else int(value)


# --- settings and password persistence ------------------------------------------------------------


class CameraSettingsStore(Service):
    """The current :class:`CameraSettings`, persisted to ``path`` (JSON, the six keys, original units).

    ``startService`` loads the file: missing -> defaults written; unreadable, invalid JSON, missing
    keys or out-of-range values -> error logged, defaults used and the file rewritten. Never raises.
    """

    log = Logger()
    name = "camera-settings"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.settings = CameraSettings()

    def startService(self) -> None:
        self.load()
        super().startService()

    def load(self) -> CameraSettings:
        """(Re)load the file; see the class docstring."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            self.log.info("camera settings: {path} not found; writing defaults", path=str(self.path))
            self.settings = CameraSettings()
            self.save(self.settings)
            return self.settings
        except OSError as e:
            problem = e.strerror or str(e)
        else:
            try:
                self.settings = settings_from_json_object(orjson.loads(data))
                return self.settings
            except orjson.JSONDecodeError as e:
                problem = f"invalid JSON ({e})"
            except SettingsError as e:
                problem = str(e)
        self.log.error(
            "camera settings: {path} is unusable: {problem}; using defaults and rewriting it",
            path=str(self.path),
            problem=problem,
        )
        self.settings = CameraSettings()
        self.save(self.settings)
        return self.settings

    def save(self, settings: CameraSettings) -> bool:
        """Persist ``settings`` atomically and make them current; False (logged) if the write failed."""
        self.settings = settings
        try:
            atomic_write(self.path, orjson.dumps(settings.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as e:
            self.log.error(
                "camera settings: cannot write {path}: {err}", path=str(self.path), err=e.strerror or str(e)
            )
            return False
        return True


def resolve_password(configured: str, path: Path, log: Logger) -> str:
    """The camera password: ``configured`` if set; else the one stored at ``path``; else a new random
    one (``secrets``) written there with mode 0600. Logs where the password is, never what it is."""
    if configured:
        return configured
    try:
        stored = path.read_text("utf-8").strip()
        if stored:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
                log.warn("camera password file {path} was readable by others; now mode 0600", path=str(path))
            log.info("camera auth: using the password stored in {path}", path=str(path))
            return stored
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        log.error(
            "camera auth: cannot read {path} ({err}); generating a password", path=str(path), err=str(e)
        )
    password = secrets.token_urlsafe(12)
    try:
        atomic_write(path, password.encode() + b"\n", mode=0o600)
    except OSError as e:
        log.error(
            "camera auth: camera.password is not set and {path} cannot be written ({err}); "
            "set camera.password or AUTH_PASSWORD",
            path=str(path),
            err=e.strerror or str(e),
        )
        return password
    log.warn(
        "camera auth: camera.password is not set; generated one and stored it in {path} (mode 0600)",
        path=str(path),
    )
    return password


# --- the service ----------------------------------------------------------------------------------


class CameraService(MultiService):
    """The camera face: settings store, pipeline and the three ports, sharing one :class:`AuthGate`.

    ``enabled`` false -> an empty MultiService (nothing is read, written or listened on). The web
    resources (:mod:`robonet.services.camera_web`) use :meth:`status` and :meth:`update_settings`.
    """

    log = Logger()

    def __init__(self, config: Config, hub: Any, reactor: Any, enabled: bool = True) -> None:
        super().__init__()
        self.setName("camera")
        self.config = config
        self.camera = config.camera
        self.hub = hub
        self.reactor = reactor
        self.enabled = enabled
        self.random = random.Random()
        #: callables run first on stopService (e.g. CameraPreviewResource.close_all)
        self.stop_hooks: list[Callable[[], None]] = []
        self.gate = AuthGate(
            require_auth=self.camera.require_auth,
            ttl=self.camera.auth_ttl,
            max_failures=self.camera.auth_max_failures,
        )
        self.store = CameraSettingsStore(config.state_path / SETTINGS_FILE)
        self.pipeline = CameraPipeline(self.camera, reactor, lambda: self.store.settings, self._publish_state)
        self.data_factory = CameraDataFactory(
            clock=reactor,
            gate=self.gate,
            stats=hub.stats,
            sample=self.sample,
            rate_hz=self.camera.rate_hz,
            slow_timeout=self.camera.slow_timeout,
            max_per_ip=self.camera.max_per_ip,
        )
        self.settings_factory = CameraSettingsFactory(
            clock=reactor,
            gate=self.gate,
            stats=hub.stats,
            current_bytes=self.current_bytes,
            apply=self.apply_settings_bytes,
            packet_timeout=self.camera.packet_timeout,
            max_per_ip=self.camera.max_per_ip,
        )
        self.auth_factory = CameraAuthFactory(
            clock=reactor,
            gate=self.gate,
            stats=hub.stats,
            request_timeout=self.camera.packet_timeout,
            max_per_ip=self.camera.max_per_ip,
        )
        if not enabled:
            return
        self.store.setServiceParent(self)
        self.pipeline.setServiceParent(self)
        for desc, factory in (
            (self.camera.data_listen, self.data_factory),
            (self.camera.settings_listen, self.settings_factory),
            (self.camera.auth_listen, self.auth_factory),
        ):
            if desc:
                strports.service(with_backlog(desc), factory, reactor=reactor).setServiceParent(self)

    def startService(self) -> None:
        if self.enabled:
            path = self.config.state_path / PASSWORD_FILE
            self.gate.set_password(resolve_password(self.camera.password, path, self.log))
        super().startService()

    def stopService(self) -> Any:
        """Run the :attr:`stop_hooks` (the web preview finishes its viewers), then stop the
        children (ports, pipeline, settings store); the Deferred fires once all have stopped."""
        for hook in list(self.stop_hooks):
            try:
                hook()
            except Exception:
                self.log.failure("camera: a stop hook failed")
        return super().stopService()

    # -- data -------------------------------------------------------------------------------------

    def sample(self) -> int:
        """The next data byte: random 0..10, or the registry field named by ``camera.data_source``."""
        src = self.camera.data_source
        if src == "random":
            return self.random.randint(0, 10)
        try:
            return clamp_sample(self.hub.registry.field(src))
        except Exception:
            self.log.failure("camera data: reading {src} failed", src=src)
            return 0

    # -- settings ---------------------------------------------------------------------------------

    @property
    def settings(self) -> CameraSettings:
        """The current settings."""
        return self.store.settings

    def current_bytes(self) -> bytes:
        """The six current setting bytes (for the settings response)."""
        try:
            return settings_to_bytes(self.store.settings)
        except SettingsError:
            return settings_to_bytes(CameraSettings())

    def apply_settings_bytes(self, raw: bytes) -> CameraSettings:
        """Validate and apply six setting bytes: persist, publish, restart the pipeline (debounced).

        Unchanged settings are a no-op. Raises :class:`SettingsError` (nothing changed).
        """
        current = self.store.settings
        new = settings_from_bytes(raw, current)
        if new == current:
            return current
        self.store.save(new)
        self.log.info("camera settings: now {settings}", settings=new.as_dict())
        self._publish("camera_settings", new.as_dict())
        self.pipeline.request_restart()
        return new

    def update_settings(self, values: Mapping[str, Any]) -> CameraSettings:
        """Apply any subset of the six keys in original units (the web API): converted to bytes and
        applied through :meth:`apply_settings_bytes`, exactly like a port 5001 update. Raises
        :class:`SettingsError` naming the offending field."""
        return self.apply_settings_bytes(settings_from_units(dict(values), self.store.settings))

    # -- status -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``GET /api/camera`` object (docs/camera.rst)."""
        out = self.pipeline.status()
        out.update(
            enabled=self.enabled,
            settings=self.store.settings.as_dict(),
            rtsp_url=self.camera.rtsp_url,
            ranges={k: list(UNIT_RANGES[k]) for k in SETTINGS_FIELDS},
            preview=self.enabled and self.pipeline.preview_enabled,
            authorised_clients=self.gate.authorised_count(self.reactor.seconds()),
        )
        return out

    def _publish_state(self, status: dict[str, Any]) -> None:
        self._publish("camera_state", status)

    def _publish(self, type: str, body: dict[str, Any]) -> None:
        try:
            self.hub.publish_local("camera", type, body, face="camera", role="camera")
        except Exception:
            self.log.failure("camera: publishing {type} failed", type=type)


def make_camera_service(config: Config, hub: Any, reactor: Any) -> CameraService:
    """Build the camera service (spec/camera.md) for ``config.camera``.

    Returns an empty (``enabled=False``) :class:`CameraService` when ``camera.enabled`` is false.
    Raises :class:`ConfigError` for bad argv templates or ``data_source``.
    """
    if not config.camera.enabled:
        return CameraService(config, hub, reactor, enabled=False)
    check_camera_config(config.camera)
    return CameraService(config, hub, reactor)
