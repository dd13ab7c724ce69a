"""The tdcomfy component (build_component + TDComfyExt), driven frame by frame in the fake
TouchDesigner of fake_td.py (its citation table: fake_td.md) against the real
`tdcomfy up --simulate`. Nothing of the client is mocked: HTTP, the broker, the worker and the
ComfyUI simulator are the real ones; only TouchDesigner is a fake.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_td import FakeTD, tdError
from td_helpers import Broker, mp4_info, workflows_dir

import touchdesigner_client as tdc

# The default workflow at a size the simulator encodes quickly (generated 256x160, 17 frames,
# scaled to 320x192), set on the Workflow page as a user would.
SMALL = {"Frames": 17, "Width": 256, "Height": 160, "Outwidth": 320, "Outheight": 192}
SLOW_PREVIEW = {  # a test node that renders 12 steps of 0.15 s and sends a JPEG preview at each
    "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "2": {"class_type": "SlowPassthrough", "_meta": {"title": "@steps @send_preview"},
          "inputs": {"images": ["1", 0], "steps": 12, "step_seconds": 0.15, "send_preview": True}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "tdcomfy/preview"}},
}

# A callbacks DAT that records every call (kind, info) in a list of its module.
RECORDING_CALLBACKS = "calls = []\n" + "".join(
    f"def {name}(comp, info):\n    calls.append(({name!r}, dict(info)))\n\n"
    for name in ("onQueued", "onStarted", "onProgress", "onPreview", "onDone", "onError", "onCancelled")
)


@pytest.fixture(scope="module")
def component_broker(tmp_path_factory):
    workflows = workflows_dir(tmp_path_factory.mktemp("workflows"), slow_preview=SLOW_PREVIEW)
    instance = Broker(tmp_path_factory.mktemp("data"), sim_job_time=0.5,
                      extra_env={"WORKFLOWS_DIR": str(workflows), "PREVIEW_FPS": "10"})
    instance.start()
    instance.wait_for_worker()
    yield instance
    instance.stop()


class Rig:
    """A fake TouchDesigner with a source TOP wired into a freshly built component."""

    def __init__(self, url: str, build: str = "2025") -> None:
        self.td = FakeTD(build=build)
        self.source = self.td.project1.create("nullTOP", "source")
        self.source.fake_pixels = (256, 160, 90)
        self.comp = tdc.build_component(self.td.project1, url=url)
        self.comp.inputConnectors[0].connect(self.source)
        self.comp.op("callbacks").text = RECORDING_CALLBACKS

    @property
    def ext(self) -> tdc.TDComfyExt:
        return self.comp.ext.TDComfyExt

    @property
    def calls(self) -> list:
        return self.comp.op("callbacks").module.calls

    def kinds(self, name: str) -> list[dict]:
        return [info for kind, info in self.calls if kind == name]

    def info(self, key: str) -> str:
        return self.comp.op("info")[key, 1].val

    def wait_for_workflow_page(self) -> None:
        self.td.run_frames(lambda: self.comp.par["Frames"] is not None, 30)

    def set(self, **values) -> None:
        for name, value in values.items():
            setattr(self.comp.par, name, value)

    def close(self) -> None:
        pipeline = self.ext.pipeline
        self.td.exit()  # the Execute DAT's onExit closes the pipeline and the monitor
        if pipeline is not None:
            assert pipeline.wait_closed(10)
        assert self.td.thread_violations == []


@pytest.fixture
def rig(component_broker):
    made = []

    def make(build: str = "2025", url: str | None = None) -> Rig:
        made.append(Rig(url or component_broker.url, build))
        return made[-1]

    yield make
    for one in made:
        one.close()


def test_custom_parameter_names_follow_touchdesigners_rule():
    assert [tdc._td_name(n) for n in ("out_width", "cfg", "3d", "LoRA-strength")] == [
        "Outwidth", "Cfg", "P3d", "Lorastrength"]
    td = FakeTD()
    page = td.project1.create("baseCOMP", "c").appendCustomPage("P")
    with pytest.raises(tdError):  # the fake holds the builder to the rule, as TD may
        page.appendInt("out_width")
    assert page.appendInt("Outwidth")[0].name == "Outwidth"


def test_the_workflow_page_is_built_from_the_broker_schema_and_survives_a_rebuild(rig, component_broker):
    r = rig()
    r.wait_for_workflow_page()
    comp = r.comp
    workflow = comp.par.Workflow
    assert set(workflow.menuNames) >= {"ltxv_image_to_video", "image_invert", "slow_preview"}
    assert workflow.eval() == "ltxv_image_to_video"  # the broker's default
    label = workflow.menuLabels[workflow.menuNames.index("ltxv_image_to_video")]
    assert "[default]" in label and "(ready)" in label  # readiness from the worker's preflight
    page = next(p for p in comp.customPages if p.name == "Workflow")
    names = [p.name for p in page.pars]
    # The schema's parameters, minus the frame (an image) and those the TDComfy page has.
    assert set(names) == {"Cfg", "Fps", "Frames", "Height", "Outheight", "Outwidth", "Steps", "Width"}
    frames, cfg = comp.par.Frames, comp.par.Cfg
    assert (frames.style, frames.eval(), frames.min, frames.clampMin, frames.label) == ("Int", 97, 9, True, "Frames")
    assert (cfg.style, cfg.eval(), cfg.min, cfg.max) == ("Float", 3.0, 0.0, 100.0)
    assert comp.par.Outwidth.label == "Out Width" and "Output size" in comp.par.Outwidth.help

    r.set(Frames=17, Cfg=4.5, Prompt="ink in water")
    r.set(Workflow="image_invert")  # no parameters of its own: the page goes
    r.td.run_frames(lambda: comp.par["Frames"] is None, 5)
    assert [p.name for p in comp.customPages] == ["TDComfy"] and r.ext.WorkflowParams() == {}
    r.set(Workflow="ltxv_image_to_video")  # back: the values set before are there again
    r.td.run_frames(lambda: comp.par["Frames"] is not None, 5)
    assert (comp.par.Frames.eval(), comp.par.Cfg.eval()) == (17, 4.5)
    comp.par.Refresh.pulse()  # a fresh schema from the broker keeps them too
    r.td.run_frames(lambda: r.td.absTime.frame > 30, 5)
    assert (comp.par.Frames.eval(), comp.par.Cfg.eval()) == (17, 4.5)
    params = r.ext.WorkflowParams()
    assert params["frames"] == 17 and params["cfg"] == 4.5 and params["out_width"] == 512
    assert "image" not in params and "prompt" not in params

    # Parameters bound by expression stay bound across rebuilds: Negative to a Text DAT beside the
    # component, Steps to an expression.
    r.td.project1.create("textDAT", "negative_text").text = "blurry"
    comp.par.Negative.expr = "op('negative_text').text"
    comp.par.Steps.expr = "10 + 5"
    r.set(Workflow="image_invert")
    r.td.run_frames(lambda: comp.par["Steps"] is None, 5)
    r.set(Workflow="ltxv_image_to_video")
    r.td.run_frames(lambda: comp.par["Steps"] is not None, 5)
    assert (comp.par.Steps.expr, comp.par.Steps.eval(), r.ext.WorkflowParams()["steps"]) == ("10 + 5", 15, 15)

    # Building again over the component (a new client version) keeps every value, binding and callback.
    callbacks_text = comp.op("callbacks").text
    again = tdc.build_component(r.td.project1, url=component_broker.url)
    assert again is comp
    r.td.run_frames(lambda: comp.par["Frames"] is not None, 10)
    assert (comp.par.Prompt.eval(), comp.par.Frames.eval(), comp.par.Cfg.eval()) == ("ink in water", 17, 4.5)
    assert (comp.par.Negative.expr, comp.par.Negative.eval()) == ("op('negative_text').text", "blurry")
    assert comp.op("callbacks").text == callbacks_text


def test_active_sends_frames_and_the_video_is_swapped_in_only_when_pre_read(rig):
    r = rig()
    r.wait_for_workflow_page()
    captures_before = len(r.td.fake_captures)
    assert captures_before == 0  # nothing is captured until a frame is sent
    r.set(**SMALL, Prompt="ink in water", Seed=7, Fadeframes=4)
    a, b, cross = (r.comp.op(n) for n in ("moviefilein_a", "moviefilein_b", "result_cross"))
    shown = []  # per frame: (cross, A pre-read, B pre-read, frames in flight, A's file, B's file)

    def record() -> None:
        shown.append((cross.par.cross.eval(), a.isFullyPreRead, b.isFullyPreRead, r.ext.pipeline.in_flight,
                      a.par.file.eval(), b.par.file.eval()))

    r.set(Active=True)
    r.td.run_frames(lambda: r.ext.player.swaps >= 3, 120, on_frame=record)
    r.set(Active=False)

    for (before, *_, a_file, b_file), (value, a_ready, b_ready, _, a_now, b_now) in zip(shown, shown[1:]):
        # Every move of the cross towards a player happened while that player was fully pre-read ...
        if value > before:
            assert b_ready, shown
        if value < before:
            assert a_ready, shown
        # ... and no player got a new file while any of it was on screen (cross 0 shows A only); a
        # player is emptied (File "") in the frame the fade leaves it, so it cannot reopen its clip.
        if a_now != a_file:
            assert before == 1.0 or (value == 1.0 and a_now == ""), shown
        if b_now != b_file:
            assert before == 0.0 or (value == 0.0 and b_now == ""), shown
    # When a fade ends, the player it left lets go of its clip in that frame.
    ends = [(value, a_now, b_now) for (before, *_), (value, _, _, _, a_now, b_now) in zip(shown, shown[1:])
            if 0 < before < 1 and value in (0.0, 1.0)]
    assert ends, shown
    assert all((b_now if value == 0.0 else a_now) == "" for value, a_now, b_now in ends), ends
    assert any(0 < s[0] < 1 for s in shown)  # Fadeframes: the cross fades over frames
    assert max(s[3] for s in shown) == 1  # Mode "one": one frame at a time
    # A frame was captured for each frame sent, and only then (JPEG, the Jpegquality value).
    # (The last capture may still be uploading: it has no onQueued yet.)
    assert len(r.td.fake_captures) - len(r.kinds("onQueued")) in (0, 1)
    assert len(r.kinds("onQueued")) >= 2
    assert {(path, suffix, quality) for path, suffix, quality in r.td.fake_captures} == {
        ("/project1/tdcomfy/in1", ".jpg", 0.9)}
    # The clip on screen is the real result, made with the Workflow page's values.
    live = (a, b)[r.ext.player.live]
    info = mp4_info(Path(live.par.file.eval()).read_bytes())
    assert (info.width, info.height, info.sample_count) == (320, 192, 17)
    order = [kind for kind, _ in r.calls if kind in ("onQueued", "onStarted", "onDone")]
    assert order[:3] == ["onQueued", "onStarted", "onDone"]
    assert r.kinds("onProgress") and all(0 <= i["progress"] <= 1 for i in r.kinds("onProgress"))
    done = r.kinds("onDone")[0]
    assert done["latency"] > 0 and Path(done["path"]).exists()
    assert int(r.info("frames_done")) >= 2 and float(r.info("last_latency")) > 0
    chop = r.comp.op("info_chop")
    assert chop["frames_done"][0] >= 2 and chop["connected"][0] == 1 and chop["error"][0] == 0
    assert r.comp.scriptErrors() == ""


def test_building_over_an_operator_that_is_not_a_component_is_refused():
    td = FakeTD()
    other = td.project1.create("baseCOMP", "tdcomfy")
    other.create("textDAT", "notes")
    with pytest.raises(ValueError, match="not a tdcomfy component"):
        tdc.build_component(td.project1)
    assert [c.name for c in other.children] == ["notes"] and other.customPages == []


def test_captureformat_png_sends_a_lossless_frame(rig):
    r = rig()
    r.wait_for_workflow_page()
    r.set(Workflow="image_invert", Captureformat="png")
    r.td.run_frames(lambda: r.td.absTime.frame > 3, 5)
    r.comp.par.Send.pulse()
    r.td.run_frames(lambda: r.kinds("onDone") or r.kinds("onError"), 60)
    assert r.kinds("onDone"), r.calls
    assert [suffix for _, suffix, _ in r.td.fake_captures] == [".png"]


def test_the_preview_top_shows_each_new_preview(rig):
    r = rig()
    r.wait_for_workflow_page()
    r.set(Workflow="slow_preview")  # Preview is on by default
    r.td.run_frames(lambda: r.td.absTime.frame > 3, 5)
    preview = r.comp.op("preview_movie")
    files = []

    def record() -> None:
        path = preview.par.file.eval()
        if path and (not files or files[-1][0] != path):
            data = Path(path).read_bytes()
            files.append((path, data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"))

    r.comp.par.Send.pulse()
    r.td.run_frames(lambda: r.kinds("onDone") or r.kinds("onError"), 60, on_frame=record)
    assert r.kinds("onDone"), r.calls
    assert len(files) >= 2 and all(whole for _, whole in files), files  # each one a complete JPEG
    assert len(r.kinds("onPreview")) >= 2


def test_workflow_toggles_and_ints_reach_the_job(rig):
    # slow_preview's node title marks `steps` (an integer) and `send_preview` (a boolean).
    r = rig()
    r.wait_for_workflow_page()
    r.set(Workflow="slow_preview")
    r.td.run_frames(lambda: r.comp.par["Sendpreview"] is not None, 5)
    steps, send_preview = r.comp.par.Steps, r.comp.par.Sendpreview
    assert (steps.style, steps.eval(), send_preview.style, send_preview.eval()) == ("Int", 12, "Toggle", True)
    r.set(Steps=4, Sendpreview=False)
    assert r.ext.WorkflowParams() == {"steps": 4, "send_preview": False}
    r.comp.par.Send.pulse()
    r.td.run_frames(lambda: r.kinds("onDone") or r.kinds("onError"), 60)
    assert r.kinds("onDone"), r.calls
    assert {i["job"]["progress"].get("max_steps") for i in r.kinds("onProgress")} - {None} == {4}
    assert r.kinds("onPreview") == []  # the node sent none: the toggle reached it


def test_a_schema_with_choices_becomes_a_menu_and_its_value_is_sent_as_given():
    # The broker's GET /workflows has no `choices` today; this is the shape it would take.
    r = Rig("http://127.0.0.1:9")
    try:
        r.ext.workflows = {"default": "w", "workflows": [{"name": "w", "is_default": True, "ready": None, "parameters": [
            {"name": "sampler", "type": "string", "default": "euler", "choices": ["euler", "dpmpp_2m"]},
            {"name": "frames", "type": "integer", "default": 9, "choices": [9, 17, 25]},
        ]}]}
        r.ext._fill_workflow_menu()
        r.ext._build_workflow_page()
        sampler, frames = r.comp.par.Sampler, r.comp.par.Frames
        assert (sampler.style, sampler.menuNames, sampler.eval()) == ("Menu", ["euler", "dpmpp_2m"], "euler")
        assert (frames.style, frames.menuNames) == ("Menu", ["9", "17", "25"])
        r.set(Sampler="dpmpp_2m", Frames="17")
        assert r.ext.WorkflowParams() == {"sampler": "dpmpp_2m", "frames": 17}
    finally:
        r.close()


def test_queue_mode_keeps_up_to_maxinflight_frames_in_flight(rig):
    r = rig()
    r.wait_for_workflow_page()
    r.set(**SMALL, Mode="queue", Maxinflight=2)
    in_flight = []
    r.set(Active=True)
    r.td.run_frames(lambda: len(r.kinds("onDone")) >= 3, 90, on_frame=lambda: in_flight.append(r.ext.pipeline.in_flight))
    r.set(Active=False)
    assert max(in_flight) == 2 and r.kinds("onCancelled") == [] and r.kinds("onError") == []


def test_latest_mode_drops_stale_frames(rig):
    r = rig()
    r.wait_for_workflow_page()
    r.set(Workflow="slow_preview", Preview=False, Mode="latest", Maxinflight=3)
    r.set(Active=True)
    r.td.run_frames(lambda: r.kinds("onCancelled") and len(r.kinds("onDone")) >= 2, 90)
    r.set(Active=False)
    superseded = [i for i in r.kinds("onCancelled") if i["cancel_reason"] == "superseded"]
    assert superseded, r.calls
    done_tickets = [i["ticket"] for i in r.kinds("onDone")]
    assert not {i["ticket"] for i in superseded} & set(done_tickets)  # a stale frame never plays
    assert done_tickets == sorted(done_tickets)
    assert r.kinds("onError") == [], [i["error"] for i in r.kinds("onError")]


def test_cancel_cancels_the_components_jobs(rig):
    r = rig()
    r.wait_for_workflow_page()
    r.set(Workflow="slow_preview", Preview=False)
    r.td.run_frames(lambda: r.td.absTime.frame > 3, 5)
    r.comp.par.Send.pulse()
    r.td.run_frames(lambda: r.kinds("onStarted"), 30)
    r.comp.par.Cancel.pulse()
    r.td.run_frames(lambda: r.kinds("onCancelled") or r.kinds("onDone"), 30)
    assert [i["cancel_reason"] for i in r.kinds("onCancelled")] == ["cancelled"]
    assert r.kinds("onDone") == []
    assert r.info("state") == "cancelled"


def test_a_failing_job_shows_its_error_on_the_comp_and_in_onerror(rig):
    r = rig()
    r.wait_for_workflow_page()
    r.set(Frames=9, Width=8192, Height=8192)  # valid for the broker, too big for the (simulated) GPU
    r.comp.par.Send.pulse()
    r.td.run_frames(lambda: r.kinds("onError"), 60)
    error = r.kinds("onError")[0]
    assert error["error_code"] == "job_failed" and "out of memory" in error["error"]
    assert "out of memory" in r.comp.scriptErrors()  # on the COMP, not only in the Textport
    assert "out of memory" in r.info("last_error") and r.comp.op("info_chop")["error"][0] == 1
    # The next good frame clears it.
    r.set(**SMALL)
    r.comp.par.Send.pulse()
    r.td.run_frames(lambda: r.kinds("onDone"), 60)
    assert r.comp.scriptErrors() == "" and r.info("last_error") == ""


def test_a_broker_that_goes_away_and_comes_back_is_reconnected_without_a_pulse(start_broker):
    broker = start_broker(sim_job_time=0.3)
    broker.wait_for_worker()
    r = Rig(broker.url)
    try:
        r.wait_for_workflow_page()
        r.set(**SMALL)
        r.set(Active=True)
        r.td.run_frames(lambda: r.kinds("onDone"), 60)
        broker.kill()
        r.td.run_frames(lambda: "unreachable" in r.comp.scriptErrors(), 30)
        assert r.info("state") == "offline" and r.comp.op("info_chop")["connected"][0] == 0
        assert any("unreachable" in info["error"] for info in r.kinds("onError")), "onError hears of the outage"
        captures = len(r.td.fake_captures)
        r.td.run_frames(lambda: r.td.absTime.frame > 0, 1)
        broker.start()  # same ports, same data directory; no pulse, no parameter touched
        done_before = len(r.kinds("onDone"))
        r.td.run_frames(lambda: len(r.kinds("onDone")) > done_before + 1, 90)
        assert r.comp.scriptErrors() == "" and r.info("connected") == "1"
        assert len(r.td.fake_captures) > captures
    finally:
        r.close()


def test_a_wrong_url_shows_on_the_comp_and_setting_the_right_one_connects(rig, component_broker):
    r = rig(url="http://127.0.0.1:9")
    r.td.run_frames(lambda: "unreachable" in r.comp.scriptErrors(), 30)
    assert r.info("state") == "offline" and r.comp.par.Workflow.menuNames == []
    old = r.ext.pipeline
    r.set(Url=component_broker.url)
    r.wait_for_workflow_page()
    assert old.wait_closed(10) and r.ext.pipeline is not old
    assert r.comp.scriptErrors() == "" and r.info("connected") == "1" and r.info("state") == "idle"


def test_reinitialising_the_extension_closes_the_old_pipeline(tmp_path):
    for build in ("2023", "2025"):  # __delTD__ on 2023 builds, onDestroyTD on 2025 builds
        r = Rig("http://127.0.0.1:9", build=build)
        old = r.ext
        r.comp.par.reinitextensions.pulse()
        assert r.ext is not old and old.pipeline.wait_closed(10)
        # The stream id lives in the COMP's storage: latest mode and Dedupe go on in the same stream.
        assert r.ext.stream == old.stream and r.ext.pipeline.stream == old.stream
        r.close()


def test_the_component_outputs_the_video_the_preview_and_its_info_as_dat_and_chop(rig):
    r = rig()
    outputs = {name: r.comp.op(name) for name in ("out_video", "out_preview", "out_info", "out_info_chop")}
    assert {n: o.OPType for n, o in outputs.items()} == {
        "out_video": "outTOP", "out_preview": "outTOP", "out_info": "outDAT", "out_info_chop": "outCHOP"}
    sources = {n: o.inputs[0].name for n, o in outputs.items()}
    assert sources == {"out_video": "result_cross", "out_preview": "preview_movie", "out_info": "info",
                       "out_info_chop": "info_chop"}
