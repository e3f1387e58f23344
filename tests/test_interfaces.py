"""The typed seams of robonet/interfaces.py: the real classes provide every member their Protocol
declares, the hub's attach/rename seams behave, peer modules do not import each other in a cycle,
and the faces written against the seams do not write into stats or other objects' internals."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.trial import unittest

import robonet
from robonet import interfaces
from robonet.config import load_config
from robonet.hub import Hub
from robonet.stats import Stats

ROOT = Path(robonet.__file__).parent


def protocol_members(proto: type) -> set[str]:
    """Names a typing.Protocol declares (methods, properties and annotated attributes)."""
    names: set[str] = set()
    for klass in proto.__mro__:
        if klass in (object,) or klass.__name__ in ("Protocol", "Generic"):
            continue
        names.update(getattr(klass, "__annotations__", {}))
        names.update(n for n in vars(klass) if not n.startswith("_"))
    return names


def missing(proto: type, obj: Any) -> list[str]:
    """Members of ``proto`` that ``obj`` lacks, or whose call signatures do not take the same
    parameter names (a cheap runtime stand-in for mypy's structural check)."""
    out = []
    for name in sorted(protocol_members(proto)):
        if not hasattr(obj, name):
            out.append(name)
            continue
        want = getattr(proto, name, None)
        have = getattr(obj, name)
        if inspect.isfunction(want) and callable(have):
            want_params = [p for p in inspect.signature(want).parameters if p != "self"]
            have_params = list(inspect.signature(have).parameters)
            if [p for p in want_params if p not in have_params]:
                out.append(f"{name}{inspect.signature(have)}")
    return out


def config(tmp: str, **sections: dict[str, Any]) -> Any:
    overrides: dict[str, dict[str, Any]] = {"hub": {"state_dir": tmp}, "store": {"enabled": False}}
    overrides.update(sections)
    return load_config(environ={}, overrides=overrides)


class ProvidedTests(unittest.SynchronousTestCase):
    """Each implementation provides its seam."""

    def test_hub_is_a_face_hub(self) -> None:
        hub = Hub(config(self.mktemp()), task.Clock())
        self.assertEqual(missing(interfaces.FaceHub, hub), [])

    def test_stats_is_a_stats_sink(self) -> None:
        self.assertEqual(missing(interfaces.StatsSink, Stats(0.0)), [])

    def test_store_and_batch(self) -> None:
        from robonet.services.store import Batch, TelemetryStore

        store = TelemetryStore(Path(self.mktemp()) / "t.sqlite3", reactor=task.Clock())
        self.assertEqual(missing(interfaces.Store, store), [])
        self.assertIsInstance(Batch(), interfaces.Batch)

    def test_peer_service(self) -> None:
        from robonet.node import NodeIdentity
        from robonet.services.peerlink import LinkOwner
        from robonet.services.peers import PeerService

        cfg = config(self.mktemp())
        clock = task.Clock()
        hub = Hub(cfg, clock)
        node = NodeIdentity("aaaaaaaa-0000-4000-8000-000000000001", "a", "default", "", "0")
        svc = PeerService(cfg, hub, node, clock)
        for proto in (
            interfaces.PeerService,
            interfaces.PeerDirectory,
            interfaces.PeerAcceptor,
            LinkOwner,
        ):
            self.assertEqual(missing(proto, svc), [], proto.__name__)

    def test_peer_channels_and_session(self) -> None:
        from robonet.services.peerconn import BotlinkChannel, PeerClientProtocol, ResponderHandler

        for klass in (BotlinkChannel, PeerClientProtocol):
            self.assertEqual(
                [m for m in missing(interfaces.PeerChannel, klass) if m != "transport"], [], klass
            )
        self.assertEqual(missing(interfaces.PeerSession, ResponderHandler), [])


class HubSeamTests(unittest.SynchronousTestCase):
    """The public hub methods that replace writes into its attributes."""

    def setUp(self) -> None:
        self.hub = Hub(config(self.mktemp()), task.Clock())

    def test_attach_and_detach_peers(self) -> None:
        """attach_peers installs the service and its acceptor; detach only undoes its own."""

        class Service:
            acceptor: Any = None

            def peer_list(self) -> dict[str, Any]:
                return {"peers": [{"node_id": "x"}]}

            def broadcast_to_peers(self, body: Any) -> int:
                return 1

            def send_to_peer(self, node_id: str, body: Any) -> bool:
                return True

        accepting, refusing = Service(), Service()
        accepting.acceptor = object()
        self.hub.attach_peers(accepting)
        self.assertIs(self.hub.peer_acceptor, accepting.acceptor)
        self.assertEqual(
            self.successResultOf(self.hub.request("peer_list", None, "t")), accepting.peer_list()
        )
        self.assertEqual(self.hub.broadcast_to_peers({}), 1)
        self.hub.detach_peers(refusing)  # not the attached one: nothing changes
        self.assertIs(self.hub.peers, accepting)
        self.hub.attach_peers(refusing)
        self.assertIsNone(self.hub.peer_acceptor)
        self.hub.detach_peers(refusing)
        self.assertIsNone(self.hub.peers)
        self.assertEqual(self.successResultOf(self.hub.request("peer_list", None, "t")), {"peers": []})

    def test_rename(self) -> None:
        """rename sets the name (cut to 128) and emits device_update only when it changed."""
        events: list[str] = []
        self.hub.registry.observe(lambda ev, dev: events.append(ev))
        dev = self.hub.connect(None, "r1", face="web", role="robot", address="x")
        self.hub.rename(dev, "Robot 1")
        self.hub.rename(dev, "Robot 1")
        self.hub.rename(dev, "n" * 200)
        self.assertEqual(events, ["device_up", "device_update", "device_update"])
        self.assertEqual(dev.name, "n" * 128)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any level (TYPE_CHECKING blocks included)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


class StructureTests(unittest.SynchronousTestCase):
    """Import graph and internals discipline of the modules behind the seams."""

    def test_no_peer_import_cycle(self) -> None:
        """peerlink.py and peerconn.py never import services/peers.py (not even for types), and
        peerlink.py does not import peerconn.py: the graph is peers -> peerconn -> peerlink."""
        services = ROOT / "services"
        self.assertNotIn("robonet.services.peers", _imports(services / "peerlink.py"))
        self.assertNotIn("robonet.services.peerconn", _imports(services / "peerlink.py"))
        self.assertNotIn("robonet.services.peers", _imports(services / "peerconn.py"))

    def test_peerlink_imports_alone(self) -> None:
        """Importing the link modules does not pull in the service."""
        code = (
            "import sys, robonet.services.peerconn, robonet.services.peerlink; "
            "sys.exit('robonet.services.peers' in sys.modules)"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}  # this checkout, not an installed copy
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=60, cwd=ROOT.parent, env=env
        )
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_faces_do_not_write_stats_or_foreign_internals(self) -> None:
        """No ``x.stats.<field> += ...`` / ``x.stats.<dict>[k] = ...``, no ``x.hub.<attr> = ...`` (the
        PeerService used to install itself that way) and no assignment to another object's
        ``_private`` attribute in the modules typed against the seams."""
        files = [
            "protocols/websocket.py",
            "protocols/staircase.py",
            "protocols/wsoptions.py",
            "teleop.py",
            "services/peers.py",
            "services/peerlink.py",
            "services/peerconn.py",
        ]
        bad = []
        for rel in files:
            tree = ast.parse((ROOT / rel).read_text())
            for node in ast.walk(tree):
                targets: list[ast.expr] = []
                if isinstance(node, ast.Assign):
                    targets = list(node.targets)
                elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                    targets = [node.target]
                for target in targets:
                    text = ast.unparse(target)
                    if ".stats." in f"{text}." and not text.startswith("self.stats"):
                        bad.append(f"{rel}:{node.lineno}: {text}")
                    if isinstance(target, ast.Attribute) and ast.unparse(target.value).endswith("hub"):
                        bad.append(f"{rel}:{node.lineno}: {text}")  # hub state: use its methods
                    if isinstance(target, ast.Attribute) and target.attr.startswith("_"):
                        owner = ast.unparse(target.value)
                        if owner != "self" and not (rel == "protocols/wsoptions.py" and owner == "factory"):
                            bad.append(f"{rel}:{node.lineno}: {text}")
        self.assertEqual(bad, [])
