"""Log observers for ``twistd robonet``: a level filter (``--log-level``) and an optional JSON file.

twistd builds its log observer after ``makeService``; robonet names :func:`twistd_observer` in
twistd's own ``--logger`` option (unless the user gave one) after :func:`configure` recorded the
settings, so the level filter applies to every event, Twisted's own included.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


@implementer(ILogObserver)
class _Fanout:
    """Send each event to several observers."""

    def __init__(self, observers: list[ILogObserver]) -> None:
        self.observers = observers

    def __call__(self, event: dict) -> None:  # type: ignore[type-arg]
        for obs in self.observers:
            obs(event)


def observer_factory(
    level: str, json_file: str = "", logfile: str | None = None, nodaemon: bool = True
) -> Callable[[], ILogObserver]:
    """A factory for twistd's ``logger`` option.

    ``level`` is one of debug, info, warn, error, critical; events below it are dropped. Text goes
    to stdout (``-n`` without ``--logfile``, or ``--logfile=-``) or to ``logfile`` (default
    ``twistd.log`` when daemonised); ``json_file`` (if set) also receives every event as JSON lines.
    """

    def make() -> ILogObserver:
        if logfile == "-" or (nodaemon and not logfile):
            text: io.TextIOBase | LogFile = sys.stdout  # type: ignore[assignment]
        else:
            text = LogFile.fromFullPath(logfile or "twistd.log")
        observers: list[ILogObserver] = [textFileLogObserver(text)]  # type: ignore[arg-type]
        if json_file:
            observers.append(jsonFileLogObserver(open(json_file, "a", encoding="utf-8")))  # noqa: SIM115
        predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
        return FilteringLogObserver(_Fanout(observers), [predicate])

    return make


_settings: dict[str, object] = {"level": "info", "json_file": "", "logfile": None, "nodaemon": True}


def configure(level: str, json_file: str = "", logfile: str | None = None, nodaemon: bool = True) -> str:
    """Record the settings for :func:`twistd_observer`; returns its dotted name for ``--logger``."""
    _settings.update(level=level, json_file=json_file, logfile=logfile, nodaemon=nodaemon)
    return f"{__name__}.twistd_observer"


def twistd_observer() -> ILogObserver:
    """The observer twistd installs (via ``--logger``), built from :func:`configure`'s settings."""
    return observer_factory(
        str(_settings["level"]),
        str(_settings["json_file"]),
        _settings["logfile"],  # type: ignore[arg-type]
        bool(_settings["nodaemon"]),
    )()
