"""Shared fixtures: import paths for the client and helpers, and the real broker processes."""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent, HERE.parent / "examples"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from td_helpers import CLIENT_DIR, Broker  # noqa: E402


@pytest.fixture
def start_broker(tmp_path_factory):
    """Factory: start_broker(**options) -> a running Broker, stopped (process group killed) afterwards."""
    started = []

    def start(**options):
        broker = Broker(tmp_path_factory.mktemp("data"), **options)
        started.append(broker)
        return broker.start()

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """One plain `tdcomfy up --simulate` shared by a test module (no token, default limits)."""
    instance = Broker(tmp_path_factory.mktemp("data"))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A TouchDesigner project folder holding a copy of the client, importable as in TouchDesigner."""
    # The example imports touchdesigner_client from project.folder, as in TouchDesigner.
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "touchdesigner_client.py").write_text((CLIENT_DIR / "touchdesigner_client.py").read_text())
    monkeypatch.delitem(sys.modules, "touchdesigner_client", raising=False)
    monkeypatch.syspath_prepend(str(folder))
    return folder
