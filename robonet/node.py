"""This hub's identity as other hubs see it (spec/discovery-peers.md, "Node identity").

A node is identified by a stable ``node_id`` (uuid4, created on first start and kept in
``<state_dir>/node_id``), a display ``name``, a ``project_id`` (hubs of one project federate) and a
compatibility ``hash`` over robonet's own source files (witch-core's "source hash").
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import attrs
from twisted.logger import Logger

import robonet
from robonet.files import atomic_write

NODE_ID_FILE = "node_id"
HASH_LENGTH = 16

_log = Logger(namespace="robonet.node")


@attrs.frozen
class NodeIdentity:
    """Who this hub is.

    ``node_id``: uuid4 string (36 chars); ``name``: display name (config ``hub.name``);
    ``project_id``: hubs with the same project federate (config ``hub.project_id``);
    ``hash``: 16 lowercase hex chars, see :func:`source_hash`; ``version``: ``robonet.__version__``.
    """

    node_id: str
    name: str
    project_id: str
    hash: str
    version: str


def source_files(root: Path | None = None) -> list[Path]:
    """robonet's own ``*.py`` files under ``root`` (default: the installed package directory).

    Sorted by their path relative to ``root`` in POSIX form; files inside ``__pycache__``
    directories and every ``__init__.py`` are left out.
    """
    base = Path(robonet.__file__).resolve().parent if root is None else root
    found = []
    for path in base.rglob("*.py"):
        rel = path.relative_to(base)
        if "__pycache__" in rel.parts or path.name == "__init__.py" or not path.is_file():
            continue
        found.append((rel.as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _rel, path in found]


def source_hash(root: Path | None = None) -> str:
    """The compatibility hash: SHA-256 over the contents of :func:`source_files`, hex, first 16 chars.

    The bytes of each file are fed to one SHA-256 in sorted relative-path order; the paths
    themselves are not hashed (witch-core's reading). Two hubs running the same robonet sources
    get the same hash whatever directory they are installed in.
    """
    digest = hashlib.sha256()
    for path in source_files(root):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:HASH_LENGTH]


def _valid_node_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def load_node_id(state_dir: Path) -> str:
    """Return the node id kept in ``<state_dir>/node_id``, creating it (uuid4) if absent.

    ``state_dir`` is created if needed. A file that does not hold a canonical uuid string (empty,
    truncated, edited) is replaced by a fresh id and the replacement is logged. Raises OSError if
    the directory or file cannot be read or written.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / NODE_ID_FILE
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        text = None
    if text is not None and _valid_node_id(text):
        return text
    node_id = str(uuid.uuid4())
    if text is not None:
        _log.warn("invalid node id in {path}; replaced by {node_id}", path=str(path), node_id=node_id)
    atomic_write(path, (node_id + "\n").encode("ascii"))
    return node_id


def load_node_identity(state_dir: Path, name: str, project_id: str) -> NodeIdentity:
    """Build this hub's :class:`NodeIdentity` (node id from ``state_dir``, see :func:`load_node_id`)."""
    return NodeIdentity(
        node_id=load_node_id(Path(state_dir)),
        name=name,
        project_id=project_id,
        hash=source_hash(),
        version=robonet.__version__,
    )
