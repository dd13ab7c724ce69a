"""Previews against the real `tdcomfy up --simulate`: the simulator's binary preview frames reach
the client as `preview` events with complete image files under two alternating names.

The workflow is the repository's workflows plus one whose test node (SlowPassthrough) sends a
JPEG preview at every step, the way a sampler does with a preview method set.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from td_helpers import REPO_ROOT, png_bytes, pump_until

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

    workflows = tmp_path_factory.mktemp("workflows")
    for path in (REPO_ROOT / "workflows").glob("*.json"):
        shutil.copy(path, workflows / path.name)
    (workflows / "slow_preview.json").write_text(json.dumps(SLOW_PREVIEW))
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
