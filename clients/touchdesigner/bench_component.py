"""Benchmark: how long the tdcomfy component holds TouchDesigner's main thread.

Builds the component (``build_component``) in the fake TouchDesigner of the tests
(tests/fake_td.py), wires a 1280x720 source into it and runs frames at 60 Hz with ``Active`` on
against `tdcomfy up --simulate`, changing a Workflow-page value and pulsing ``Send``/``Refresh``
now and then. Prints p50/p99/max of every main-thread call into the component (the Execute DAT's
``onFrameStart``, the Parameter Execute DAT's ``onValueChange`` and ``onPulse``); target 1 ms.
The capture (``saveByteArray``) is TouchDesigner's cost, not the client's: it is timed on its own
and subtracted ("own"), since the fake's encoder is no measure of TD's GPU readback.

    cargo build -p tdcomfy
    python3 clients/touchdesigner/bench_component.py --seconds 20

Standard library only. Not a test: timings depend on the machine; read the numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "tests")]

from bench_pump import summary  # noqa: E402
from fake_td import FakeTD  # noqa: E402
from td_helpers import Broker  # noqa: E402

import touchdesigner_client as tdc  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running broker; default: start `tdcomfy up --simulate` here")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--fps", type=float, default=60.0)
    parser.add_argument("--mode", choices=("one", "latest", "queue"), default="latest")
    parser.add_argument("--target-ms", type=float, default=1.0)
    args = parser.parse_args()

    broker = None
    url = args.url
    if url is None:
        broker = Broker(Path(tempfile.mkdtemp(prefix="tdcomfy-bench-")), sim_job_time=1.0)
        broker.start()
        broker.wait_for_worker()
        url = broker.url
    td = FakeTD(fps=args.fps)
    source = td.project1.create("nullTOP", "source")
    source.fake_pixels = (1280, 720, 90)
    comp = tdc.build_component(td.project1, url=url)
    comp.inputConnectors[0].connect(source)
    try:
        td.run_frames(lambda: comp.par["Frames"] is not None, 30)
        for name, value in {"Frames": 17, "Width": 256, "Height": 160, "Outwidth": 320, "Outheight": 192,
                            "Mode": args.mode, "Maxinflight": 3, "Fadeframes": 10}.items():
            setattr(comp.par, name, value)
        comp.par.Active = True
        td.call_times.clear()
        period = 1.0 / args.fps
        start = time.perf_counter()
        next_tick = start
        frame = 0
        captures_before = 0
        own: list[float] = []
        own_cpu: list[float] = []  # the same, CPU time of the main thread: no waiting for a core or the GIL
        while time.perf_counter() - start < args.seconds:
            now = time.perf_counter()
            if next_tick > now:
                time.sleep(next_tick - now)
            next_tick += period
            frame += 1
            if frame % 300 == 0:
                comp.par.Cfg = 3.0 + (frame // 300) % 5  # a value change: the next frame sends it
            if frame % 450 == 0:
                comp.par.Refresh.pulse()
            calls_before = len(td.call_times)
            captures_before = len(td.fake_capture_seconds)
            td.frame()
            capture = sum(td.fake_capture_seconds[captures_before:])
            spent = sum(seconds for _, seconds, _ in td.call_times[calls_before:])
            own.append(max(0.0, spent - capture))
            own_cpu.append(max(0.0, sum(cpu for _, _, cpu in td.call_times[calls_before:]) - capture))
        comp.par.Active = False
    finally:
        pipeline = comp.ext.TDComfyExt.pipeline
        td.exit()
        if pipeline is not None:
            pipeline.wait_closed(5)
        if broker is not None:
            broker.stop()
    info = {row: comp.op("info")[row, 1].val for row in ("frames_done", "last_latency", "last_error")}
    print(f"{frame} frames at {args.fps:.0f} Hz, mode {args.mode}: {info['frames_done']} results, "
          f"last latency {info['last_latency']} s, captures {len(td.fake_capture_seconds)}, "
          f"last error {info['last_error']!r}, thread violations {len(td.thread_violations)}")
    by_name: dict[str, list[float]] = {}
    for name, seconds, _ in td.call_times:
        by_name.setdefault(name, []).append(seconds)
    for name, samples in sorted(by_name.items()):
        print(summary(name + " (with capture)" if name == "onFrameStart" else name, samples, args.target_ms))
    print(summary("saveByteArray (fake)", td.fake_capture_seconds, float("inf")))
    print(summary("own main-thread/frame", own, args.target_ms))
    print(summary("own cpu/frame", own_cpu, args.target_ms))
    print("(wall times include waiting for the GIL and for a core, shared here with the broker, worker and"
          " simulator; 'own cpu' is the main thread's CPU time in the component, capture excluded)")
    worst, worst_cpu = max(own, default=0.0) * 1000, max(own_cpu, default=0.0) * 1000
    print(f"longest main-thread hold by the component per frame, capture excluded: {worst:.3f} ms wall, "
          f"{worst_cpu:.3f} ms CPU (target {args.target_ms} ms)")
    return 0 if int(info["frames_done"]) > 0 and not td.thread_violations else 1


if __name__ == "__main__":
    sys.exit(main())
