"""The client against `tdcomfy up --simulate` storing on S3 (moto's server on loopback) with
RESULT_REDIRECT=presigned: the download follows the broker's redirect to the store, resumes there
with Range, and never shows the store the broker's token.

Needs `moto_server` (`pip install "moto[server]"`, which .ci/run does); skipped with that reason
when it is absent.
"""

from __future__ import annotations

import http.client
import http.server
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest
from td_helpers import free_port, png_bytes
from test_integration import VIDEO, assert_video, wait_for_job

import touchdesigner_client as tdc

MOTO = shutil.which("moto_server")
pytestmark = pytest.mark.skipif(MOTO is None, reason='moto_server not found: pip install "moto[server]"')


class RecordingProxy:
    """Forwards every request to the S3 server and records (method, path, headers) of each: the
    test's view of what the store was sent."""

    def __init__(self, upstream_port: int) -> None:
        self.seen: list[tuple[str, str, dict]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                headers = {k: v for k, v in self.headers.items()}
                outer.seen.append((self.command, self.path, headers))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                up = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                up.request(self.command, self.path, body=body, headers=headers)
                resp = up.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                up.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3(tmp_path):
    port = free_port()
    proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/td-bucket", method="PUT")).read()
        proxy = RecordingProxy(port)
        yield proxy
        proxy.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_presigned_download_follows_the_redirect_resumes_with_range_and_keeps_the_token(start_broker, s3,
                                                                                        tmp_path):
    env = {
        "STORAGE_URL": "s3://td-bucket/shared",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3.port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "RESULT_REDIRECT": "presigned",
    }
    broker = start_broker(token="td-secret", extra_env=env)
    client = tdc.TDComfyClient(broker.url, token="td-secret")
    job_id = client.submit_frame(png_bytes(320, 200), params=VIDEO)
    assert wait_for_job(client, job_id)["status"] == "done"
    assert any(m == "PUT" and f"/shared/inputs/{job_id}" in p for m, p, _ in s3.seen), "the frame went to S3"

    target = tmp_path / "clip.mp4"
    assert client.download_result(job_id, str(target)) == str(target)
    data = target.read_bytes()
    assert_video(data)

    # An interrupted download resumes from its .part file, on the store, with Range.
    (tmp_path / "again.mp4.part").write_bytes(data[:1000])
    again = tmp_path / "again.mp4"
    client.download_result(job_id, str(again))
    assert again.read_bytes() == data
    presigned = [(p, h) for m, p, h in s3.seen if m == "GET" and "X-Amz-Signature=" in p]
    assert len(presigned) == 2, presigned
    assert [h.get("Range") for _, h in presigned] == [None, "bytes=1000-"]
    # The store never sees the broker's token.
    assert not any("td-secret" in str(h) for _, _, h in s3.seen)
    assert all("Authorization" not in h for _, h in presigned)
