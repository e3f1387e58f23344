"""robonet client libraries for robots and scripts.

Blocking (no reactor needed):

- :class:`BotClient`: the bot link (spec/botlink.md), native robonet/1 or legacy Cartobot.
- :class:`Connection`, :class:`ReconnectConnection`, :func:`create_server`: LabAuto's line API
  (seed 001); switch a LabAuto script over by changing its import.
- :class:`Client`: witch-core's request client for the line link (seed 002).

Twisted-native: :mod:`robonet.client.tx` (``BotLinkClientProtocol``, ``connect_bot``,
``legacy_send``, ``legacy_poll``); import it explicitly, it is not loaded here.
"""

from robonet.client.botclient import AuthError, BotClient, ChecksumError, HelloRejected, RemoteError
from robonet.client.labauto import Connection, ReconnectConnection, create_server
from robonet.client.witch import Client

__all__ = [
    "AuthError",
    "BotClient",
    "ChecksumError",
    "Client",
    "Connection",
    "HelloRejected",
    "ReconnectConnection",
    "RemoteError",
    "create_server",
]
