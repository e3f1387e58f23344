"""The ``robonet`` console script: manage credentials of a hub (docs/security.rst "Tokens").

::

    robonet token add --name alice --role operator --devices 'robot_*' [--commands robot_move,stop]
    robonet token list [--json]
    robonet token revoke alice

Every subcommand takes ``--state-dir DIR`` and ``--config FILE`` like ``twistd robonet`` (the
same loader, so ``ROBONET_HUB_STATE_DIR`` etc. apply too). The tokens file lives in the state
directory; a running daemon picks up the change within ``auth.poll_interval`` (1 s) and closes
the connections of a revoked token. ``token add`` prints the new token alone on its last line.
Exit status: 0 ok, 1 refused (duplicate name, unknown token), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import orjson

from robonet.config import ConfigError, load_config
from robonet.tokens import ROLES, TokenError, TokenStore


def _split(values: Sequence[str] | None) -> tuple[str, ...]:
    out: list[str] = []
    for v in values or ():
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return tuple(out)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="state directory (as twistd robonet --state-dir)")
    common.add_argument("--config", "-c", help="TOML configuration file (as twistd robonet --config)")
    top = argparse.ArgumentParser(prog="robonet", description="Manage a robonet hub's credentials.")
    sub = top.add_subparsers(dest="group", required=True)
    token = sub.add_parser("token", help="bearer tokens", parents=[common])
    tsub = token.add_subparsers(dest="action", required=True)
    add = tsub.add_parser(
        "add", help="create a token (printed once, alone on the last line)", parents=[common]
    )
    add.add_argument("--name", required=True, help="unique name, e.g. alice or robot_1")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument(
        "--devices",
        action="append",
        help="device-id glob patterns (repeatable or comma-separated); a robot: the ids it may send as",
    )
    add.add_argument("--commands", action="append", help="command types an operator may send (default all)")
    lst = tsub.add_parser("list", help="list tokens (never the tokens themselves)", parents=[common])
    lst.add_argument("--json", action="store_true", help="one JSON document")
    rev = tsub.add_parser("revoke", help="delete a token; its live connections are closed", parents=[common])
    rev.add_argument("name")
    return top


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status (the console script exits with it)."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    overrides = {"hub": {"state_dir": args.state_dir}} if args.state_dir else None
    try:
        config = load_config(args.config, overrides=overrides)
        store = TokenStore(config.state_path, config.auth.tokens)
    except (ConfigError, TokenError) as e:
        err.write(f"robonet: invalid configuration: {e}\n")
        return 2
    try:
        if args.action == "add":
            rec, token = store.add(
                args.name, args.role, time.time(), _split(args.devices), _split(args.commands)
            )
            out.write(f"added token {rec.name} (role {rec.role}")
            if rec.devices:
                out.write(f", devices {','.join(rec.devices)}")
            if rec.commands:
                out.write(f", commands {','.join(rec.commands)}")
            out.write(f") to {store.path}\n")
            if rec.role in ("admin", "operator", "viewer"):
                out.write(
                    f"dashboard: http://{config.auth.pairing_host or 'localhost'}:8000/#token={token}\n"
                )
            out.write(token + "\n")
        elif args.action == "list":
            records = [r.public() for r in store.records()]
            if args.json:
                out.write(orjson.dumps({"tokens": records}).decode() + "\n")
            else:
                for r in records:
                    extra = ""
                    if r["devices"]:
                        extra += f" devices={','.join(r['devices'])}"
                    if r["commands"]:
                        extra += f" commands={','.join(r['commands'])}"
                    out.write(f"{r['name']}\t{r['role']}\t{r['source']}{extra}\n")
        elif args.action == "revoke":
            rec = store.revoke(args.name)
            out.write(f"revoked token {rec.name} (role {rec.role})\n")
    except TokenError as e:
        err.write(f"robonet: {e}\n")
        return 1
    return 0


def run() -> None:
    """Console-script entry point (setup.cfg ``robonet = robonet.cli:run``)."""
    raise SystemExit(main())
