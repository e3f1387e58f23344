"""The twistd plugin (STYLE.md rule 1): installed, listed by ``twistd --help``, cheap to import.

These run the ``twistd`` next to ``sys.executable`` (the virtualenv's) in a subprocess, without
PYTHONPATH, so they check the installed package rather than the working tree.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
OPTIONS = (
    "--config",
    "--state-dir",
    "--name",
    "--log-level",
    "--demo",
    "--botlink",
    "--line",
    "--web",
    "--camera-data",
    "--camera-settings",
    "--camera-auth",
)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("ROBONET_")}


class PluginTests(SynchronousTestCase):
    def run_cmd(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=60, env=clean_env(), cwd=self.mktemp_dir()
        )

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_twistd_lists_robonet(self) -> None:
        """`twistd --help` from the virtualenv lists the robonet subcommand."""
        self.assertTrue(os.path.exists(TWISTD), TWISTD)
        result = self.run_cmd(TWISTD, "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = [line.split() for line in result.stdout.splitlines()]
        self.assertIn("robonet", [words[0] for words in lines if words])

    def test_robonet_help(self) -> None:
        """`twistd robonet --help` shows every documented option."""
        result = self.run_cmd(TWISTD, "robonet", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in OPTIONS:
            self.assertIn(option, result.stdout)
        self.assertIn("Usage: twistd [options] robonet", result.stdout)

    def test_plugin_import_is_cheap(self) -> None:
        """Importing the plugin module imports neither robonet.tap nor the reactor."""
        code = (
            "import sys\n"
            "import twisted.plugins.robonet_plugin as p\n"
            "assert p.robonet.tapname == 'robonet', p.robonet.tapname\n"
            "heavy = ('robonet.tap', 'robonet.hub', 'twisted.internet.reactor')\n"
            "bad = [m for m in heavy if m in sys.modules]\n"
            "assert not bad, bad\n"
        )
        result = self.run_cmd(sys.executable, "-c", code)
        self.assertEqual(result.returncode, 0, result.stderr)
