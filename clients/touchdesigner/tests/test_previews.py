"""Previews against the real `tdcomfy up --simulate`: the simulator's binary preview frames reach
the client as `preview` events with complete image files under two alternating names.

The workflow is the repository's workflows plus one whose test node (SlowPassthrough) sends a
JPEG preview at every step, the way a sampler does with a preview method set.
"""

from __future__ import annotations

import os

import pytest
from td_helpers import png_bytes, pump_until, workflows_dir

import touchdesigner_client as tdc

FRAME = png_bytes(96, 64)
SLOW_PREVIEW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "2": {"class_type": "SlowPassthrough",
          "inputs": {"images": ["1", 0], "steps": 12, "step_seconds": 0.15, "send_preview": True}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "tdcomfy/preview"}},
}


@pytest.fixture(scope="module")
def preview_broker(tmp_path_factory):
    from td_helpers import Broker

    workflows = workflows_dir(tmp_path_factory.mktemp("workflows"), slow_preview=SLOW_PREVIEW)
    instance = Broker(tmp_path_factory.mktemp("data"), extra_env={"WORKFLOWS_DIR": str(workflows), "PREVIEW_FPS": "10"})
    instance.start()
    yield instance
    instance.stop()


def _is_jpeg(data: bytes) -> bool:
    # A complete JPEG starts with SOI and ends with EOI: a torn file would miss the end.
    return data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"


def test_preview_events_carry_complete_images_under_two_alternating_names(preview_broker, tmp_path):
    out = tmp_path / "out"
    with tdc.FramePipeline(preview_broker.url, output_dir=str(out), workflow="slow_preview", previews=True) as pipe:
        assert pipe.submit(FRAME) == 1
        events: list = []
        reads: list[bytes] = []

        def look(event):
            if event.kind == "preview":
                # Read at once, as an image TOP reloading would: the file must be whole.
                with open(event.path, "rb") as f:
                    reads.append(f.read())
            return event.kind in ("done", "error")

        last = pump_until(pipe, look, timeout=90, collected=events)
        assert last.kind == "done", last.message
        previews = [e for e in events if e.kind == "preview"]
        assert previews, [e.message for e in events]
        assert all(e.job_id == last.job_id for e in previews)
        assert all(_is_jpeg(data) for data in reads), "every preview file read was a complete JPEG"
        # Newest first, never an older one after a newer one.
        seqs = [e.preview_seq for e in previews]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
        names = [os.path.basename(e.path) for e in previews]
        assert set(names) <= {"tdcomfy_preview_0.jpg", "tdcomfy_preview_1.jpg"}, names
        assert all(a != b for a, b in zip(names, names[1:])), f"names alternate: {names}"
        if len(previews) >= 2:
            assert len(set(names)) == 2
        # Preview events come before the result, and every preview file still exists.
        assert events.index(previews[-1]) < events.index(last)
        assert all(os.path.isfile(e.path) for e in previews)
        # A preview file is not a result: keep_results never counts or trims it.
        assert last.path and last.path.endswith(".png")


def test_no_preview_events_without_previews(preview_broker, tmp_path):
    with tdc.FramePipeline(preview_broker.url, output_dir=str(tmp_path), workflow="slow_preview") as pipe:
        pipe.submit(FRAME)
        events: list = []
        last = pump_until(pipe, lambda e: e.kind in ("done", "error"), timeout=90, collected=events)
        assert last.kind == "done", last.message
        assert not [e for e in events if e.kind == "preview"]
        assert not list(tmp_path.glob("tdcomfy_preview_*"))


def test_get_preview_of_a_job_without_one_is_none(preview_broker):
    client = tdc.TDComfyClient(preview_broker.url)
    job_id = client.submit_frame(FRAME, workflow="image_invert")
    assert client.get_preview(job_id) is None
    client.close()


# ---------------------------------------------------------------------------------------------
# Latest wins: the pipeline's logic with a client whose preview downloads the test holds up (the
# race it guards against cannot be produced on demand with the real broker, whose downloads are
# too fast to overtake).
# ---------------------------------------------------------------------------------------------

JPEG = b"\xff\xd8\xff\xe0" + b"x" * 64 + b"\xff\xd9"


def test_a_preview_announced_while_another_downloads_replaces_the_one_still_waiting(tmp_path):
    import threading
    import time

    from test_unit import FakeClient

    class PreviewClient(FakeClient):
        def __init__(self):
            super().__init__()
            self.preview_gate = threading.Event()
            self.latest = 0
            self.fetches: list[int] = []
            self.submitted_previews = None

        def submit_frame(self, image, *args, previews=False, **kwargs):
            self.submitted_previews = previews
            return super().submit_frame(image, *args, **kwargs)

        def iter_events(self, job_id, *, read_timeout=45.0, abort=None, last_event_id=None):
            running = {"id": job_id, "status": "running", "version": 2, "progress": {"value": 0.5}}
            yield tdc.ServerEvent("snapshot", None, {"type": "job", "job": running})
            for seq in (1, 2, 3):
                self.latest = seq
                yield tdc.ServerEvent("preview", None, {"type": "preview", "job_id": job_id, "seq": seq,
                                                        "url": f"/jobs/{job_id}/preview"})
                if seq == 1:  # the first download is under way before 2 and 3 are announced
                    deadline = time.monotonic() + 10
                    while not self.fetches and time.monotonic() < deadline:
                        time.sleep(0.005)
            self._hold(self.job_gate, abort)
            done = {"id": job_id, "status": "done", "version": 3, "result": {"content_type": "video/mp4", "size": 1}}
            yield tdc.ServerEvent("done", None, {"type": "job", "job": done})

        def get_preview(self, job_id=None, *, etag=None, abort=None):
            seq = self.latest  # what the broker holds when the request arrives
            self.fetches.append(seq)
            self._hold(self.preview_gate, abort)
            return JPEG + bytes([seq]), "image/jpeg", seq, f'"b-{seq}"'

    client = PreviewClient()
    client.job_gate.clear()
    pipe = tdc.FramePipeline(client, output_dir=str(tmp_path), previews=True)
    try:
        pipe.submit(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
        deadline = time.monotonic() + 10
        while client.latest < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)  # the job thread has handed 2 and 3 over while 1 is still downloading
        client.preview_gate.set()
        events: list = []
        pump_until(pipe, lambda e: e.kind == "preview" and e.preview_seq == 3, timeout=10, collected=events)
        client.job_gate.set()
        pump_until(pipe, lambda e: e.kind == "done", timeout=10, collected=events)
    finally:
        pipe.close(wait=True)
    assert client.submitted_previews is True
    assert client.fetches == [1, 3], "preview 2 was replaced by 3 before it was fetched"
    previews = [e for e in events if e.kind == "preview"]
    assert [e.preview_seq for e in previews] == [1, 3]
    assert [os.path.basename(e.path) for e in previews] == ["tdcomfy_preview_0.jpg", "tdcomfy_preview_1.jpg"]
    with open(previews[-1].path, "rb") as f:
        assert f.read() == JPEG + bytes([3])


def test_previews_asked_for_by_one_submit_are_delivered_without_a_previews_pipeline(preview_broker, tmp_path):
    with tdc.FramePipeline(preview_broker.url, output_dir=str(tmp_path), workflow="slow_preview") as pipe:
        pipe.submit(FRAME, previews=True)
        events: list = []
        last = pump_until(pipe, lambda e: e.kind in ("done", "error"), timeout=90, collected=events)
        assert last.kind == "done", last.message
        previews = [e for e in events if e.kind == "preview"]
        assert previews, "the preview thread starts for the first submit that asks for previews"
        assert events.index(previews[-1]) < events.index(last), "no preview after the job's end"
