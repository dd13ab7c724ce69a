"""Execute DAT: the live frame -> ComfyUI -> video loop on the non-blocking FramePipeline.

This is the original design's Execute DAT example rewritten so that TouchDesigner's main thread
never waits for the network: every frame it only drains pipeline events, advances the A/B player
and, when the pipeline has room, captures one frame and hands it over.

Setup (README.md explains every step):
  1. Put touchdesigner_client.py next to your .toe (project.folder).
  2. In the COMP holding this DAT, create:
       source_top      any TOP: the frame to send (scale it to the generation size first)
       moviefilein_a   Movie File In TOP  -> input 0 of result_switch
       moviefilein_b   Movie File In TOP  -> input 1 of result_switch
       result_switch   Switch TOP (what is shown)
       ab_swap         Text DAT with examples/ab_swap.py
       status_readout  Text DAT with examples/status_readout.py
       status          Text DAT (or Text TOP / Table DAT) the readout is written to
  3. Paste this file into an Execute DAT and turn on its Start, Exit and Frame Start toggles.
  4. Edit the settings below, then run start() (or restart TouchDesigner).

From a Button or the Textport: op('tdcomfy_exec').module.submit_now() sends the current frame,
.restart() applies changed settings, .stop() closes the connection.
"""

# `op`, `me` and `project` are globals TouchDesigner provides to every DAT script.
# ruff: noqa: F821

import os
import sys
import time

# ---- settings --------------------------------------------------------------------------------
SERVER_URL = "http://127.0.0.1:8080"  # the broker (API_HOST/API_PORT on the broker machine)
API_TOKEN = None  # the broker's API_TOKEN, if it has one
SOURCE_TOP = "source_top"
MOVIE_A = "moviefilein_a"
MOVIE_B = "moviefilein_b"
SWITCH_TOP = "result_switch"
AB_SWAP_DAT = "ab_swap"
READOUT_DAT = "status_readout"
STATUS_OUT = "status"
PROMPT = ""  # the positive prompt (empty = none)
NEGATIVE_PROMPT = ""
SEED = None  # None = the broker picks one
WORKFLOW = None  # None = the broker's default workflow
PARAMS = None  # dict of workflow inputs, e.g. {"frames": 49}
JPEG_QUALITY = 0.9
AUTO_SUBMIT = True  # send a new frame whenever the pipeline has room
WAIT_FOR_CLIP_END = False  # ... but only after the visible clip played to its end
MAX_IN_FLIGHT = 1
WHEN_BUSY = "skip"  # or "replace"
KEEP_RESULTS = 4  # result files kept on disk (at least 3 with the A/B player)
OUTPUT_FOLDER = "tdcomfy_results"  # relative to project.folder
ERROR_PAUSE_SECONDS = 2.0  # after an error, wait before auto-submitting again
STORAGE_KEY = "tdcomfy_state"
# -----------------------------------------------------------------------------------------------


def _client_module():
    folder = project.folder
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import touchdesigner_client

    return touchdesigner_client


def _state():
    return me.fetch(STORAGE_KEY, None, search=False)


def start():
    """Creates the pipeline and the helpers; closes a previous pipeline first."""
    stop()
    tdc = _client_module()
    pipeline = tdc.FramePipeline(
        SERVER_URL,
        token=API_TOKEN,
        output_dir=os.path.join(project.folder, OUTPUT_FOLDER),
        max_in_flight=MAX_IN_FLIGHT,
        when_busy=WHEN_BUSY,
        keep_results=KEEP_RESULTS,
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        seed=SEED,
        workflow=WORKFLOW,
        params=PARAMS,
    )
    state = {
        "tdc": tdc,
        "pipeline": pipeline,
        "swap": op(AB_SWAP_DAT).module.ABSwap(op(MOVIE_A), op(MOVIE_B), op(SWITCH_TOP)),
        "readout": op(READOUT_DAT).module.StatusReadout(),
        "paused_until": 0.0,
    }
    # The pipeline lives in storage so that editing this DAT (which re-runs the module) does not
    # leak it; the startup value keeps the live object out of the saved .toe.
    me.store(STORAGE_KEY, state)
    me.storeStartupValue(STORAGE_KEY, None)
    return state


def stop():
    """Closes the pipeline (stops its threads) and forgets it."""
    state = _state()
    if state is not None:
        state["pipeline"].close()
        me.unstore(STORAGE_KEY)


def restart():
    """Applies changed settings."""
    return start()


def submit_now():
    """Captures SOURCE_TOP and submits it; returns the ticket, or None if the pipeline is busy."""
    state = _state() or start()
    tdc = state["tdc"]
    try:
        image = tdc.top_to_jpeg_bytes(op(SOURCE_TOP), JPEG_QUALITY)
    except tdc.TDComfyError as exc:
        state["readout"].last_error = str(exc)
        state["paused_until"] = time.monotonic() + ERROR_PAUSE_SECONDS
        return None
    return state["pipeline"].submit(image)


def onStart():
    start()


def onExit():
    stop()


def onFrameStart(frame):
    state = _state() or start()
    pipeline, swap, readout = state["pipeline"], state["swap"], state["readout"]
    for event in pipeline.pump():
        readout.add(event)
        if event.kind == "done":
            swap.load(event.path)
        elif event.kind == "error":
            print(f"tdcomfy: {event.message}")
            state["paused_until"] = time.monotonic() + ERROR_PAUSE_SECONDS
    swap.update()
    if (
        AUTO_SUBMIT
        and pipeline.is_ready_for_next()
        and time.monotonic() >= state["paused_until"]
        and (not WAIT_FOR_CLIP_END or (swap.pending_path is None and swap.clip_finished))
    ):
        submit_now()
    readout.write(op(STATUS_OUT), pipeline)
