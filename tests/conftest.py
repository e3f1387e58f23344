"""pytest configuration shared by every test module.

trial's ``TestCase.mktemp()`` makes directories relative to the current directory; run the session
from a temporary directory so tests never write into the working tree.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _run_in_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("trial"))
    try:
        yield
    finally:
        os.chdir(old)
