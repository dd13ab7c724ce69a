"""Every client call and FramePipeline over HTTPS (TLS 1.3), against the real broker.

The ``https_broker`` fixture (conftest.py) is the real `tdcomfy up --simulate` behind a TLS 1.3
terminator by default, or any HTTPS broker named by TDCOMFY_TEST_HTTPS_URL. A TLS 1.3 server sends
session tickets after the handshake, so the socket turns readable while the client is still sending
its request: the client must not take that for the server's answer.
"""

from __future__ import annotations

import contextlib
import re
import threading
from pathlib import Path

import pytest
from td_helpers import png_bytes, pump_until, wait_until
from test_integration import FRAME, VIDEO, assert_video, wait_for_job

import touchdesigner_client as tdc


def client_for(target, **options) -> tdc.TDComfyClient:
    # A short timeout: an upload that stalls fails in seconds instead of the default 10.
    options.setdefault("timeout", 5)
    return tdc.TDComfyClient(target.url, token=target.token, ca_file=target.ca_file, **options)


def test_every_blocking_call_works_over_https(https_broker, tmp_path):
    client = client_for(https_broker)
    try:
        assert client.health()["status"] == "healthy"
        assert client.health_check()["status"] == "healthy"
        assert "workflows" in client.workflows()

        job_id = client.submit_frame(FRAME, prompt="über den Wolken", seed=3, params=VIDEO)
        assert not client.is_ready_for_next()
        assert client.check_job(job_id)["prompt"] == "über den Wolken"
        events = []
        with contextlib.closing(client.iter_events(job_id)) as stream:
            for event in stream:
                events.append(event)
                if event.data["job"]["status"] in tdc.TERMINAL_STATUSES:
                    break
        assert events[0].event == "snapshot" and events[-1].data["job"]["status"] == "done", events
        done = wait_for_job(client, job_id)  # check_job(wait=…, since=…) long-polls over TLS too
        assert done["status"] == "done"
        wait_until(client.is_ready_for_next, 30, "is_ready_for_next over https")
        assert_video(client.get_result(job_id))
        target = tmp_path / "clip.mp4"
        assert client.download_result(job_id, str(target)) == str(target)
        assert_video(target.read_bytes())
        assert job_id in [j["id"] for j in client.list_jobs(limit=500)]
        assert client.delete_job(job_id)["job_id"] == job_id

        # The all-jobs stream (/events) over TLS, read on a thread of its own as documented.
        seen = []
        watcher = client_for(https_broker)

        def watch():
            with contextlib.closing(watcher.iter_events(read_timeout=20)) as stream:
                for event in stream:
                    seen.append(event)
                    if isinstance(event.data, dict) and event.data.get("job_id") == seen_job[0]:
                        return

        seen_job = [None]
        third = None
        reader = threading.Thread(target=watch, daemon=True)
        reader.start()
        for _ in range(50):  # the stream only shows jobs submitted after it opened: retry until seen
            third = client.submit_frame(FRAME, params=VIDEO)
            seen_job[0] = third
            reader.join(0.5)
            if not reader.is_alive():
                break
        watcher.close()
        assert any(isinstance(e.data, dict) and e.data.get("job_id") == third for e in seen), seen
        client.delete_job(third)

        second = client.submit_frame(FRAME, params=VIDEO)
        assert client.cancel_job(second)["job_id"] == second
        assert wait_for_job(client, second)["status"] == "cancelled"
    finally:
        client.close()


def test_uploads_of_every_size_arrive_whole_over_https(https_broker):
    # One chunk, a few chunks, and close to MAX_UPLOAD_MB: each round a new TLS connection whose
    # session tickets arrive while the request is being sent.
    limit = int(https_broker.max_upload_mb * 1024 * 1024)
    frames = [png_bytes(64, 64, noise=1.0, level=0), png_bytes(400, 300, noise=1.0, level=0),
              png_bytes(520, 600, noise=1.0, level=0)]
    assert len(frames[-1]) < limit - 4096
    made = []
    for round_ in range(8):
        for frame in frames:
            client = client_for(https_broker)  # a new client: a new connection (no keep-alive reuse)
            try:
                job_id = client.submit_frame(frame, prompt=f"round {round_}", params=VIDEO)
                made.append(job_id)
                client.delete_job(job_id)  # keep the worker's queue short for the other tests
            finally:
                client.close()
    assert len(set(made)) == len(made) == 8 * len(frames)


def test_an_upload_over_the_limit_is_413_over_https(https_broker, tmp_path):
    limit = int(https_broker.max_upload_mb * 1024 * 1024)
    side = int((limit * 1.8 / 3) ** 0.5)
    big = png_bytes(side, side, noise=1.0, level=0)
    assert len(big) > limit
    client = client_for(https_broker)
    with pytest.raises(tdc.TDComfyError) as too_big:
        client.submit_frame(big)
    assert (too_big.value.status, too_big.value.code, too_big.value.limit) == (413, "payload_too_large", limit)
    assert re.search(r"MB", too_big.value.message), too_big.value.message
    with tdc.FramePipeline(https_broker.url, token=https_broker.token, ca_file=https_broker.ca_file,
                           output_dir=str(tmp_path)) as pipeline:
        pipeline.submit(big)
        event = pump_until(pipeline, lambda e: e.kind == "error", 30)
    assert (event.error.status, event.error.code) == (413, "payload_too_large")
    assert client.submit_frame(FRAME, params=VIDEO)  # the next upload is fine


@pytest.mark.parametrize("transport", ["sse", "poll"])
def test_pipeline_over_https_delivers_a_video(https_broker, tmp_path, transport):
    with tdc.FramePipeline(https_broker.url, token=https_broker.token, ca_file=https_broker.ca_file,
                           output_dir=str(tmp_path), status_transport=transport, params=VIDEO, timeout=5) as pipeline:
        tickets = [pipeline.submit(FRAME)]
        events = []
        done = pump_until(pipeline, lambda e: e.kind in ("done", "error"), 60, events)
        assert done.kind == "done", done.message
        assert pipeline.status_transport == transport
        assert_video(Path(done.path).read_bytes())
        assert {e.ticket for e in events} == set(tickets)
        client = client_for(https_broker)
        wait_until(lambda: not client.check_job(done.job_id)["has_result"], 10, "remote delete over https")
    assert not list(tmp_path.glob("*.part"))


def test_the_certificate_is_checked(https_broker):
    if https_broker.ca_file is None:
        pytest.skip("the broker's certificate is publicly trusted: nothing to refuse")
    untrusting = tdc.TDComfyClient(https_broker.url, timeout=5)  # system/certifi store only
    with pytest.raises(tdc.TDComfyError) as refused:
        untrusting.health()
    assert refused.value.code == "connection_error" and "CERTIFICATE" in refused.value.message.upper()
    insecure = tdc.TDComfyClient(https_broker.url, timeout=5, verify_tls=False)
    assert insecure.health()["status"] == "healthy"


def test_an_early_answer_from_a_tls_proxy_that_stops_reading_is_reported(tmp_path):
    # Like a reverse proxy with a body-size limit (nginx's client_max_body_size): it answers 413
    # right after the request headers and reads nothing more. The client, still sending, must
    # read that answer (over TLS it has to consume the bytes to see them) instead of timing out.
    import socket
    import ssl
    import threading

    from td_helpers import make_self_signed_cert

    cert, key, ca = make_self_signed_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(cert), str(key))
    listener = socket.create_server(("127.0.0.1", 0))
    answer = (b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/html\r\nContent-Length: 52\r\n"
              b"Connection: close\r\n\r\n<html><h1>413 Request Entity Too Large</h1></html>\r\n")
    held = []

    def serve():
        conn, _ = listener.accept()
        tls = context.wrap_socket(conn, server_side=True)
        head = b""
        while b"\r\n\r\n" not in head:
            head += tls.recv(4096)
        tls.sendall(answer)
        held.append(tls)  # keep it open, never read again

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = tdc.TDComfyClient(f"https://127.0.0.1:{listener.getsockname()[1]}", ca_file=str(ca), timeout=5)
    body = png_bytes(2000, 1500, noise=1.0, level=0)  # 9 MB: far more than the socket buffers hold
    try:
        with pytest.raises(tdc.TDComfyError) as rejected:
            client.submit_frame(body)
        assert (rejected.value.status, rejected.value.code) == (413, "http_error"), rejected.value
        assert "413 Request Entity Too Large" in rejected.value.message
    finally:
        server.join(5)
        for sock in held:
            sock.close()
        listener.close()
