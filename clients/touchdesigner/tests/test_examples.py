"""The TouchDesigner glue in examples/, run outside TouchDesigner with fake operators."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

from td_helpers import CLIENT_DIR, FakeMovieFileIn, FakeSwitch, FakeTextDAT, FakeTOP, png_bytes
from test_unit import FakeClient

import touchdesigner_client as tdc

EXAMPLES = CLIENT_DIR / "examples"


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# A/B swap
# ---------------------------------------------------------------------------------------------


def make_swap():
    a, b, switch = FakeMovieFileIn("/a"), FakeMovieFileIn("/b"), FakeSwitch()
    return load_module("ab_swap").ABSwap(a, b, switch), a, b, switch


def test_ab_swap_switches_only_when_the_new_clip_is_fully_pre_read():
    swap, a, b, switch = make_swap()
    swap.load("/results/one.mp4")
    assert (b.par.file, b.par.play, b.preloads) == ("/results/one.mp4", False, [("/results/one.mp4", 0)])
    assert swap.update() is False and switch.par.index == 0  # still loading: keep showing A
    b.isFullyPreRead = True
    assert swap.update() is True
    assert switch.par.index == 1
    assert (b.par.play, b.par.cuepulse.pulses) == (True, 1)
    assert (a.par.play, a.unloads) == (False, 1)
    assert swap.live_path == "/results/one.mp4" and swap.status == "playing"

    swap.load("/results/two.mp4")  # the next clip goes to the hidden player, A
    assert a.par.file == "/results/two.mp4" and b.par.file == "/results/one.mp4"
    a.isFullyPreRead = True
    assert swap.update() is True and switch.par.index == 0


def test_ab_swap_newer_load_replaces_the_pending_one():
    swap, a, b, switch = make_swap()
    swap.load("/r/1.mp4")
    swap.load("/r/2.mp4")
    b.isFullyPreRead = True
    swap.update()
    assert swap.live_path == "/r/2.mp4" and switch.par.index == 1


def test_ab_swap_keeps_the_old_clip_when_the_new_one_cannot_open():
    swap, a, b, switch = make_swap()
    swap.load("/r/broken.mp4")
    b.isInvalid = True
    assert swap.update() is False
    assert switch.par.index == 0 and swap.status == "error" and "broken" in swap.last_error


def test_ab_swap_clip_finished_follows_the_visible_player():
    swap, a, b, switch = make_swap()
    assert swap.clip_finished  # nothing playing yet
    swap.load("/r/1.mp4")
    b.isFullyPreRead = True
    swap.update()
    assert not swap.clip_finished
    b.isLastFrame = True
    assert swap.clip_finished


# ---------------------------------------------------------------------------------------------
# Status readout
# ---------------------------------------------------------------------------------------------


class FakeTableDAT:
    isTable = True  # noqa: N815 - TouchDesigner's name
    isDAT = True  # noqa: N815

    def __init__(self):
        self.rows = []

    def clear(self):
        self.rows = []

    def appendRow(self, row):  # noqa: N802 - TouchDesigner's name
        self.rows.append(row)


class StatsOnly:
    def __init__(self, **stats):
        self._stats = stats

    def stats(self):
        return self._stats


def test_status_readout_shows_progress_and_errors_and_writes_only_on_change():
    readout = load_module("status_readout").StatusReadout(bar_width=10)
    pipeline = StatsOnly(in_flight=1, waiting=0, done=0, errors=0, skipped=0, dropped=0)
    readout.add(tdc.PipelineEvent("submitted", 1, "job-1"))
    readout.add(tdc.PipelineEvent("progress", 1, "job-1", progress=0.42))
    text = FakeTextDAT()
    assert readout.write(text, pipeline) is True
    assert "state: running" in text.text
    assert "[####------] 42%" in text.text
    assert readout.write(text, pipeline) is False  # unchanged: no write, no downstream cook
    readout.add(tdc.PipelineEvent("error", 1, "job-1", error=tdc.TDComfyError("job_failed", "out of memory")))
    table = FakeTableDAT()
    assert readout.write(table, pipeline) is True
    assert ["error", "job_failed: out of memory"] in table.rows
    assert ["state", "error"] in table.rows
    readout.add(tdc.PipelineEvent("done", 2, "job-2", path="/r/job-2.mp4"))
    text_top = types.SimpleNamespace(par=types.SimpleNamespace(text=""))
    assert readout.write(text_top, pipeline) is True
    assert "result: /r/job-2.mp4" in text_top.par.text and "state: done" in text_top.par.text


# ---------------------------------------------------------------------------------------------
# The Execute DAT example, with fake operators
# ---------------------------------------------------------------------------------------------


class FakeOwner:
    """`me` for the Execute DAT: storage with fetch/store/storeStartupValue/unstore."""

    def __init__(self):
        self.storage = {}
        self.startup = {}

    def fetch(self, key, default=None, search=True):
        return self.storage.get(key, default)

    def store(self, key, value):
        self.storage[key] = value

    def storeStartupValue(self, key, value):  # noqa: N802
        self.startup[key] = value

    def unstore(self, key):
        self.storage.pop(key, None)


class FakeTD:
    """The operators the Execute DAT example expects, plus the globals TouchDesigner injects."""

    def __init__(self, project_folder: Path, image: bytes):
        self.ops = {
            "source_top": FakeTOP(image),
            "moviefilein_a": FakeMovieFileIn("/moviefilein_a"),
            "moviefilein_b": FakeMovieFileIn("/moviefilein_b"),
            "result_switch": FakeSwitch(),
            "ab_swap": types.SimpleNamespace(module=load_module("ab_swap")),
            "status_readout": types.SimpleNamespace(module=load_module("status_readout")),
            "status": FakeTextDAT(),
        }
        self.me = FakeOwner()
        self.namespace = {
            "__name__": "tdcomfy_exec",
            "op": self.ops.get,
            "me": self.me,
            "project": types.SimpleNamespace(folder=str(project_folder)),
        }
        source = (EXAMPLES / "execute_dat_pipeline.py").read_text()
        exec(compile(source, "execute_dat_pipeline.py", "exec"), self.namespace)

    def run_frames(self, until, max_frames=3000, on_frame=None):
        """Calls onFrameStart like TouchDesigner's timeline until ``until()`` is true."""
        import time

        for frame in range(1, max_frames + 1):
            self.namespace["onFrameStart"](frame)
            if on_frame is not None:
                on_frame()
            if until():
                return frame
            time.sleep(0.01)
        raise AssertionError(f"not reached after {max_frames} frames; status:\n{self.ops['status'].text}")


def finish_preloads(td: FakeTD):
    """Movie File In TOPs finish pre-reading one frame after preload()."""
    for name in ("moviefilein_a", "moviefilein_b"):
        movie = td.ops[name]
        if movie.preloads and not movie.isFullyPreRead:
            movie.isFullyPreRead = True


def test_execute_dat_example_runs_the_loop_on_the_main_thread_without_network(project):
    td = FakeTD(project, png_bytes(16, 16))
    fake = FakeClient()
    td.namespace["SERVER_URL"] = fake  # FramePipeline accepts a client object in place of a URL
    td.namespace["WAIT_FOR_CLIP_END"] = True
    td.namespace["onStart"]()
    state = td.me.storage["tdcomfy_state"]
    assert td.me.startup == {"tdcomfy_state": None}  # the live pipeline is not saved in the .toe
    switch, movie_a, movie_b = td.ops["result_switch"], td.ops["moviefilein_a"], td.ops["moviefilein_b"]

    td.run_frames(lambda: switch.par.index == 1, on_frame=lambda: finish_preloads(td))
    live = movie_b.par.file
    assert Path(live).parent == project / "tdcomfy_results" and Path(live).exists()
    assert td.ops["source_top"].calls[0] == (".jpg", {"quality": 0.9})
    assert "state: done" in td.ops["status"].text
    # While the clip plays, nothing new is sent.
    frames = iter(range(30))
    td.run_frames(lambda: next(frames) == 29)
    assert len(fake.submits) == 1

    movie_b.isLastFrame = True  # the clip reached its end: the next frame goes out
    td.run_frames(lambda: switch.par.index == 0, on_frame=lambda: finish_preloads(td))
    assert len(fake.submits) == 2 and movie_a.par.file != live

    td.namespace["onExit"]()
    assert "tdcomfy_state" not in td.me.storage
    assert state["pipeline"].stats()["closed"]
