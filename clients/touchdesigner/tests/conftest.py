"""Shared fixtures: import paths for the client and helpers, and the real broker processes."""

import os
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


class HttpsBroker:
    """An HTTPS broker URL for the tests, with the CA file that verifies it."""

    def __init__(self, url: str, ca_file: str | None, token: str | None, max_upload_mb: float) -> None:
        self.url = url
        self.ca_file = ca_file
        self.token = token
        self.max_upload_mb = max_upload_mb


@pytest.fixture(scope="module", params=["terminator", "own-tls"])
def https_broker(request, tmp_path_factory):
    """The broker over HTTPS (TLS 1.3).

    Default: the real `tdcomfy up --simulate` (MAX_UPLOAD_MB=1) behind the test suite's own TLS 1.3
    terminator (td_helpers.Proxy, a self-signed certificate made by the openssl CLI). To run the
    same tests against any HTTPS broker (e.g. the broker's own TLS), set TDCOMFY_TEST_HTTPS_URL, and
    TDCOMFY_TEST_HTTPS_CA (a PEM file trusted for it), TDCOMFY_TEST_HTTPS_TOKEN,
    TDCOMFY_TEST_HTTPS_MAX_UPLOAD_MB (its MAX_UPLOAD_MB, default 1) as needed; it must have a worker.
    """
    url = os.environ.get("TDCOMFY_TEST_HTTPS_URL")
    if url:
        yield HttpsBroker(url, os.environ.get("TDCOMFY_TEST_HTTPS_CA"), os.environ.get("TDCOMFY_TEST_HTTPS_TOKEN"),
                          float(os.environ.get("TDCOMFY_TEST_HTTPS_MAX_UPLOAD_MB", "1")))
        return
    from td_helpers import Proxy, make_self_signed_cert

    cert, key, ca = make_self_signed_cert(tmp_path_factory.mktemp("tls"))
    if request.param == "own-tls":
        # The broker's own TLS (rustls, TLS_CERT/TLS_KEY): it sends TLS 1.3 session tickets too.
        env = {"TLS_CERT": str(cert), "TLS_KEY": str(key), "TDCOMFY_TEST_CA": str(ca)}
        instance = Broker(tmp_path_factory.mktemp("data"), max_upload_mb=1, extra_env=env)
        instance.start()
        try:
            yield HttpsBroker(instance.url, str(ca), None, 1)
        finally:
            instance.stop()
        return
    instance = Broker(tmp_path_factory.mktemp("data"), max_upload_mb=1)
    instance.start()
    proxy = Proxy(("127.0.0.1", instance.api_port), cert, key)
    try:
        yield HttpsBroker(proxy.url, str(ca), None, 1)
    finally:
        proxy.close()
        instance.stop()
