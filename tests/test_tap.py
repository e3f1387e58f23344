"""``twistd robonet`` in process: ``tap.Options`` parsing and which services ``build_service`` builds.

Nothing is started or listened on: the MultiService is inspected (services are built, not started),
on a MemoryReactorClock, with ROBONET_* variables removed from the environment for each test.
"""

from __future__ import annotations

import io
import os
from typing import Any
from unittest import mock

from twisted.application.service import IServiceCollection, MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from robonet import tap
from robonet.hub import Hub
from robonet.protocols.botlink import BotLinkFactory
from robonet.protocols.linelink import LineLinkFactory
from robonet.testing import make_config

NO_OPTIONAL = {
    "store": {"enabled": False},
    "discovery": {"enabled": False},
    "camera": {"enabled": False},
    "foxglove": {"listen": []},
}


def walk(svc: Any) -> list[Any]:
    """Every service under ``svc`` (depth first, in start order), ``svc`` excluded."""
    out: list[Any] = []
    if IServiceCollection.providedBy(svc):
        for child in svc:
            out.append(child)
            out.extend(walk(child))
    return out


def factories(top: MultiService) -> list[Any]:
    """The protocol factories of the listening services under ``top``."""
    return [s.factory for s in walk(top) if hasattr(s, "factory") and hasattr(s, "endpoint")]


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROBONET_")}
        patcher = mock.patch.dict(os.environ, env, clear=True)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.state = self.mktemp()

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--state-dir", self.state, *argv])
        return options

    def test_defaults(self) -> None:
        """No options: the built-in defaults, with the state directory from --state-dir."""
        config = self.parse().config
        assert config is not None
        self.assertEqual(list(config.botlink.listen), ["tcp:5100"])
        self.assertEqual(list(config.line.listen), ["tcp:5555"])
        self.assertEqual(list(config.web.listen), ["tcp:8000"])
        self.assertEqual(str(config.state_path), os.path.abspath(self.state))

    def test_repeatable_listen_and_overrides(self) -> None:
        """--botlink is repeatable (a list); --name, --log-level and the camera ports override."""
        config = self.parse(
            "--botlink", "tcp:5100", "--botlink", "tcp:5101:interface=127.0.0.1",
            "--name", "hub-a", "--log-level", "DEBUG", "--camera-data", "tcp:6000",
        ).config  # fmt: skip
        assert config is not None
        self.assertEqual(list(config.botlink.listen), ["tcp:5100", "tcp:5101:interface=127.0.0.1"])
        self.assertEqual((config.hub.name, config.log.level), ("hub-a", "debug"))
        self.assertEqual(config.camera.data_listen, "tcp:6000")

    def test_command_line_beats_environment(self) -> None:
        """Precedence: the environment overrides defaults, the command line overrides both."""
        os.environ["ROBONET_HUB_NAME"] = "from-env"
        os.environ["ROBONET_BOTLINK_MAX_FRAME"] = "4096"
        config = self.parse("--name", "from-cli").config
        assert config is not None
        self.assertEqual((config.hub.name, config.botlink.max_frame), ("from-cli", 4096))

    def test_config_file(self) -> None:
        """--config FILE is a layer between defaults and the command line."""
        path = os.path.join(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write('[hub]\nname = "from-file"\n[line]\nmax_line = 1024\n')
        config = self.parse("--config", path, "--line", "tcp:7000").config
        assert config is not None
        self.assertEqual(
            (config.hub.name, config.line.max_line, list(config.line.listen)),
            ("from-file", 1024, ["tcp:7000"]),
        )

    def test_none_disables_faces(self) -> None:
        """The value none disables a face (empty listen list / empty endpoint)."""
        config = self.parse(
            "--botlink", "none", "--line", "none", "--web", "none", "--camera-auth", "none"
        ).config
        assert config is not None
        self.assertEqual(
            (list(config.botlink.listen), list(config.line.listen), list(config.web.listen)), ([], [], [])
        )
        self.assertFalse(config.camera.auth_listen)

    def test_bad_log_level(self) -> None:
        """An unknown --log-level is a usage error."""
        self.assertRaises(usage.UsageError, self.parse, "--log-level", "loud")

    def test_invalid_config_exits_2_with_one_line(self) -> None:
        """An invalid value (here a single-valued option given twice, or a bad environment value)
        prints one line naming it and exits with status 2."""
        for argv, env, name in (
            (("--camera-data", "tcp:1", "--camera-data", "tcp:2"), {}, "--camera-data"),
            ((), {"ROBONET_BOTLINK_MAX_FRAME": "lots"}, "botlink.max_frame"),
        ):
            err = io.StringIO()
            with mock.patch.dict(os.environ, env), mock.patch("sys.stderr", err):
                with self.assertRaises(SystemExit) as caught:
                    self.parse(*argv)
            self.assertEqual(caught.exception.code, 2)
            self.assertEqual(err.getvalue().count("\n"), 1, err.getvalue())
            self.assertIn(name, err.getvalue())


class BuildServiceTests(SynchronousTestCase):
    def build(self, demo: bool = False, **sections: dict[str, Any]) -> MultiService:
        merged = {k: dict(v) for k, v in NO_OPTIONAL.items()}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        return tap.build_service(make_config(self, **merged), MemoryReactorClock(), demo=demo)

    def test_default_faces(self) -> None:
        """Bot link, line link and web each get a listening service; the hub is built once and
        comes before the faces (so it stops after them); nothing is started."""
        top = self.build(foxglove={"listen": ["tcp:0"]})
        children = list(top)
        hubs = [s for s in children if isinstance(s, Hub)]
        self.assertEqual(len(hubs), 1)
        self.assertIs(children[0], hubs[0])
        kinds = [type(f) for f in factories(top)]
        self.assertIn(BotLinkFactory, kinds)
        self.assertIn(LineLinkFactory, kinds)
        self.assertEqual([s.name for s in walk(top) if (s.name or "").startswith("web:")][-1], "web:relay")
        self.assertEqual(sorted(hubs[0].faces), ["botlink", "foxglove", "line", "web"])
        self.assertFalse(any(s.running for s in walk(top)))

    def test_one_service_per_listen_address(self) -> None:
        """Two bot-link addresses: two listening services sharing one factory."""
        top = self.build(botlink={"listen": ["tcp:0", "tcp:0:interface=127.0.0.1"]})
        botlinks = [f for f in factories(top) if isinstance(f, BotLinkFactory)]
        self.assertEqual(len(botlinks), 2)
        self.assertIs(botlinks[0], botlinks[1])

    def test_disabled_faces(self) -> None:
        """Empty listen lists build no service for that face; no peer service without a bot link."""
        from robonet.services.peers import PeerService

        top = self.build(
            botlink={"listen": []}, line={"listen": []}, web={"listen": []}, discovery={"enabled": True}
        )
        self.assertEqual(factories(top), [])
        self.assertFalse(any(isinstance(s, PeerService) for s in walk(top)))
        self.assertEqual(
            [type(s) for s in top if type(s).__name__ == "DiscoveryService"][0].__name__, "DiscoveryService"
        )

    def test_store_first(self) -> None:
        """With the store on it is the first service (it stops last, after the hub, flushing)."""
        from robonet.services.store import TelemetryStore

        top = self.build(store={"enabled": True})
        children = list(top)
        self.assertIsInstance(children[0], TelemetryStore)
        self.assertIsInstance(children[1], Hub)
        self.assertIs(children[1].store, children[0])

    def test_camera_and_peers(self) -> None:
        """camera.enabled builds the camera service (ports, pipeline, settings store) and its web
        resources; discovery with peers.auto builds the peer service next to the bot link."""
        from robonet.services.camera import CameraService
        from robonet.services.peers import PeerService

        top = self.build(
            camera={"enabled": True, "password": "x", "data_listen": "tcp:0", "settings_listen": "none"},
            discovery={"enabled": True, "mdns": False},
        )
        (camera,) = [s for s in top if isinstance(s, CameraService)]
        self.assertIn(camera.data_factory, factories(top))
        self.assertNotIn(camera.settings_factory, factories(top))
        self.assertTrue(any(isinstance(s, PeerService) for s in top))

    def test_demo_needs_tcp_botlink(self) -> None:
        """--demo without a tcp bot-link address stops startup with a message."""
        with self.assertRaises(SystemExit) as caught:
            self.build(demo=True, botlink={"listen": []})
        self.assertIn("--demo", str(caught.exception.code))

    def test_make_service_uses_options_config(self) -> None:
        """makeService builds from the config parsed by Options on the given reactor."""
        options = tap.Options()
        with mock.patch.dict(
            os.environ, {k: v for k, v in os.environ.items() if not k.startswith("ROBONET_")}, clear=True
        ):
            options.parseOptions(
                ["--state-dir", self.mktemp(), "--line", "none", "--web", "none", "--botlink", "tcp:0"]
            )
        assert options.config is not None
        options.config = make_config(
            self, hub={"state_dir": str(options.config.state_path)}, line={"listen": []}, web={"listen": []},
            botlink={"listen": ["tcp:0"]}, **NO_OPTIONAL,
        )  # fmt: skip
        top = tap.makeService(options, reactor=MemoryReactorClock())
        self.assertEqual([type(f) for f in factories(top)], [BotLinkFactory])
