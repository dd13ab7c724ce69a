"""Connections are reused (HTTP keep-alive), so a client at a high frame rate does not open a new
socket per request (on Windows each closed one sits in TIME_WAIT for minutes).

The broker is the real `tdcomfy up --simulate`; between it and the client is a TCP proxy
(td_helpers.Proxy) that counts the connections it accepts, i.e. the client ports the broker saw.
"""

from __future__ import annotations

import pytest
from td_helpers import Proxy, pump_until
from test_integration import FRAME, VIDEO, assert_video, wait_for_job

import touchdesigner_client as tdc


@pytest.fixture
def counted(broker):
    proxy = Proxy(("127.0.0.1", broker.api_port))
    yield proxy
    proxy.close()


def test_one_thread_makes_every_call_over_one_connection(counted):
    client = tdc.TDComfyClient(counted.url)
    try:
        for _ in range(20):
            assert client.health()["status"] == "healthy"
        job_id = client.submit_frame(FRAME, params=VIDEO)
        assert wait_for_job(client, job_id)["status"] == "done"  # long-polls included
        assert_video(client.get_result(job_id))
        assert client.list_jobs(limit=5)
        assert client.delete_job(job_id)
        with pytest.raises(tdc.TDComfyError) as gone:  # an error answer keeps the connection too
            client.get_result(job_id)
        assert gone.value.status == 410
        assert client.health()["status"] == "healthy"
    finally:
        client.close()
    assert counted.connections() == 1, f"{counted.connections()} connections for one thread's calls"


def test_a_connection_the_server_closed_is_replaced_without_an_error(counted):
    client = tdc.TDComfyClient(counted.url)
    try:
        assert client.health()["status"] == "healthy"
        counted.drop_connections()  # like a server's or proxy's idle timeout
        for _ in range(3):
            assert client.health()["status"] == "healthy"
        counted.drop_connections()
        job_id = client.submit_frame(FRAME, params=VIDEO)  # an upload on a stale connection too
        assert client.check_job(job_id)["id"] == job_id
    finally:
        client.close()
    assert counted.connections() == 3


@pytest.mark.parametrize("transport", ["poll", "sse"])
def test_the_pipeline_reuses_connections_across_jobs(counted, tmp_path, transport):
    jobs = 4
    with tdc.FramePipeline(counted.url, output_dir=str(tmp_path), status_transport=transport, params=VIDEO,
                           max_in_flight=1) as pipeline:
        for _ in range(jobs):
            pipeline.submit(FRAME)
            done = pump_until(pipeline, lambda e: e.kind in ("done", "error"), 60)
            assert done.kind == "done", done.message
    # Without reuse: an upload, status requests, a download and a delete each open one (6+ a job).
    # With it: a few pooled connections (upload, job, housekeeping threads) for everything; a
    # job's event stream, which the broker ends after the final status, is reused too.
    assert counted.connections() <= 3, f"{counted.connections()} connections for {jobs} jobs"


def test_a_connection_closed_just_after_the_idle_check_is_retried_on_a_new_one(counted, monkeypatch):
    # The server may close an idle connection between our check and our request (its idle
    # timeout racing with us): the request then fails on the dead socket, before any answer.
    client = tdc.TDComfyClient(counted.url)
    try:
        assert client.health()["status"] == "healthy"
        monkeypatch.setattr(tdc, "_still_open", lambda sock: True)  # the check sees nothing yet
        counted.drop_connections()
        assert client.health()["status"] == "healthy"
        counted.drop_connections()
        assert client.submit_frame(FRAME, params=VIDEO)  # an upload, too, is sent again
    finally:
        client.close()
    assert counted.connections() == 3


def test_https_calls_reuse_one_connection(broker, tmp_path):
    from td_helpers import make_self_signed_cert

    cert, key, ca = make_self_signed_cert(tmp_path)
    proxy = Proxy(("127.0.0.1", broker.api_port), cert, key)  # TLS 1.3: tickets arrive after the handshake
    client = tdc.TDComfyClient(proxy.url, ca_file=str(ca))
    try:
        for _ in range(10):
            assert client.health()["status"] == "healthy"
        job_id = client.submit_frame(FRAME, params=VIDEO)
        assert wait_for_job(client, job_id)["status"] == "done"
        assert_video(client.get_result(job_id))
        assert proxy.connections() == 1, f"{proxy.connections()} TLS connections for one thread's calls"
        proxy.drop_connections()
        assert client.health()["status"] == "healthy"
        assert proxy.connections() == 2
    finally:
        client.close()
        proxy.close()
