"""``twistd robonet``: command-line options and ``makeService`` (STYLE.md rules 1-3).

``makeService`` builds the Hub once, adds it to the MultiService before the faces (so it stops
after them; the store is added first and stops last, flushing), and hands it to every face.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from twisted.python import usage

import robonet
from robonet.config import LOG_LEVELS, Config, ConfigError, load_config, with_backlog

log = Logger(namespace="robonet.tap")

# option name -> (section, key, repeatable)
_LISTEN_OPTIONS = {
    "botlink": ("botlink", "listen", True),
    "line": ("line", "listen", True),
    "web": ("web", "listen", True),
    "camera-data": ("camera", "data_listen", False),
    "camera-settings": ("camera", "settings_listen", False),
    "camera-auth": ("camera", "auth_listen", False),
    "foxglove": ("foxglove", "listen", True),
}


class Options(usage.Options):
    """Options of ``twistd robonet`` (ARCHITECTURE.md, "Configuration keys")."""

    synopsis = "[options]"
    longdesc = (
        "Run a robonet fleet hub. Settings come from built-in defaults < --config FILE < ROBONET_* "
        "environment variables < these options. A listen value of 'none' disables that face."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (see etc/robonet.toml)"],
        ["state-dir", None, None, "state directory (default $STATE_DIRECTORY or $XDG_STATE_HOME/robonet)"],
        ["name", None, None, "hub name shown to peers and dashboards"],
        ["log-level", None, None, "debug, info, warn, error or critical"],
    ]
    optFlags = [["demo", None, "also run a small simulated fleet over loopback"]]

    def __init__(self) -> None:
        super().__init__()
        self.listens: dict[str, list[str]] = {}
        self.config: Config | None = None

    def _listen(self, option: str, value: str) -> None:
        self.listens.setdefault(option, []).append(value)

    def opt_botlink(self, value: str) -> None:
        """bot link listen endpoint, e.g. tcp:5100 (repeatable)"""
        self._listen("botlink", value)

    def opt_line(self, value: str) -> None:
        """line link listen endpoint, e.g. tcp:5555 (repeatable)"""
        self._listen("line", value)

    def opt_web(self, value: str) -> None:
        """web (HTTP/WebSocket) listen endpoint, e.g. tcp:8000 (repeatable)"""
        self._listen("web", value)

    def opt_camera_data(self, value: str) -> None:
        """camera data stream endpoint (default tcp:5000)"""
        self._listen("camera-data", value)

    def opt_camera_settings(self, value: str) -> None:
        """camera settings endpoint (default tcp:5001)"""
        self._listen("camera-settings", value)

    def opt_camera_auth(self, value: str) -> None:
        """camera auth endpoint (default tcp:5002)"""
        self._listen("camera-auth", value)

    def opt_foxglove(self, value: str) -> None:
        """Foxglove WebSocket listen endpoint, e.g. tcp:8765 (repeatable)"""
        self._listen("foxglove", value)

    def overrides(self) -> dict[str, dict[str, Any]]:
        """The command line as a config layer ``{section: {key: value}}``."""
        out: dict[str, dict[str, Any]] = {}
        if self["state-dir"]:
            out.setdefault("hub", {})["state_dir"] = self["state-dir"]
        if self["name"]:
            out.setdefault("hub", {})["name"] = self["name"]
        if self["log-level"]:
            out.setdefault("log", {})["level"] = self["log-level"].lower()
        for option, values in self.listens.items():
            section, key, repeatable = _LISTEN_OPTIONS[option]
            if not repeatable and len(values) > 1:
                raise ConfigError(f"--{option}", "may be given once")
            out.setdefault(section, {})[key] = values if repeatable else values[0]
        return out

    def postOptions(self) -> None:
        """Load and validate the configuration; a bad value prints one line and exits with status 2."""
        if self["log-level"] and self["log-level"].lower() not in (*LOG_LEVELS, "warning"):
            raise usage.UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        try:
            self.config = load_config(self["config"], overrides=self.overrides())
        except ConfigError as e:
            sys.stderr.write(f"robonet: invalid configuration: {e}\n")
            raise SystemExit(2) from None
        parent = getattr(self, "parent", None)
        if parent is not None and not parent.get("logger"):
            from robonet.logs import configure

            parent["logger"] = configure(
                self.config.log.level,
                self.config.log.json_file,
                parent.get("logfile"),
                bool(parent.get("nodaemon")),
            )


def _tcp_port(desc: str) -> int | None:
    m = re.match(r"^(?:tcp|tcp6):(?:port=)?(\d+)", desc)
    return int(m.group(1)) if m else None


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """Build the robonet MultiService from parsed ``options`` (config already validated).

    ``reactor`` defaults to the global reactor (imported here, never at module level).
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    config = options.config if options.config is not None else load_config(None)
    return build_service(config, reactor, demo=bool(options["demo"]))


def build_service(config: Config, reactor: Any, *, demo: bool = False) -> MultiService:
    """Wire the store, hub and every enabled face into one MultiService."""
    from robonet.hub import Hub
    from robonet.node import load_node_identity
    from robonet.protocols.botlink import BotLinkFactory

    top = MultiService()
    state = config.state_path
    state.mkdir(parents=True, exist_ok=True)
    node = load_node_identity(state, config.hub.name, config.hub.project_id)

    store = None
    if config.store.enabled:
        from robonet.services.store import build_store

        store = build_store(config, reactor, node_id=node.node_id)
        store.setServiceParent(top)

    hub = Hub(config, reactor, store=store, node=node)
    hub.setServiceParent(top)
    config = setup_security(config, hub, reactor, top)

    if config.recorder.enabled:  # after the hub, before the faces: it stops once they have stopped
        from robonet.services.recorder import Recorder

        Recorder(config.recorder, config.recorder_dir, hub, reactor).setServiceParent(top)

    def serve(face: str, descs: tuple[str, ...] | list[str], factory: Any) -> None:
        hub.faces[face] = list(descs)
        for desc in descs:
            svc: IService = strports.service(with_backlog(desc), factory, reactor=reactor)
            svc.setServiceParent(top)

    if config.botlink.listen:
        serve("botlink", config.botlink.listen, BotLinkFactory(hub, config.botlink, reactor, config.auth))

    if config.line.listen:
        from robonet.protocols.linelink import LineLinkFactory

        serve("line", config.line.listen, LineLinkFactory(hub, config, reactor))

    extra_resources: dict[str, Any] = {}
    if config.camera.enabled:
        from robonet.services.camera import make_camera_service
        from robonet.services.camera_web import camera_resources

        camera = make_camera_service(config, hub, reactor)
        camera.setServiceParent(top)
        extra_resources.update(camera_resources(camera))
        hub.faces["camera"] = [
            config.camera.data_listen,
            config.camera.settings_listen,
            config.camera.auth_listen,
        ]

    if config.web.listen:
        from robonet.services.web import web_services

        hub.faces["web"] = list(config.web.listen)
        for svc in web_services(config, hub, reactor, extra_resources):
            svc.setServiceParent(top)

    if config.foxglove.listen:
        from robonet.services.foxglove import foxglove_services

        for svc in foxglove_services(config, hub, reactor):
            svc.setServiceParent(top)

    discovery = None
    if config.discovery.enabled:
        from robonet.services.discovery import DiscoveryService

        discovery = DiscoveryService(config, hub, node, reactor)
        discovery.setServiceParent(top)

    if config.botlink.listen:
        # Always with the bot link: peers.auto / peers.accept decide what it does, and peer_list
        # shows discovered hubs even when nothing is dialled.
        from robonet.services.peers import PeerService

        PeerService(config, hub, node, reactor, discovery=discovery).setServiceParent(top)

    if config.mqtt.enabled:
        from robonet.services.mqtt import MqttBridge

        hub.mqtt = MqttBridge(config, hub, reactor)
        hub.mqtt.setServiceParent(top)

    if demo:
        port = next((p for p in map(_tcp_port, config.botlink.listen) if p), None)
        if port is None:
            raise SystemExit("robonet: --demo needs a tcp:PORT bot link listen address")
        from robonet.sim import demo_fleet

        hub.stats_interval = 10.0  # a newcomer should see telemetry flowing without waiting a minute

        demo_fleet(reactor, "127.0.0.1", port).setServiceParent(top)

    log.info(
        "robonet {version} hub {name} (node {node_id}) state in {state}",
        version=robonet.__version__,
        name=config.hub.name,
        node_id=node.node_id,
        state=str(state),
    )
    return top


def setup_security(config: Config, hub: Any, reactor: Any, top: MultiService) -> Config:
    """Attach the auth core, audit log and control leases to ``hub`` (docs/security.rst); on a
    first start create the admin token and log the pairing URL; with ``[tls]`` on, make sure a
    certificate exists and add the ``ssl:`` listeners. Returns the config with those listeners."""
    import attrs

    from robonet.audit import AuditLog
    from robonet.auth import Auth
    from robonet.lease import Leases
    from robonet.tokens import TokenError, TokenStore

    state = config.state_path
    try:
        store = TokenStore(state, config.auth.tokens)
    except TokenError as e:
        sys.stderr.write(f"robonet: invalid configuration: {e}\n")
        raise SystemExit(2) from None
    first_start = not store.exists
    audit = AuditLog(config.auth.audit_max)
    auth = Auth(
        config.auth.mode,
        store,
        reactor,
        allow=config.auth.allow,
        poll_interval=config.auth.poll_interval,
        audit=audit,
    )
    auth.authorizer.log_interval = config.auth.deny_log_interval
    auth.setServiceParent(top)
    hub.auth, hub.audit = auth, audit
    if config.auth.lease:
        hub.leases = Leases()
    if config.auth.mode == "open":
        for line in (
            "#" * 72,
            "auth.mode = open: ANYONE who can reach this hub may drive every robot, change",
            "camera settings and read all history. Use mode = lan (default) or token.",
            "#" * 72,
        ):
            log.critical("{line}", line=line)
    tls_url = ""
    if config.tls.mode != "off":
        config, tls_url = _setup_tls(config, attrs)
    if first_start and config.auth.pairing and config.auth.mode != "open":
        rec, token = store.add("admin", "admin", reactor.seconds())
        audit.record(reactor.seconds(), None, face="hub", action="token_add", target=rec.name, outcome="ok")
        _log_pairing(config, token, tls_url)
    return config


def _pairing_url(config: Config, token: str, tls_url: str) -> str:
    host = config.auth.pairing_host or config.hub.name or "localhost"
    if tls_url:
        return f"{tls_url.replace('HOST', host)}/#token={token}"
    port = next((p for p in map(_tcp_port, config.web.listen) if p), 8000)
    return f"http://{host}:{port}/#token={token}"


def _log_pairing(config: Config, token: str, tls_url: str) -> None:
    url = _pairing_url(config, token, tls_url)
    local = url.replace(f"//{config.auth.pairing_host or config.hub.name or 'localhost'}:", "//localhost:", 1)
    qr_text = ""
    try:
        import io

        import qrcode

        qr = qrcode.QRCode(border=1)
        qr.add_data(url)
        buf = io.StringIO()
        qr.print_ascii(out=buf)
        qr_text = buf.getvalue()
    except Exception:  # no terminal QR code is no reason not to start
        qr_text = ""
    log.warn(
        "first start: created the admin token. Pair a dashboard by opening (shown only once):\n"
        "  {url}\n  (on this machine: {local})\n{qr}"
        "Manage tokens with: robonet token list|add|revoke --state-dir {state}",
        url=url,
        local=local,
        qr=qr_text,
        state=str(config.state_path),
    )


def _setup_tls(config: Config, attrs: Any) -> tuple[Config, str]:
    import datetime

    from robonet.tls import ensure_self_signed, fingerprint, ssl_listen

    if config.tls.mode == "files":
        if not config.tls.cert or not config.tls.key:
            sys.stderr.write(
                "robonet: invalid configuration: tls.cert and tls.key are needed for mode = files\n"
            )
            raise SystemExit(2)
        cert, key = config.tls.cert, config.tls.key
    else:
        now = datetime.datetime.now(datetime.UTC)
        cert_path, key_path, created = ensure_self_signed(config.state_path, config.hub.name, now)
        cert, key = str(cert_path), str(key_path)
        if created:
            log.info("tls: created a self-signed certificate in {path}", path=str(cert_path))
    try:
        fp = fingerprint(open(cert, "rb").read())
    except (OSError, ValueError) as e:
        sys.stderr.write(f"robonet: invalid configuration: tls.cert: cannot read {cert}: {e}\n")
        raise SystemExit(2) from None
    log.info("tls: certificate SHA-256 fingerprint {fingerprint}", fingerprint=fp)

    def extra(listens: tuple[str, ...], tls_listens: tuple[str, ...]) -> tuple[str, ...]:
        return (
            tuple(listens) + tuple(ssl_listen(d, cert, key) for d in tls_listens)
            if listens
            else tuple(listens)
        )

    config = attrs.evolve(
        config,
        web=attrs.evolve(config.web, listen=extra(config.web.listen, config.tls.web_listen)),
        botlink=attrs.evolve(config.botlink, listen=extra(config.botlink.listen, config.tls.botlink_listen)),
        line=attrs.evolve(config.line, listen=extra(config.line.listen, config.tls.line_listen)),
    )
    m = re.match(r"^ssl:(?:port=)?(\d+)", config.tls.web_listen[0]) if config.tls.web_listen else None
    return config, (f"https://HOST:{m.group(1)}" if m else "")
