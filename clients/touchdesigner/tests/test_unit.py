"""Unit tests without a broker: capture with fake TOPs, wire formats, and FramePipeline driven by a
fake client whose calls the tests hold and release."""

from __future__ import annotations

import email.parser
import email.policy
import os
import threading
import time

import pytest
from td_helpers import FakeTOP, png_bytes, pump_until, wait_until

import touchdesigner_client as tdc

PNG = png_bytes(8, 8)


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------


def test_top_to_png_bytes_uses_save_byte_array_and_returns_bytes():
    top = FakeTOP(PNG)
    data = tdc.top_to_png_bytes(top)
    assert type(data) is bytes
    assert data == PNG
    assert top.calls == [(".png", {})]


@pytest.mark.parametrize(("given", "sent"), [(0.8, 0.8), (90, 0.9), (1, 1.0), (-3, 0.0)])
def test_top_to_jpeg_bytes_passes_quality_on_touchdesigners_scale(given, sent):
    top = FakeTOP(b"\xff\xd8\xff\xe0fake")
    assert tdc.top_to_jpeg_bytes(top, given) == b"\xff\xd8\xff\xe0fake"
    assert top.calls == [(".jpg", {"quality": pytest.approx(sent)})]


def test_capture_failures_raise_the_one_error_type():
    with pytest.raises(tdc.TDComfyError) as missing:
        tdc.top_to_jpeg_bytes(None)
    assert missing.value.code == "capture_failed"
    with pytest.raises(tdc.TDComfyError) as not_a_top:
        tdc.top_to_png_bytes(object())
    assert not_a_top.value.code == "capture_failed"
    with pytest.raises(tdc.TDComfyError) as empty:
        tdc.top_to_png_bytes(FakeTOP(b""))
    assert empty.value.code == "capture_failed"


def test_submitting_a_top_instead_of_bytes_says_what_to_do():
    client = tdc.TDComfyClient("http://127.0.0.1:9")
    with pytest.raises(TypeError, match="top_to_jpeg_bytes"):
        client.submit_frame(FakeTOP(PNG))


# ---------------------------------------------------------------------------------------------
# Wire formats
# ---------------------------------------------------------------------------------------------


def test_multipart_body_parses_back_to_the_fields_and_the_image():
    content_type, parts = tdc._multipart([("prompt", "a fox, ünïcode"), ("seed", "42")], PNG)
    body = b"".join(bytes(p) for p in parts)
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    got = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    # Text fields are raw UTF-8 without a charset parameter, as browsers send them.
    assert got["prompt"].get_payload(decode=True).decode("utf-8") == "a fox, ünïcode"
    assert got["seed"].get_payload(decode=True) == b"42"
    assert got["image"].get_content_type() == "image/png"
    assert got["image"].get_filename() == "frame.png"
    assert got["image"].get_payload(decode=True) == PNG


@pytest.mark.parametrize(
    ("head", "expected"),
    [(PNG, "image/png"), (b"\xff\xd8\xff\xdb", "image/jpeg"), (b"RIFF\0\0\0\0WEBPVP8 ", "image/webp"),
     (b"hello", "application/octet-stream")],
)
def test_image_type_is_judged_by_bytes(head, expected):
    assert tdc._image_type(head)[0] == expected


def test_sse_parser_handles_multiline_data_comments_ids_and_crlf():
    parser = tdc._SSEParser()
    lines = [": keep-alive\r\n", "event: progress\r\n", "id: 7\r\n", 'data: {"a":\n', "data: 1}\n", "\n",
             "data: plain text\n", "\r\n", "\n"]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert events == [tdc.ServerEvent("progress", "7", {"a": 1}), tdc.ServerEvent("message", "7", "plain text")]


def test_broker_error_body_becomes_a_tdcomfy_error():
    body = (b'{"error": {"code": "payload_too_large", "message": "image is larger than 1 MB", '
            b'"field": "image", "limit": 1048576}}')
    err = tdc._error_from_body(413, body, "job-1")
    assert (err.code, err.message, err.status, err.field, err.limit, err.job_id) == (
        "payload_too_large", "image is larger than 1 MB", 413, "image", 1048576, "job-1")
    assert "413" in str(err) and "1 MB" in str(err)
    assert not err.retryable


def test_error_without_json_body_keeps_the_status():
    err = tdc._error_from_body(502, b"<html>Bad Gateway</html>")
    assert (err.code, err.status) == ("http_error", 502)
    assert err.retryable
    assert "Bad Gateway" in err.message


def test_client_url_forms():
    assert tdc.TDComfyClient("10.0.0.5:8080").url == "http://10.0.0.5:8080"
    assert tdc.TDComfyClient("https://gpu.example.com/tdcomfy/").url == "https://gpu.example.com/tdcomfy"
    with pytest.raises(ValueError):
        tdc.TDComfyClient("ftp://host")


# ---------------------------------------------------------------------------------------------
# TDComfyClient.is_ready_for_next: cached, refreshed in the background
# ---------------------------------------------------------------------------------------------


def test_is_ready_for_next_reads_a_cache_kept_current_by_a_background_thread():
    client = tdc.TDComfyClient("http://127.0.0.1:9")
    calls = []
    finish = threading.Event()

    def fake_check_job(job_id=None, wait=None, since=None, *, abort=None):
        calls.append(threading.current_thread())
        finish.wait(5)
        status = "done" if finish.is_set() else "running"
        client._remember(job_id, status, len(calls))
        return {"id": job_id, "status": status, "version": len(calls)}

    client.check_job = fake_check_job
    assert client.is_ready_for_next() is True  # nothing submitted yet
    client.current_job_id = "job-1"
    client._remember("job-1", "queued", None)
    assert client.is_ready_for_next() is False
    finish.set()
    wait_until(client.is_ready_for_next, 5, "ready after the job finished")
    assert calls and threading.main_thread() not in calls
    refresher = client._refresher
    client.close()
    client.close()
    assert client.wait_closed(5)
    assert not refresher.is_alive()


# ---------------------------------------------------------------------------------------------
# FramePipeline with a fake client
# ---------------------------------------------------------------------------------------------


class FakeClient:
    """Implements the client calls FramePipeline makes; tests hold uploads/jobs with gates."""

    url = "http://fake-broker"
    token = None

    def __init__(self, outcome="done"):
        self.lock = threading.Lock()
        self.upload_gate = threading.Event()
        self.upload_gate.set()
        self.job_gate = threading.Event()
        self.job_gate.set()
        self.submit_errors: list[tdc.TDComfyError] = []
        self.submits: list[dict] = []
        self.uploading = 0
        self.max_concurrent_uploads = 0
        self.outcome = outcome
        self.events_supported = True
        self.end_stream_early = 0  # end this many event streams before the terminal state
        self.check_calls = 0
        self.reached: dict[str, int] = {}
        self.deleted: list[str] = []
        self.result = b"\x00\x00\x00\x18ftypisomfake-video"
        self.last_submit = None
        self.progress_steps = 1  # progress updates while running (1: a single 0.5)
        self.ignore_abort = False  # uploads held by the gate cannot be interrupted by close()
        self.delete_errors: list[Exception] = []

    def _hold(self, gate, abort):
        while not gate.wait(0.01):
            if abort is not None and abort.is_set():
                raise tdc.TDComfyError("closed", "aborted")

    def submit_frame(self, image, prompt="", negative_prompt="", seed=None, workflow=None, params=None, *,
                     idempotency_key=None, abort=None):
        with self.lock:
            self.submits.append({"key": idempotency_key, "prompt": prompt, "seed": seed, "size": len(image)})
            self.uploading += 1
            self.max_concurrent_uploads = max(self.max_concurrent_uploads, self.uploading)
        try:
            self._hold(self.upload_gate, None if self.ignore_abort else abort)
            with self.lock:
                if self.submit_errors:
                    raise self.submit_errors.pop(0)
                job_id = f"job-{len(self.submits)}"
            self.last_submit = {"job_id": job_id, "status": "queued", "queue_position": 1}
            return job_id
        finally:
            with self.lock:
                self.uploading -= 1

    def _states(self, job_id):
        yield {"id": job_id, "status": "queued", "version": 1}
        steps = self.progress_steps
        for step in range(steps):
            value = 0.5 if steps == 1 else (step + 1) / steps
            yield {"id": job_id, "status": "running", "version": 2 + step, "progress": {"value": value}}
        final = {"id": job_id, "status": self.outcome, "version": 2 + steps}
        if self.outcome == "done":
            final["result"] = {"content_type": "video/mp4", "size": len(self.result)}
        if self.outcome == "error":
            final["error_message"] = "ComfyUI: out of memory"
        yield final

    def iter_events(self, job_id, *, read_timeout=45.0, abort=None, last_event_id=None):
        if not self.events_supported:
            raise tdc.TDComfyError("events_unsupported", "no SSE here", 200)
        states = list(self._states(job_id))
        with self.lock:
            end_early = self.end_stream_early > 0
            self.end_stream_early -= 1
            # Like the broker: a new stream starts with a snapshot of the current state.
            reached = self.reached.get(job_id, 0)
        for index in range(reached, len(states) - 1):
            with self.lock:
                self.reached[job_id] = index
            name = "snapshot" if index == reached else "job"
            yield tdc.ServerEvent(name, None, {"type": "job", "job": states[index]})
        if end_early:
            return
        self._hold(self.job_gate, abort)
        yield tdc.ServerEvent(states[-1]["status"], None, {"type": "job", "job": states[-1]})

    def check_job(self, job_id, wait=None, since=None, *, abort=None):
        with self.lock:
            self.check_calls += 1
        states = list(self._states(job_id))
        index = 0 if since is None else min(since, len(states) - 1)
        if index == len(states) - 1:
            self._hold(self.job_gate, abort)
        return states[index]

    def download_result(self, job_id, path, *, abort=None):
        with open(path + ".part", "wb") as out:
            out.write(self.result + job_id.encode())
        os.replace(path + ".part", path)
        return path

    def delete_job(self, job_id, *, abort=None):
        with self.lock:
            if self.delete_errors:
                raise self.delete_errors.pop(0)
            self.deleted.append(job_id)
        return {"job_id": job_id, "status": "cancelled"}

    def close(self):
        pass


@pytest.fixture
def make_pipeline(tmp_path):
    made = []

    def make(client, **options):
        options.setdefault("output_dir", str(tmp_path / "results"))
        pipeline = tdc.FramePipeline(client, **options)
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.close()


def kinds(events):
    return [e.kind for e in events]


def test_pipeline_delivers_events_and_a_result_file(make_pipeline, tmp_path):
    client = FakeClient()
    pipeline = make_pipeline(client, prompt="default prompt")
    ticket = pipeline.submit(PNG, seed=7)
    assert ticket == 1
    events = []
    done = pump_until(pipeline, lambda e: e.kind == "done", 10, events)
    assert kinds(events) == ["submitted", "started", "progress", "done"]
    assert events[2].progress == 0.5
    assert done.ticket == 1 and done.job_id == "job-1"
    assert done.path == str(tmp_path / "results" / "tdcomfy_job-1.mp4")
    with open(done.path, "rb") as f:
        assert f.read() == client.result + b"job-1"
    assert not [n for n in os.listdir(tmp_path / "results") if n.endswith(".part")]
    assert client.submits[0]["prompt"] == "default prompt" and client.submits[0]["seed"] == 7
    wait_until(lambda: client.deleted == ["job-1"], 5, "remote delete after download")
    assert pipeline.stats()["done"] == 1


def test_submit_returns_before_the_upload_happens(make_pipeline):
    client = FakeClient()
    client.upload_gate.clear()
    pipeline = make_pipeline(client)
    assert pipeline.submit(PNG) == 1
    # The upload cannot have finished: the fake holds it until the gate opens.
    assert pipeline.pump() == []
    assert pipeline.in_flight + pipeline.waiting == 1
    client.upload_gate.set()
    pump_until(pipeline, lambda e: e.kind == "done", 10)


def test_when_busy_skip_drops_new_frames(make_pipeline):
    client = FakeClient()
    client.upload_gate.clear()
    pipeline = make_pipeline(client, max_in_flight=1, when_busy="skip")
    assert pipeline.submit(PNG) == 1
    assert not pipeline.is_ready_for_next()
    assert pipeline.submit(PNG) is None
    assert pipeline.stats()["skipped"] == 1
    client.upload_gate.set()
    pump_until(pipeline, lambda e: e.kind == "done", 10)
    wait_until(pipeline.is_ready_for_next, 5, "free slot")
    assert len(client.submits) == 1


def test_when_busy_replace_keeps_only_the_newest_waiting_frame(make_pipeline):
    client = FakeClient()
    client.upload_gate.clear()
    pipeline = make_pipeline(client, max_in_flight=1, when_busy="replace")
    assert pipeline.submit(PNG, prompt="first") == 1
    wait_until(lambda: client.uploading == 1, 5, "first upload started")
    assert pipeline.submit(PNG, prompt="second") == 2
    assert pipeline.submit(PNG, prompt="third") == 3
    client.upload_gate.set()
    events = []
    pump_until(pipeline, lambda e: e.kind == "done" and e.ticket == 3, 10, events)
    assert [(e.kind, e.ticket) for e in events if e.kind in ("dropped", "done")] == [
        ("dropped", 2), ("done", 1), ("done", 3)]
    assert [s["prompt"] for s in client.submits] == ["first", "third"]


def test_max_in_flight_allows_parallel_uploads(make_pipeline):
    client = FakeClient()
    client.upload_gate.clear()
    pipeline = make_pipeline(client, max_in_flight=2)
    assert pipeline.submit(PNG) == 1
    assert pipeline.submit(PNG) == 2
    assert pipeline.submit(PNG) is None
    client.upload_gate.set()
    events = []
    pump_until(pipeline, lambda e: len([x for x in events if x.kind == "done"]) == 2, 10, events)
    assert sorted(e.ticket for e in events if e.kind == "done") == [1, 2]


def test_in_flight_counts_until_the_result_arrives(make_pipeline):
    client = FakeClient()
    client.job_gate.clear()
    pipeline = make_pipeline(client, max_in_flight=1)
    pipeline.submit(PNG)
    pump_until(pipeline, lambda e: e.kind == "progress", 10)
    assert pipeline.in_flight == 1 and not pipeline.is_ready_for_next()
    assert pipeline.submit(PNG) is None
    client.job_gate.set()
    pump_until(pipeline, lambda e: e.kind == "done", 10)
    wait_until(pipeline.is_ready_for_next, 5, "free slot")


def test_upload_retries_reuse_one_idempotency_key(make_pipeline):
    client = FakeClient()
    client.submit_errors = [tdc.TDComfyError("connection_error", "refused"), tdc.TDComfyError("timeout", "slow")]
    pipeline = make_pipeline(client)
    pipeline.submit(PNG)
    pump_until(pipeline, lambda e: e.kind == "done", 10)
    keys = [s["key"] for s in client.submits]
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0]


def test_rejected_upload_is_an_error_event_and_frees_the_slot(make_pipeline):
    client = FakeClient()
    client.submit_errors = [tdc.TDComfyError("unsupported_image", "not an image", 400, "image")]
    pipeline = make_pipeline(client)
    pipeline.submit(b"not an image")
    error = pump_until(pipeline, lambda e: e.kind == "error", 10)
    assert (error.error.code, error.error.status, error.job_id) == ("unsupported_image", 400, None)
    wait_until(pipeline.is_ready_for_next, 5, "free slot")
    assert len(client.submits) == 1  # a 400 is not retried


def test_failed_job_is_an_error_event_with_the_jobs_message(make_pipeline):
    pipeline = make_pipeline(FakeClient(outcome="error"))
    pipeline.submit(PNG)
    error = pump_until(pipeline, lambda e: e.kind == "error", 10)
    assert error.error.code == "job_failed"
    assert error.error.message == "ComfyUI: out of memory"
    assert error.job_id == "job-1"


def test_cancelled_job_is_a_cancelled_event(make_pipeline):
    pipeline = make_pipeline(FakeClient(outcome="cancelled"))
    pipeline.submit(PNG)
    assert pump_until(pipeline, lambda e: e.kind in ("cancelled", "error", "done"), 10).kind == "cancelled"


def test_without_an_event_stream_the_pipeline_long_polls(make_pipeline):
    client = FakeClient()
    client.events_supported = False
    pipeline = make_pipeline(client)
    pipeline.submit(PNG)
    pump_until(pipeline, lambda e: e.kind == "done", 10)
    assert client.check_calls >= 3
    assert pipeline.status_transport == "poll"


@pytest.mark.parametrize("transport", ["sse", "poll"])
def test_status_transport_choice(make_pipeline, transport):
    client = FakeClient()
    pipeline = make_pipeline(client, status_transport=transport)
    pipeline.submit(PNG)
    pump_until(pipeline, lambda e: e.kind == "done", 10)
    assert (client.check_calls > 0) == (transport == "poll")


def test_event_stream_ending_early_reconnects(make_pipeline):
    client = FakeClient()
    client.end_stream_early = 2
    pipeline = make_pipeline(client)
    pipeline.submit(PNG)
    events = []
    pump_until(pipeline, lambda e: e.kind == "done", 10, events)
    assert kinds(events).count("started") == 1  # a reconnect's snapshot is not a new start


def test_old_results_are_deleted_keeping_the_newest(make_pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(tdc, "_TRASH_RETRY_SECONDS", 0.02)
    client = FakeClient()
    pipeline = make_pipeline(client, keep_results=2)
    paths = []
    for _ in range(4):
        pipeline.submit(PNG)
        paths.append(pump_until(pipeline, lambda e: e.kind == "done", 10).path)
        wait_until(pipeline.is_ready_for_next, 5, "free slot")
    wait_until(lambda: not os.path.exists(paths[1]), 5, "old results deleted")
    assert [os.path.exists(p) for p in paths] == [False, False, True, True]


def test_deleting_a_result_that_is_still_open_is_retried(make_pipeline, monkeypatch):
    monkeypatch.setattr(tdc, "_TRASH_RETRY_SECONDS", 0.02)
    real_remove = os.remove
    refusals = []

    def remove_refusing_three_times(path, *args, **kwargs):
        if path.endswith("job-1.mp4") and len(refusals) < 3:
            refusals.append(path)
            raise PermissionError(13, "The process cannot access the file because it is being used")
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "remove", remove_refusing_three_times)
    pipeline = make_pipeline(FakeClient(), keep_results=1)
    pipeline.submit(PNG)
    first = pump_until(pipeline, lambda e: e.kind == "done", 10).path
    wait_until(pipeline.is_ready_for_next, 5, "free slot")
    pipeline.submit(PNG)
    pump_until(pipeline, lambda e: e.kind == "done", 10)
    wait_until(lambda: not os.path.exists(first), 5, "locked result deleted after retries")
    assert len(refusals) == 3


def test_results_left_by_an_earlier_session_are_trimmed(make_pipeline, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    for i in range(3):
        path = folder / f"tdcomfy_old-{i}.mp4"
        path.write_bytes(b"old")
        os.utime(path, (1000 + i, 1000 + i))
    (folder / "unrelated.mp4").write_bytes(b"keep me")
    make_pipeline(FakeClient(), keep_results=1)
    wait_until(lambda: sorted(os.listdir(folder)) == ["tdcomfy_old-2.mp4", "unrelated.mp4"], 5, "trimmed")


def test_cancel_a_waiting_frame(make_pipeline):
    client = FakeClient()
    client.upload_gate.clear()
    pipeline = make_pipeline(client, when_busy="replace")
    pipeline.submit(PNG)
    wait_until(lambda: client.uploading == 1, 5, "first upload started")
    second = pipeline.submit(PNG)
    assert pipeline.cancel(second) is True
    assert pipeline.cancel(999) is False
    assert ("cancelled", second) in [(e.kind, e.ticket) for e in pipeline.pump()]
    client.upload_gate.set()
    pump_until(pipeline, lambda e: e.kind == "done", 10)
    assert len(client.submits) == 1


def test_cancel_a_running_job_deletes_it_on_the_broker(make_pipeline):
    client = FakeClient()
    client.job_gate.clear()
    pipeline = make_pipeline(client)
    ticket = pipeline.submit(PNG)
    pump_until(pipeline, lambda e: e.kind == "started", 10)
    assert pipeline.cancel(ticket)
    wait_until(lambda: "job-1" in client.deleted, 5, "remote delete")


def test_close_stops_every_thread_even_mid_upload(tmp_path):
    before = set(threading.enumerate())
    client = FakeClient()
    client.upload_gate.clear()
    pipeline = tdc.FramePipeline(client, output_dir=str(tmp_path))
    pipeline.submit(PNG)
    wait_until(lambda: client.uploading == 1, 5, "upload started")
    started = time.monotonic()
    pipeline.close()
    assert pipeline.wait_closed(5)
    took = time.monotonic() - started
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == [], f"threads alive after close() ({took:.2f}s): {leftover}"
    pipeline.close()  # twice is fine
    with pytest.raises(tdc.TDComfyError) as closed:
        pipeline.submit(PNG)
    assert closed.value.code == "closed"


def test_constructor_validates_options(tmp_path):
    with pytest.raises(ValueError):
        tdc.FramePipeline(FakeClient(), output_dir=str(tmp_path), when_busy="queue")
    with pytest.raises(ValueError):
        tdc.FramePipeline(FakeClient(), output_dir=str(tmp_path), max_in_flight=0)


def test_close_racing_with_a_finishing_upload_joins_every_thread(tmp_path):
    # close() while the uploader is starting the job thread: every thread must be joinable.
    before = set(threading.enumerate())
    for round_ in range(150):
        client = FakeClient()
        pipeline = tdc.FramePipeline(client, output_dir=str(tmp_path / str(round_)))
        pipeline.submit(PNG)
        while not client.submits:
            time.sleep(0)
        pipeline.close()
        assert pipeline.wait_closed(5)
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []


# ---------------------------------------------------------------------------------------------
# close(), housekeeping, the event queue
# ---------------------------------------------------------------------------------------------


def test_close_returns_at_once_and_wait_closed_waits_for_the_teardown(tmp_path):
    # close() runs on TouchDesigner's main thread: it must not wait for threads to stop, not even
    # for one stuck in a call that the abort cannot interrupt.
    before = set(threading.enumerate())
    client = FakeClient()
    client.upload_gate.clear()
    client.ignore_abort = True
    pipeline = tdc.FramePipeline(client, output_dir=str(tmp_path))
    pipeline.submit(PNG)
    wait_until(lambda: client.uploading == 1, 5, "upload started")
    returned = threading.Event()

    def release_the_upload():  # once close() returned (after 10 s anyway, so a blocking close ends)
        returned.wait(10)
        client.upload_gate.set()

    threading.Thread(target=release_the_upload, daemon=True).start()
    pipeline.close(timeout=30)
    uploading_when_close_returned = client.uploading
    returned.set()
    assert uploading_when_close_returned == 1, "close() waited for the upload thread"
    assert pipeline.stats()["closed"]
    with pytest.raises(tdc.TDComfyError):
        pipeline.submit(PNG)
    assert pipeline.wait_closed(10) is True
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []
    pipeline.close()  # twice is fine
    assert pipeline.wait_closed(0) is True


def test_wait_closed_reports_threads_that_did_not_stop(tmp_path):
    client = FakeClient()
    client.upload_gate.clear()
    client.ignore_abort = True
    pipeline = tdc.FramePipeline(client, output_dir=str(tmp_path))
    pipeline.submit(PNG)
    wait_until(lambda: client.uploading == 1, 5, "upload started")
    pipeline.close(timeout=0.2)
    assert pipeline.wait_closed(5) is False  # the teardown gave up on the stuck thread after 0.2 s
    client.upload_gate.set()


def test_the_housekeeping_thread_survives_an_exception_and_reports_it(make_pipeline):
    client = FakeClient()
    client.delete_errors = [RuntimeError("bug in delete_job")]
    pipeline = make_pipeline(client)
    pipeline.submit(PNG)
    events = []
    error = pump_until(pipeline, lambda e: e.kind == "error", 10, events)
    assert error.error.code == "internal_error" and "bug in delete_job" in error.error.message
    assert error.ticket == 0 and error.message.startswith("pipeline: "), error.message
    assert "done" in kinds(events)
    wait_until(pipeline.is_ready_for_next, 5, "free slot")
    pipeline.submit(PNG)
    pump_until(pipeline, lambda e: e.kind == "done", 10)
    wait_until(lambda: "job-2" in client.deleted, 5, "the housekeeper still deletes jobs")


def test_the_event_queue_is_bounded_dropping_old_progress_never_done_or_error(make_pipeline):
    client = FakeClient()
    client.progress_steps = 400
    client.submit_errors = [tdc.TDComfyError("unsupported_image", "not an image", 400)]
    pipeline = make_pipeline(client, max_in_flight=4, max_events=50)
    for _ in range(4):
        assert pipeline.submit(PNG) is not None
    # Nobody pumps (TouchDesigner paused, a slow frame…) while 3 jobs send 400 updates each.
    wait_until(lambda: pipeline.stats()["done"] == 3 and pipeline.stats()["errors"] == 1, 20, "all jobs over")
    events = pipeline.pump()
    assert len(events) <= 50
    assert kinds(events).count("done") == 3 and kinds(events).count("error") == 1
    assert pipeline.stats()["events_dropped"] >= 3 * 400 - 50
    # What is kept of the progress is the newest: each job's last update survives.
    last = {}
    for event in events:
        if event.kind == "progress":
            last[event.ticket] = event.progress
    assert sorted(last.values()) == [1.0] * len(last)


def test_a_result_file_is_not_trimmed_before_its_done_event_was_pumped(make_pipeline):
    client = FakeClient()
    pipeline = make_pipeline(client, keep_results=1, max_in_flight=2)
    pipeline.submit(PNG)
    pipeline.submit(PNG)
    # Both jobs finished and were deleted on the broker: the housekeeper has seen both results.
    wait_until(lambda: sorted(client.deleted) == ["job-1", "job-2"], 10, "both jobs deleted remotely")
    done = []
    while len(done) < 2:  # one event per pump
        (event,) = pipeline.pump(max_events=1)
        if event.kind == "done":
            done.append(event)
            assert os.path.exists(event.path)  # not trimmed while its done event was unread
    first, second = done
    # Once both are handed out, the older one goes (keep_results=1).
    wait_until(lambda: not os.path.exists(first.path), 10, "older result trimmed after pump")
    assert os.path.exists(second.path)
