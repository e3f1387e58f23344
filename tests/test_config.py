"""Configuration (ARCHITECTURE.md "Configuration keys"): defaults, precedence, parsing, errors.

Precedence is built-in defaults < TOML file < environment < command-line overrides. Unknown keys and
invalid values raise ConfigError naming the key; ``twistd robonet`` turns that into one line and a
non-zero exit (checked in a subprocess). The camera's original ES_Stream_MTX variables are honoured.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from robonet.config import DEFAULT_COMMANDS, SECTIONS, Config, ConfigError, load_config
from tests.daemon import REPO, free_port, start_daemon, wait_for_port

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

# Keys whose value is one of a fixed set: a valid non-default value for each.
CHOICES = {
    ("log", "level"): "debug",
    ("camera", "pipeline"): "test",
    ("store", "synchronous"): "full",
    ("auth", "mode"): "token",
    ("auth", "allow"): ("203.0.113.0/24", "2001:db8::/32"),
    ("tls", "mode"): "auto",
    ("peers", "forward"): ("telemetry", "status"),
    ("hub", "state_dir"): "/srv/robonet-state",
    ("recorder", "compression"): "lz4",
    ("store", "backend"): "postgresql",
    ("store", "dsn"): "postgresql://robonet@127.0.0.1:5432/robonet",
    ("mqtt", "protocol"): "5",
    ("mqtt", "data_qos"): 1,
    ("mqtt", "status_qos"): 0,
    ("mqtt", "qos_by_type"): {"telemetry": 2},
}


def toml_value(v: Any) -> str:
    """A tiny TOML writer for the values config uses (strings, numbers, bools, lists, tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def write_toml(path: Path, data: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(v)}" for key, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def other_value(section: str, name: str, default: Any) -> Any:
    """A valid value different from ``default`` for key ``section.name``."""
    if (section, name) in CHOICES:
        return CHOICES[(section, name)]
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 7
    if isinstance(default, float):
        return default + 1.5
    if name.endswith("listen"):
        return ("tcp:7001", "tcp:7002") if isinstance(default, tuple) else "tcp:7003"
    if isinstance(default, tuple):
        return ("alpha", "beta")
    if isinstance(default, dict):
        return {"10.0.0.9": "robot"}
    if isinstance(default, str):
        return default + "-changed"
    raise TypeError((section, name, default))


def everything_changed() -> dict[str, dict[str, Any]]:
    """Every key of every section with a non-default value."""
    out: dict[str, dict[str, Any]] = {}
    defaults = Config()
    for section, cls in SECTIONS.items():
        current = getattr(defaults, section)
        out[section] = {
            f.name: other_value(section, f.name, getattr(current, f.name)) for f in attrs.fields(cls)
        }
    return out


def env_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v if not isinstance(v, tuple) else list(v))
    return str(v)


class DefaultsTests(SynchronousTestCase):
    """Built-in defaults match ARCHITECTURE.md's table."""

    def test_defaults(self) -> None:
        """Each documented default."""
        c = load_config(environ={"STATE_DIRECTORY": "/var/lib/robonet"})
        self.assertEqual(c.hub.name, socket.gethostname())
        self.assertEqual((c.hub.project_id, c.hub.state_dir), ("default", "/var/lib/robonet"))
        self.assertEqual(c.hub.commands, DEFAULT_COMMANDS)
        self.assertEqual(
            DEFAULT_COMMANDS,
            (
                "robot_move",
                "camera_move",
                "set_speed",
                "set_brightness",
                "set",
                "stop",
                "movement_instruction",
                "trial_response",
                "line",
            ),
        )
        b = c.botlink
        self.assertEqual(
            (
                b.listen,
                b.max_frame,
                b.idle_timeout,
                b.ack_timeout,
                b.legacy_poll_wait,
                b.legacy_queue,
                b.legacy_names,
                b.max_hello_frame,
                b.hello_timeout,
                b.max_per_ip,
            ),
            (("tcp:5100",), 1048576, 30.0, 5.0, 10.0, 32, {}, 65536, 10.0, 64),
        )
        self.assertEqual((c.line.listen, c.line.max_line, c.line.max_clients), (("tcp:5555",), 65536, 256))
        cam = c.camera
        self.assertEqual(
            (
                cam.enabled,
                cam.data_listen,
                cam.settings_listen,
                cam.auth_listen,
                cam.password,
                cam.require_auth,
                cam.auth_ttl,
                cam.auth_max_failures,
                cam.rate_hz,
                cam.data_source,
                cam.pipeline,
                cam.stall_timeout,
                cam.rtsp_url,
            ),
            (
                True,
                "tcp:5000",
                "tcp:5001",
                "tcp:5002",
                "",
                True,
                43200.0,
                5,
                24.0,
                "random",
                "off",
                10.0,
                "rtsp://localhost:8554/ES_MTX",
            ),
        )
        w = c.web
        self.assertEqual(
            (
                w.listen,
                w.allowed_origins,
                w.max_queue_bytes,
                w.slow_timeout,
                w.max_message,
                w.header_timeout,
                w.echo,
            ),
            (("tcp:8000",), (), 1048576, 10.0, 1048576, 10.0, False),
        )
        s = c.store
        self.assertEqual(
            (s.enabled, s.path, s.retention_days, s.max_rows, s.synchronous),
            (True, "", 30.0, 5000000, "normal"),
        )
        d = c.discovery
        self.assertEqual(
            (d.enabled, d.port, d.interval, d.broadcast_addresses, d.mdns), (True, 8890, 5.0, (), True)
        )
        p = c.peers
        self.assertEqual(
            (p.auto, p.static, p.require_same_hash, p.forward, p.secret), (True, (), False, "all", "")
        )
        self.assertEqual((c.auth.mode, c.auth.tokens), ("lan", {}))
        self.assertEqual(c.teleop.deadman_ms, 500)
        self.assertEqual((c.log.level, c.log.json_file), ("info", ""))

    def test_state_dir_defaults(self) -> None:
        """state_dir: $STATE_DIRECTORY (first), else $XDG_STATE_HOME/robonet, else ~/.local/state/robonet."""
        self.assertEqual(load_config(environ={"STATE_DIRECTORY": "/a:/b"}).hub.state_dir, "/a")
        self.assertEqual(load_config(environ={"XDG_STATE_HOME": "/x"}).hub.state_dir, "/x/robonet")
        self.assertEqual(load_config(environ={}).hub.state_dir, os.path.expanduser("~/.local/state/robonet"))

    def test_store_path(self) -> None:
        """store.path defaults to <state_dir>/telemetry.sqlite3."""
        c = load_config(environ={}, overrides={"hub": {"state_dir": "/s"}})
        self.assertEqual(str(c.store_path), "/s/telemetry.sqlite3")
        c = load_config(environ={}, overrides={"hub": {"state_dir": "/s"}, "store": {"path": "/t/x.db"}})
        self.assertEqual(str(c.store_path), "/t/x.db")

    def test_example_config_is_defaults(self) -> None:
        """etc/robonet.toml parses and equals the built-in defaults."""
        self.assertEqual(load_config(str(REPO / "etc" / "robonet.toml"), environ={}), load_config(environ={}))


class PrecedenceTests(SynchronousTestCase):
    """defaults < file < environment < overrides."""

    def test_layers(self) -> None:
        """Each layer beats the one below it, key by key."""
        path = write_toml(
            Path(self.mktemp()), {"botlink": {"idle_timeout": 40, "ack_timeout": 7, "legacy_queue": 3}}
        )
        env = {"ROBONET_BOTLINK_IDLE_TIMEOUT": "50", "ROBONET_BOTLINK_ACK_TIMEOUT": "8"}
        c = load_config(path, environ=env, overrides={"botlink": {"idle_timeout": 60}})
        self.assertEqual(
            (c.botlink.idle_timeout, c.botlink.ack_timeout, c.botlink.legacy_queue), (60.0, 8.0, 3)
        )
        self.assertEqual(c.botlink.max_frame, 1048576)
        c = load_config(path, environ=env)
        self.assertEqual(c.botlink.idle_timeout, 50.0)
        c = load_config(path, environ={})
        self.assertEqual(c.botlink.idle_timeout, 40.0)

    def test_env_over_camera_vars(self) -> None:
        """ROBONET_CAMERA_* beats the camera's original variables."""
        c = load_config(environ={"DATA_PORT": "6000", "ROBONET_CAMERA_DATA_LISTEN": "tcp:6500"})
        self.assertEqual(c.camera.data_listen, "tcp:6500")

    def test_override_listen(self) -> None:
        """Command-line listen values (lists) replace the file's."""
        path = write_toml(Path(self.mktemp()), {"botlink": {"listen": ["tcp:1", "tcp:2"]}})
        c = load_config(path, environ={}, overrides={"botlink": {"listen": ["tcp:3"]}})
        self.assertEqual(c.botlink.listen, ("tcp:3",))


class EverySectionTests(SynchronousTestCase):
    """Every key of every section is read from the file and from the environment."""

    def test_file(self) -> None:
        """A file setting every key to a non-default value yields exactly those values."""
        data = everything_changed()
        c = load_config(write_toml(Path(self.mktemp()), data), environ={})
        for section, values in data.items():
            for key, value in values.items():
                got = getattr(getattr(c, section), key)
                want = tuple(value) if isinstance(value, list) else value
                self.assertEqual(got, want, f"{section}.{key}")

    def test_environment(self) -> None:
        """ROBONET_<SECTION>_<KEY> for every key, as text, yields the same values."""
        data = everything_changed()
        env = {
            f"ROBONET_{section.upper()}_{key.upper()}": env_text(value)
            for section, values in data.items()
            for key, value in values.items()
        }
        c = load_config(environ=env)
        for section, values in data.items():
            for key, value in values.items():
                self.assertEqual(getattr(getattr(c, section), key), value, f"{section}.{key}")


class EnvParsingTests(SynchronousTestCase):
    """How environment text becomes lists, bools, numbers and tables."""

    def test_lists(self) -> None:
        """Lists are JSON or comma-separated; a single endpoint string is a one-item list; none disables."""
        cases = {
            '["tcp:1", "tcp:2"]': ("tcp:1", "tcp:2"),
            "tcp:1, tcp:2": ("tcp:1", "tcp:2"),
            "tcp:5100:interface=127.0.0.1": ("tcp:5100:interface=127.0.0.1",),
            "none": (),
            "[]": (),
        }
        for text, want in cases.items():
            self.assertEqual(load_config(environ={"ROBONET_BOTLINK_LISTEN": text}).botlink.listen, want, text)
        c = load_config(environ={"ROBONET_HUB_COMMANDS": "stop,dance"})
        self.assertEqual(c.hub.commands, ("stop", "dance"))

    def test_bools(self) -> None:
        """1/true/yes/on and 0/false/no/off, any case."""
        for text, want in (
            ("1", True),
            ("TRUE", True),
            ("yes", True),
            ("On", True),
            ("0", False),
            ("false", False),
            ("NO", False),
            ("off", False),
        ):
            self.assertEqual(load_config(environ={"ROBONET_WEB_ECHO": text}).web.echo, want, text)

    def test_numbers(self) -> None:
        """Numbers are parsed; integers must be integers."""
        c = load_config(
            environ={"ROBONET_BOTLINK_IDLE_TIMEOUT": " 2.5 ", "ROBONET_BOTLINK_MAX_PER_IP": "2000"}
        )
        self.assertEqual((c.botlink.idle_timeout, c.botlink.max_per_ip), (2.5, 2000))

    def test_tables(self) -> None:
        """Tables are JSON objects of strings."""
        c = load_config(environ={"ROBONET_AUTH_TOKENS": '{"abc": "robot", "def": "client"}'})
        self.assertEqual(c.auth.tokens, {"abc": "robot", "def": "client"})
        c = load_config(environ={"ROBONET_BOTLINK_LEGACY_NAMES": '{"10.0.0.5": "carto"}'})
        self.assertEqual(c.botlink.legacy_names, {"10.0.0.5": "carto"})

    def test_forward(self) -> None:
        """peers.forward is all, none or a list of types."""
        self.assertEqual(load_config(environ={"ROBONET_PEERS_FORWARD": "NONE"}).peers.forward, "none")
        self.assertEqual(
            load_config(environ={"ROBONET_PEERS_FORWARD": "telemetry,status"}).peers.forward,
            ("telemetry", "status"),
        )

    def test_other_variables_ignored(self) -> None:
        """Variables without the ROBONET_ prefix (other than the camera's) are ignored."""
        load_config(environ={"PATH": "/bin", "ROBONETX": "1", "HOME": "/root"})


class CameraEnvTests(SynchronousTestCase):
    """The camera's original ES_Stream_MTX variables (spec/camera.md)."""

    def test_ports_and_host(self) -> None:
        """SERVER_HOST + DATA/SETTINGS/AUTH_PORT become the camera's listen endpoints."""
        c = load_config(
            environ={
                "SERVER_HOST": "127.0.0.1",
                "DATA_PORT": "6000",
                "SETTINGS_PORT": "6001",
                "AUTH_PORT": "6002",
            }
        )
        self.assertEqual(
            (c.camera.data_listen, c.camera.settings_listen, c.camera.auth_listen),
            ("tcp:6000:interface=127.0.0.1", "tcp:6001:interface=127.0.0.1", "tcp:6002:interface=127.0.0.1"),
        )

    def test_host_only(self) -> None:
        """SERVER_HOST alone binds the default ports to that host."""
        c = load_config(environ={"SERVER_HOST": "10.1.2.3"})
        self.assertEqual(c.camera.settings_listen, "tcp:5001:interface=10.1.2.3")

    def test_port_only(self) -> None:
        """A port variable alone changes that port, on every interface."""
        c = load_config(environ={"AUTH_PORT": "7002"})
        self.assertEqual((c.camera.auth_listen, c.camera.data_listen), ("tcp:7002", "tcp:5000"))

    def test_password_and_log_level(self) -> None:
        """AUTH_PASSWORD sets camera.password; LOG_LEVEL sets log.level (case-insensitive)."""
        c = load_config(environ={"AUTH_PASSWORD": "pw", "LOG_LEVEL": "DEBUG"})
        self.assertEqual((c.camera.password, c.log.level), ("pw", "debug"))

    def test_bad_port(self) -> None:
        """A non-numeric port variable is a ConfigError naming the variable."""
        with self.assertRaises(ConfigError) as cm:
            load_config(environ={"DATA_PORT": "five"})
        self.assertEqual(cm.exception.key, "DATA_PORT")

    def test_camera_listens(self) -> None:
        """The real daemon with SERVER_HOST/DATA_PORT/SETTINGS_PORT/AUTH_PORT listens on those ports."""
        ports = [free_port() for _ in range(3)]
        d = start_daemon(
            self,
            faces=("botlink",),
            store=False,
            env={
                "ROBONET_CAMERA_ENABLED": "true",
                "SERVER_HOST": "127.0.0.1",
                "DATA_PORT": str(ports[0]),
                "SETTINGS_PORT": str(ports[1]),
                "AUTH_PORT": str(ports[2]),
                "AUTH_PASSWORD": "pw",
            },
        )
        for port in ports:
            wait_for_port(port, d.proc, timeout=10)
        self.assertTrue(d.alive())
        self.assertIn(d.stop(), (0, -signal.SIGTERM))


class ErrorTests(SynchronousTestCase):
    """Unknown keys and invalid values raise one-line ConfigErrors naming the key."""

    def assertConfigError(self, key: str, *, path: str | None = None, **kw: Any) -> ConfigError:
        with self.assertRaises(ConfigError) as cm:
            load_config(path, **{"environ": {}, **kw})
        self.assertEqual(cm.exception.key, key)
        self.assertTrue(str(cm.exception).startswith(key + ": "), str(cm.exception))
        self.assertNotIn("\n", str(cm.exception))
        return cm.exception

    def test_unknown_key(self) -> None:
        """An unknown key in a known section, from the file, env or overrides."""
        path = write_toml(Path(self.mktemp()), {"botlink": {"idle_timout": 3}})
        self.assertConfigError("botlink.idle_timout", path=path)
        self.assertConfigError("botlink.idle_timout", environ={"ROBONET_BOTLINK_IDLE_TIMOUT": "3"})
        self.assertConfigError("web.nope", overrides={"web": {"nope": 1}})

    def test_unknown_section(self) -> None:
        """An unknown section in the file or the environment."""
        path = write_toml(Path(self.mktemp()), {"bot": {"listen": "tcp:1"}})
        self.assertConfigError("bot", path=path)
        self.assertConfigError("ROBONET_NOPE_X", environ={"ROBONET_NOPE_X": "1"})

    def test_section_not_table(self) -> None:
        """A section that is not a table."""
        p = Path(self.mktemp())
        p.write_text('botlink = "tcp:5100"\n')
        self.assertConfigError("botlink", path=str(p))

    def test_invalid_values(self) -> None:
        """Wrong types, out-of-range numbers, bad choices and bad endpoints name their key."""
        cases: list[tuple[str, str, Any]] = [
            ("botlink", "idle_timeout", "soon"),
            ("botlink", "idle_timeout", 0),
            ("botlink", "idle_timeout", -5),
            ("botlink", "idle_timeout", True),
            ("botlink", "max_frame", 1.5),
            ("botlink", "max_frame", 0),
            ("botlink", "max_frame", "1MB"),
            ("botlink", "listen", "5100"),
            ("botlink", "listen", [5100]),
            ("botlink", "legacy_names", {"10.0.0.1": 5}),
            ("botlink", "legacy_names", ["a"]),
            ("hub", "commands", 5),
            ("hub", "name", 7),
            ("camera", "pipeline", "gpu"),
            ("camera", "enabled", "maybe"),
            ("camera", "data_listen", ["tcp:1", "tcp:2"]),
            ("store", "synchronous", "extra"),
            ("store", "retention_days", -1),
            ("store", "max_rows", -1),
            ("auth", "mode", "password"),
            ("log", "level", "loud"),
            ("peers", "forward", 3),
            ("teleop", "deadman_ms", -1),
            ("web", "echo", 1),
        ]
        for section, key, value in cases:
            path = write_toml(Path(self.mktemp()), {section: {key: value}})
            err = self.assertConfigError(f"{section}.{key}", path=path)
            self.assertIn(repr(value) if not isinstance(value, list) else "", str(err))

    def test_invalid_env_values(self) -> None:
        """Invalid environment text names the key."""
        for name, text, key in (
            ("ROBONET_BOTLINK_IDLE_TIMEOUT", "soon", "botlink.idle_timeout"),
            ("ROBONET_BOTLINK_MAX_PER_IP", "2.5", "botlink.max_per_ip"),
            ("ROBONET_WEB_ECHO", "perhaps", "web.echo"),
            ("ROBONET_AUTH_TOKENS", "{not json", "auth.tokens"),
            ("ROBONET_AUTH_TOKENS", "a,b", "auth.tokens"),
            ("ROBONET_HUB_COMMANDS", "[1, 2]", "hub.commands"),
            ("ROBONET_HUB_COMMANDS", "[unclosed", "hub.commands"),
        ):
            self.assertConfigError(key, environ={name: text})

    def test_non_finite_numbers(self) -> None:
        """nan and inf are not valid durations or sizes."""
        for text in ("nan", "inf", "-inf"):
            self.assertConfigError("botlink.idle_timeout", environ={"ROBONET_BOTLINK_IDLE_TIMEOUT": text})
        path = write_toml(Path(self.mktemp()), {"botlink": {}})
        Path(path).write_text("[botlink]\nack_timeout = nan\n")
        self.assertConfigError("botlink.ack_timeout", path=path)
        Path(path).write_text("[web]\nslow_timeout = inf\n")
        self.assertConfigError("web.slow_timeout", path=path)

    def test_port_range(self) -> None:
        """discovery.port must be a valid UDP port number."""
        self.assertConfigError("discovery.port", environ={"ROBONET_DISCOVERY_PORT": "70000"})
        self.assertEqual(load_config(environ={"ROBONET_DISCOVERY_PORT": "65535"}).discovery.port, 65535)

    def test_unreadable_and_invalid_toml(self) -> None:
        """A missing file or invalid TOML is an error naming --config."""
        self.assertConfigError("--config", path="/nonexistent/robonet.toml")
        p = Path(self.mktemp())
        p.write_text("[botlink\nlisten = \n")
        err = self.assertConfigError("--config", path=str(p))
        self.assertIn(str(p), str(err))


class TwistdConfigErrorTests(SynchronousTestCase):
    """``twistd robonet`` with a bad configuration: one line naming the key, non-zero exit, no traceback."""

    def run_twistd(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ROBONET_")}
        full_env.update({"PYTHONPATH": str(REPO), **(env or {})})
        return subprocess.run(
            [TWISTD, "-n", "--pidfile=", "robonet", "--state-dir", self.mktemp(), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=full_env,
        )

    def assertOneLine(self, result: subprocess.CompletedProcess[str], needle: str) -> None:
        out = (result.stdout + result.stderr).strip()
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(len(out.splitlines()), 1, out)
        self.assertIn(needle, out)
        self.assertNotIn("Traceback", out)

    def test_bad_value_in_file(self) -> None:
        """A bad value in --config names section.key."""
        path = write_toml(Path(self.mktemp()), {"botlink": {"idle_timeout": "soon"}})
        self.assertOneLine(self.run_twistd("--config", path), "botlink.idle_timeout")

    def test_unknown_key_in_file(self) -> None:
        """An unknown key in --config names it."""
        path = write_toml(Path(self.mktemp()), {"web": {"listen_on": "tcp:1"}})
        self.assertOneLine(self.run_twistd("--config", path), "web.listen_on")

    def test_bad_env(self) -> None:
        """A bad environment value names the key."""
        self.assertOneLine(self.run_twistd(env={"ROBONET_BOTLINK_MAX_FRAME": "big"}), "botlink.max_frame")

    def test_missing_file(self) -> None:
        """A --config file that does not exist is one line too."""
        self.assertOneLine(self.run_twistd("--config", "/nonexistent.toml"), "/nonexistent.toml")
