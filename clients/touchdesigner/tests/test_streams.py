"""Live streams against the real `tdcomfy up --simulate`: stream, mode=latest, preempt, dedupe and
previews from `submit_frame` and from `FramePipeline`."""

from __future__ import annotations

import pytest
from td_helpers import png_bytes, pump_until, wait_until
from test_integration import VIDEO, wait_for_job

import touchdesigner_client as tdc

FRAME = png_bytes(320, 200)


def test_submit_frame_sends_the_stream_fields(broker):
    client = tdc.TDComfyClient(broker.url)
    job_id = client.submit_frame(FRAME, "fields", params=VIDEO, stream="td-fields", mode="latest", previews=True)
    job = client.check_job(job_id)
    assert (job["stream"], job["mode"], job["previews"]) == ("td-fields", "latest", True)
    plain = client.submit_frame(FRAME, "plain", params=VIDEO)
    job = client.check_job(plain)
    assert (job["stream"], job["mode"], job["previews"]) == (None, "queue", False)
    for job_id in (job_id, plain):
        wait_for_job(client, job_id)


def test_a_stream_field_the_broker_refuses_names_the_field(broker):
    client = tdc.TDComfyClient(broker.url)
    with pytest.raises(tdc.TDComfyError) as refused:
        client.submit_frame(FRAME, "x", stream="has a space")
    assert (refused.value.status, refused.value.code, refused.value.field) == (400, "invalid_stream", "stream")
    with pytest.raises(tdc.TDComfyError) as refused:
        client.submit_frame(FRAME, "x", mode="latest")
    assert (refused.value.code, refused.value.field) == ("missing_field", "stream")


def test_latest_mode_supersedes_waiting_frames_and_the_newest_is_made(broker):
    client = tdc.TDComfyClient(broker.url)
    ids = [client.submit_frame(FRAME, f"scene {i}", params=VIDEO, stream="td-latest", mode="latest") for i in range(4)]
    jobs = [wait_for_job(client, job_id) for job_id in ids]
    assert jobs[-1]["status"] == "done"
    superseded = [j for j in jobs if j["status"] == "cancelled"]
    assert superseded, "four quick frames on one GPU: at least one waited and was replaced"
    for job in superseded:
        assert job["cancel_reason"] == "superseded"
        assert ids.index(job["superseded_by"]) > ids.index(job["id"])


def test_preempt_cancels_the_running_frame_of_the_stream(broker):
    client = tdc.TDComfyClient(broker.url)
    slow = dict(VIDEO, frames=97)
    first = client.submit_frame(FRAME, "slow", params=slow, stream="td-preempt", mode="latest")
    wait_until(lambda: client.check_job(first)["status"] == "running", 30, "first frame running")
    second = client.submit_frame(FRAME, "now", params=VIDEO, stream="td-preempt", mode="latest", preempt=True)
    assert client.last_submit["superseded"] == [first]
    job = wait_for_job(client, first)
    assert (job["status"], job["cancel_reason"], job["superseded_by"]) == ("cancelled", "superseded", second)
    assert wait_for_job(client, second)["status"] == "done"


def test_dedupe_answers_an_unchanged_frame_at_once_with_the_same_result(broker, tmp_path):
    client = tdc.TDComfyClient(broker.url)
    first = client.submit_frame(FRAME, "still", seed=5, params=VIDEO, stream="td-dedupe", dedupe=True)
    assert wait_for_job(client, first)["status"] == "done"
    again = client.submit_frame(FRAME, "still", seed=5, params=VIDEO, stream="td-dedupe", dedupe=True)
    assert (client.last_submit["status"], client.last_submit["reused_from"]) == ("done", first)
    assert client.get_result(again) == client.get_result(first)
    changed = client.submit_frame(FRAME, "moved", seed=5, params=VIDEO, stream="td-dedupe", dedupe=True)
    assert client.last_submit["reused_from"] is None
    assert wait_for_job(client, changed)["status"] == "done"


def test_pipeline_in_latest_mode_reports_replaced_frames_as_superseded(broker, tmp_path):
    with tdc.FramePipeline(broker.url, output_dir=str(tmp_path), params=VIDEO, mode="latest",
                           max_in_flight=4) as pipeline:
        assert pipeline.stream and pipeline.stream.startswith("td-")
        tickets = [pipeline.submit(FRAME, prompt=f"scene {i}") for i in range(4)]
        events = []
        pump_until(pipeline, lambda e: e.kind in ("done", "error") and e.ticket == tickets[-1], 90, events)
    finished = {e.ticket: e for e in events if e.kind in ("done", "cancelled", "error")}
    assert finished[tickets[-1]].kind == "done"
    cancelled = [e for e in events if e.kind == "cancelled"]
    assert cancelled, "frames that waited were replaced by the newest"
    assert all(e.cancel_reason == "superseded" for e in cancelled)
    assert all(e.job["stream"] == pipeline.stream for e in events if e.job and "stream" in e.job)


def test_pipeline_with_dedupe_reuses_the_last_result_for_an_unchanged_frame(broker, tmp_path):
    with tdc.FramePipeline(broker.url, output_dir=str(tmp_path), params=VIDEO, seed=9, dedupe=True,
                           keep_results=None) as pipeline:
        pipeline.submit(FRAME, prompt="same")
        first = pump_until(pipeline, lambda e: e.kind in ("done", "error"), 60)
        assert first.kind == "done" and first.reused_from is None, first.message
        wait_until(pipeline.is_ready_for_next, 10, "free slot")
        pipeline.submit(FRAME, prompt="same")
        second = pump_until(pipeline, lambda e: e.kind in ("done", "error"), 30)
        assert second.kind == "done" and second.reused_from == first.job_id, second.message
        with open(first.path, "rb") as a, open(second.path, "rb") as b:
            assert a.read() == b.read()


def test_latest_mode_switched_on_after_construction_makes_the_pipeline_s_own_stream(broker, tmp_path):
    with tdc.FramePipeline(broker.url, output_dir=str(tmp_path), params=VIDEO) as pipeline:
        assert pipeline.stream is None
        pipeline.mode = "latest"  # a plain attribute, e.g. set from a Parameter Execute DAT
        pipeline.submit(FRAME, prompt="switched to latest")
        submitted = pump_until(pipeline, lambda e: e.kind in ("submitted", "error"), 30)
        assert submitted.kind == "submitted", submitted.message
        assert pipeline.stream and pipeline.stream.startswith("td-")
        job = tdc.TDComfyClient(broker.url).check_job(submitted.job_id)
        assert (job["stream"], job["mode"]) == (pipeline.stream, "latest"), job
        pump_until(pipeline, lambda e: e.kind in ("done", "error", "cancelled"), 90)


def test_two_td_machines_share_the_gpu_in_turns_and_each_keeps_its_order(broker):
    """Stream order and round-robin end to end: broker, worker and simulator GPU."""
    client = tdc.TDComfyClient(broker.url)
    # Machine A sends four frames, then machine B two, while the GPU is busy with A's first.
    a = [client.submit_frame(FRAME, f"a{i}", params=VIDEO, stream="machine-a") for i in range(4)]
    b = [client.submit_frame(FRAME, f"b{i}", params=VIDEO, stream="machine-b") for i in range(2)]
    jobs = {job_id: wait_for_job(client, job_id, timeout=120) for job_id in a + b}
    assert all(j["status"] == "done" for j in jobs.values()), jobs
    started = sorted(jobs, key=lambda job_id: jobs[job_id]["started_at"])
    order = {job_id: i for i, job_id in enumerate(started)}
    assert [order[j] for j in a] == sorted(order[j] for j in a), f"A in its order: {started}"
    assert [order[j] for j in b] == sorted(order[j] for j in b), f"B in its order: {started}"
    # Turns, not first come first served: B's frames do not wait behind all of A's (one of A's may
    # already be waiting in ComfyUI's queue, PREFETCH=1, when B's arrive).
    assert order[b[0]] < order[a[2]] and order[b[1]] < order[a[3]], started
