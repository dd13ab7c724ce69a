"""The client loads the way TouchDesigner loads a Text DAT module or an extension.

TouchDesigner compiles a DAT's text into a module object of its own; whether that module is
registered in ``sys.modules`` is not documented (touchdesigner-api.md §12, "Whether DAT modules are
registered in sys.modules"), and the fake TD there defaults to *not* registered (§11 item 8:
"Default: not in sys.modules (reproduces the dataclass failure)"). Docs: https://docs.derivative.ca/MOD_Class
(``mod.name`` / ``dat.module`` compile the DAT text) and https://docs.derivative.ca/Extensions (the
extension object comes from ``op('./X').module.X(me)``). So here the file is executed into a fresh
``types.ModuleType`` that ``sys.modules`` never hears of, under a DAT-like name.
"""

from __future__ import annotations

import sys
import types

from td_helpers import CLIENT_DIR, png_bytes


def load_like_a_text_dat(name: str = "touchdesigner_client_dat") -> types.ModuleType:
    source = (CLIENT_DIR / "touchdesigner_client.py").read_text(encoding="utf-8")
    module = types.ModuleType(name)
    module.__file__ = "/project1/touchdesigner_client"  # a DAT path, not a file on disk
    assert name not in sys.modules
    # dont_inherit: compile the text on its own, not under this test file's __future__ flags.
    exec(compile(source, module.__file__, "exec", dont_inherit=True), module.__dict__)
    assert name not in sys.modules
    return module


def test_the_client_loads_as_a_module_that_is_not_in_sys_modules(tmp_path):
    module = load_like_a_text_dat()
    # What a user's script does with it: build the value types and a pipeline, read events.
    event = module.PipelineEvent("done", 1, job_id="j", path="/x.mp4")
    assert event.message == "frame 1: done -> /x.mp4"
    assert module.ServerEvent("job", "1", {"a": 1}).data == {"a": 1}
    error = module.TDComfyError("timeout", "slow")
    assert error.retryable
    pipeline = module.FramePipeline("http://127.0.0.1:9", output_dir=str(tmp_path), submit_retry_for=0)
    try:
        assert pipeline.submit(png_bytes(8, 8)) == 1
        assert isinstance(pipeline.pump(), list)
    finally:
        pipeline.close()
