"""The client against the real `tdcomfy up --simulate` (broker + worker + ComfyUI simulator).

No mocks: every test talks HTTP to the binary the fixtures start. A missing binary fails the tests
with a clear message (CI builds it first); nothing here is skipped.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest
from td_helpers import free_port, mp4_info, png_bytes, pump_until, wait_until
from test_examples import FakeTD, finish_preloads

import touchdesigner_client as tdc

FRAME = png_bytes(320, 200)
# Small settings keep the simulator's encode quick; the video must match them (the default
# workflow generates width x height, then scales to out_width x out_height).
VIDEO = {"width": 256, "height": 160, "frames": 17, "out_width": 320, "out_height": 192}


def wait_for_job(client: tdc.TDComfyClient, job_id: str, timeout: float = 60.0) -> dict:
    """Long-polls until the job is terminal (the broker holds each request until a change)."""
    deadline = time.monotonic() + timeout
    job = client.check_job(job_id)
    while job["status"] not in tdc.TERMINAL_STATUSES:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")
        job = client.check_job(job_id, wait=10, since=job["version"])
    return job


def assert_video(data: bytes) -> None:
    info = mp4_info(data)
    assert info.codec == "avc1" and info.has_avcc, info
    assert (info.width, info.height) == (VIDEO["out_width"], VIDEO["out_height"]), info
    assert info.sample_count == VIDEO["frames"], info
    assert info.mdat_size > 8, info


# ---------------------------------------------------------------------------------------------
# Blocking API
# ---------------------------------------------------------------------------------------------


def test_blocking_api_submit_check_get_list_delete_health(broker):
    client = tdc.TDComfyClient(broker.url)
    health = client.health()
    assert health["status"] == "healthy"
    assert client.health_check()["status"] == "healthy"  # the name older scripts use

    job_id = client.submit_frame(FRAME, prompt="a foggy forest", negative_prompt="blurry", seed=42, params=VIDEO)
    assert client.current_job_id == job_id
    assert client.last_submit["status"] == "queued"
    first = client.check_job(job_id)
    assert (first["id"], first["prompt"], first["negative_prompt"], first["seed"]) == (
        job_id, "a foggy forest", "blurry", 42)

    done = wait_for_job(client, job_id)
    assert done["status"] == "done" and done["has_result"], done
    video = client.get_result(job_id)
    assert_video(video)
    assert done["result"]["size"] == len(video)

    listed = client.list_jobs()
    assert job_id in [j["id"] for j in listed]
    assert job_id in [j["id"] for j in client.list_jobs(status="done", limit=500)]
    assert job_id not in [j["id"] for j in client.list_jobs(status="queued")]
    assert len(client.list_jobs(limit=1)) == 1

    deleted = client.delete_job(job_id)
    assert deleted["job_id"] == job_id and deleted  # truthy, like the old `True`
    with pytest.raises(tdc.TDComfyError) as gone:
        client.get_result(job_id)
    assert (gone.value.status, gone.value.code) == (410, "result_gone")
    client.delete_job(job_id)  # repeating is harmless


def test_download_result_writes_the_file_atomically(broker, tmp_path):
    client = tdc.TDComfyClient(broker.url)
    job_id = client.submit_frame(FRAME, params=VIDEO)
    wait_for_job(client, job_id)
    target = tmp_path / "clip.mp4"
    assert client.download_result(job_id, str(target)) == str(target)
    assert_video(target.read_bytes())
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_same_idempotency_key_never_makes_two_jobs(broker):
    client = tdc.TDComfyClient(broker.url)
    first = client.submit_frame(FRAME, prompt="once", idempotency_key="td-frame-0001", params=VIDEO)
    again = client.submit_frame(FRAME, prompt="once", idempotency_key="td-frame-0001", params=VIDEO)
    assert again == first
    with pytest.raises(tdc.TDComfyError) as reused:
        client.submit_frame(FRAME, prompt="different", idempotency_key="td-frame-0001", params=VIDEO)
    assert (reused.value.status, reused.value.code) == (409, "idempotency_key_reused")


def test_is_ready_for_next_answers_from_cache_and_turns_true_when_done(broker):
    client = tdc.TDComfyClient(broker.url)
    try:
        assert client.is_ready_for_next()
        client.submit_frame(FRAME, params=VIDEO)
        assert not client.is_ready_for_next()  # queued: answered from the cache, no request
        wait_until(client.is_ready_for_next, 60, "is_ready_for_next after the job finished")
        assert any(t.name == "tdcomfy-ready-refresh" for t in threading.enumerate())
    finally:
        client.close()
    assert client.wait_closed(5)
    assert not any(t.name == "tdcomfy-ready-refresh" and t.is_alive() for t in threading.enumerate())


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unreachable_broker_is_connection_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = tdc.TDComfyClient(url, timeout=2)
    with pytest.raises(tdc.TDComfyError) as refused:
        client.health()
    assert refused.value.code == "connection_error" and refused.value.status is None
    with pytest.raises(tdc.TDComfyError) as submit:
        client.submit_frame(FRAME)
    assert submit.value.code == "connection_error"

    with tdc.FramePipeline(url, output_dir=str(tmp_path), submit_retry_for=0.3) as pipeline:
        pipeline.submit(FRAME)
        error = pump_until(pipeline, lambda e: e.kind == "error", 30)
    assert error.error.code == "connection_error"


def test_upload_over_the_limit_is_413_naming_the_limit(start_broker, tmp_path):
    broker = start_broker(max_upload_mb=1)
    big = png_bytes(900, 700, noise=1.0, level=0)  # about 1.9 MB of valid PNG
    assert len(big) > 1024 * 1024
    client = tdc.TDComfyClient(broker.url)
    with pytest.raises(tdc.TDComfyError) as too_big:
        client.submit_frame(big)
    err = too_big.value
    assert (err.status, err.code) == (413, "payload_too_large")
    assert re.search(r"\b1 ?MB\b", err.message), err.message
    assert err.limit == 1024 * 1024

    with tdc.FramePipeline(broker.url, output_dir=str(tmp_path)) as pipeline:
        pipeline.submit(big)
        event = pump_until(pipeline, lambda e: e.kind == "error", 30)
    assert (event.error.status, event.error.code) == (413, "payload_too_large")
    # The broker is still fine afterwards, also for a frame just under the limit (big enough to
    # go through the client's "Expect: 100-continue" path).
    near_limit = png_bytes(500, 600, noise=1.0, level=0)
    assert 512 * 1024 < len(near_limit) < 1024 * 1024 - 4096
    assert client.submit_frame(near_limit, params=VIDEO)
    assert client.submit_frame(FRAME, params=VIDEO)


def test_bad_image_bytes_are_unsupported_image(broker, tmp_path):
    client = tdc.TDComfyClient(broker.url)
    with pytest.raises(tdc.TDComfyError) as bad:
        client.submit_frame(b"this is not an image at all")
    assert (bad.value.status, bad.value.code, bad.value.field) == (400, "unsupported_image", "image")

    with tdc.FramePipeline(broker.url, output_dir=str(tmp_path)) as pipeline:
        pipeline.submit(b"GIF89a not supported either")
        event = pump_until(pipeline, lambda e: e.kind == "error", 30)
    assert event.error.code == "unsupported_image"


def test_unknown_job_is_404_job_not_found(broker):
    client = tdc.TDComfyClient(broker.url)
    for call in (client.check_job, client.get_result, client.delete_job):
        with pytest.raises(tdc.TDComfyError) as missing:
            call("00000000-0000-4000-8000-000000000000")
        assert (missing.value.status, missing.value.code) == (404, "job_not_found"), call.__name__


def test_token_auth(start_broker, tmp_path):
    broker = start_broker(token="s3cret-token")
    anonymous = tdc.TDComfyClient(broker.url)
    assert anonymous.health()["status"] == "healthy"  # /health needs no token
    for call in (anonymous.list_jobs, lambda: anonymous.submit_frame(FRAME)):
        with pytest.raises(tdc.TDComfyError) as denied:
            call()
        assert (denied.value.status, denied.value.code) == (401, "unauthorized")
    wrong = tdc.TDComfyClient(broker.url, token="wrong")
    with pytest.raises(tdc.TDComfyError) as denied:
        wrong.list_jobs()
    assert denied.value.status == 401

    client = tdc.TDComfyClient(broker.url, token="s3cret-token")
    job_id = client.submit_frame(FRAME, params=VIDEO)
    assert wait_for_job(client, job_id)["status"] == "done"

    with tdc.FramePipeline(broker.url, token="wrong", output_dir=str(tmp_path / "a")) as pipeline:
        pipeline.submit(FRAME)
        event = pump_until(pipeline, lambda e: e.kind == "error", 30)
    assert event.error.status == 401
    with tdc.FramePipeline(broker.url, token="s3cret-token", output_dir=str(tmp_path / "b"), params=VIDEO) as pipeline:
        pipeline.submit(FRAME)
        done = pump_until(pipeline, lambda e: e.kind in ("done", "error"), 60)
    assert done.kind == "done", done.message


# ---------------------------------------------------------------------------------------------
# FramePipeline
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "poll"])
def test_pipeline_from_submit_to_a_downloaded_video(broker, tmp_path, transport):
    client = tdc.TDComfyClient(broker.url)
    with tdc.FramePipeline(broker.url, output_dir=str(tmp_path), status_transport=transport, params=VIDEO,
                           prompt="waves") as pipeline:
        ticket = pipeline.submit(FRAME, seed=5)
        events = []
        done = pump_until(pipeline, lambda e: e.kind in ("done", "error"), 60, events)
        assert done.kind == "done", done.message
        assert pipeline.status_transport == transport  # SSE worked; no fallback
        kinds = [e.kind for e in events]
        assert kinds[0] == "submitted" and kinds[-1] == "done"
        assert set(kinds) <= {"submitted", "started", "progress", "done"}
        assert "started" in kinds or "progress" in kinds
        progress = [e.progress for e in events if e.kind == "progress"]
        assert progress == sorted(progress) and all(0 <= p <= 1 for p in progress)
        assert {e.ticket for e in events} == {ticket} and {e.job_id for e in events} == {done.job_id}

        path = Path(done.path)
        assert path.parent == tmp_path and path.suffix == ".mp4" and done.job_id in path.name
        assert_video(path.read_bytes())
        assert not list(tmp_path.glob("*.part"))
        assert client.check_job(done.job_id)["seed"] == 5
        # The job is deleted on the broker once downloaded (the record stays, the files go).
        wait_until(lambda: not client.check_job(done.job_id)["has_result"], 10, "remote delete")


def test_pipeline_replace_sends_only_the_newest_waiting_frame(broker, tmp_path):
    with tdc.FramePipeline(broker.url, output_dir=str(tmp_path), when_busy="replace", params=VIDEO) as pipeline:
        first = pipeline.submit(FRAME, prompt="first")
        second = pipeline.submit(FRAME, prompt="second")
        third = pipeline.submit(FRAME, prompt="third")
        events = []
        pump_until(pipeline, lambda e: e.kind == "done" and e.ticket == third, 90, events)
    assert ("dropped", second) in [(e.kind, e.ticket) for e in events]
    done = [e for e in events if e.kind == "done"]
    assert [e.ticket for e in done] == [first, third]
    assert [e.job["prompt"] for e in done] == ["first", "third"]


def test_pipeline_keeps_only_the_newest_results(broker, tmp_path):
    with tdc.FramePipeline(broker.url, output_dir=str(tmp_path), keep_results=1, params=VIDEO) as pipeline:
        paths = []
        for _ in range(2):
            pipeline.submit(FRAME)
            paths.append(pump_until(pipeline, lambda e: e.kind == "done", 60).path)
            wait_until(pipeline.is_ready_for_next, 10, "free slot")
        wait_until(lambda: not os.path.exists(paths[0]), 10, "older result removed")
        assert os.path.exists(paths[1])


def test_pipeline_survives_a_broker_restart(start_broker, tmp_path):
    # A longer simulated job, so the kill lands while the job is running; a short lease so the
    # restarted broker hands the orphaned job to the new worker soon.
    broker = start_broker(sim_job_time=3.0, extra_env={"LEASE_TTL": "5"})
    with tdc.FramePipeline(broker.url, output_dir=str(tmp_path / "out"), params=VIDEO) as pipeline:
        ticket = pipeline.submit(FRAME)
        events = []
        pump_until(pipeline, lambda e: e.kind == "started", 60, events)
        broker.kill()  # SIGKILL the whole `up` process tree mid-job
        assert not broker.healthy()
        broker.start()  # same DATA_DIR, same ports
        done = pump_until(pipeline, lambda e: e.kind in ("done", "error"), 180, events)
    assert done.kind == "done", f"{done.message}\n{broker.output()}"
    assert done.ticket == ticket
    assert_video(Path(done.path).read_bytes())


def test_close_leaves_no_thread_alive(broker, tmp_path):
    before = set(threading.enumerate())
    pipeline = tdc.FramePipeline(broker.url, output_dir=str(tmp_path), params=VIDEO, max_in_flight=2)
    pipeline.submit(FRAME)
    pipeline.submit(FRAME)
    pump_until(pipeline, lambda e: e.kind == "submitted", 30)  # an event stream is open now
    pipeline.close()  # returns at once; the teardown runs on a thread of its own
    assert pipeline.wait_closed(5)
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []
    pipeline.close()  # a second close is harmless
    with pytest.raises(tdc.TDComfyError):
        pipeline.submit(FRAME)


# ---------------------------------------------------------------------------------------------
# The Execute DAT example end to end
# ---------------------------------------------------------------------------------------------


def test_execute_dat_example_plays_a_real_result(broker, project):
    td = FakeTD(project, FRAME)
    td.namespace.update(SERVER_URL=broker.url, PARAMS=VIDEO, PROMPT="ink in water", WAIT_FOR_CLIP_END=True)
    td.namespace["onStart"]()
    try:
        switch, movie_b = td.ops["result_switch"], td.ops["moviefilein_b"]
        td.run_frames(lambda: switch.par.index == 1, max_frames=6000, on_frame=lambda: finish_preloads(td))
        assert_video(Path(movie_b.par.file).read_bytes())
        assert "state: done" in td.ops["status"].text
    finally:
        td.namespace["onExit"]()
