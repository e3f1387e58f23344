"""robonet: one Twisted daemon for a robot fleet's hub."""

__version__ = "0.1.0"
PROTO_VERSION = 1
