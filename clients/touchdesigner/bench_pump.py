"""Benchmark: how long FramePipeline.pump() and submit() hold the calling (TouchDesigner main) thread.

Drives pump() at 60 Hz, like an Execute DAT's onFrameStart, while 1920x1080 frames are submitted
and results downloaded on the pipeline's threads, then prints p50/p99/max per call. Target: at
most 1 ms, so the client costs well under a tenth of a 60 fps frame (16.7 ms).

    # against `tdcomfy up --simulate`, started here on free ports (binary: $TDCOMFY_BIN,
    # $CARGO_TARGET_DIR/debug/tdcomfy or <repo>/target/debug/tdcomfy)
    python3 clients/touchdesigner/bench_pump.py --seconds 20

    # against a broker that is already running
    python3 clients/touchdesigner/bench_pump.py --url http://127.0.0.1:8080 --token SECRET

Standard library only. Not a test: timings depend on the machine; read the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "tests")]

from td_helpers import Broker, png_bytes  # noqa: E402

import touchdesigner_client as tdc  # noqa: E402


def frame_payload(width: int, height: int) -> bytes:
    """A valid PNG about the size of a camera-like 1080p JPEG (a gradient with a noisy band)."""
    return png_bytes(width, height, noise=0.08, level=1)


def summary(name: str, samples_s: list[float], target_ms: float) -> str:
    if not samples_s:
        return f"{name:<22} no samples"
    ms = sorted(s * 1000 for s in samples_s)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    worst = ms[-1]
    verdict = "ok" if worst <= target_ms else ("p99 ok, max over" if p99 <= target_ms else "OVER")
    return f"{name:<22} n={len(ms):<6} p50={p50:7.3f} ms  p99={p99:7.3f} ms  max={worst:7.3f} ms  [{verdict}]"


def time_wait_sockets(port: int) -> int | None:
    """TCP sockets in TIME_WAIT to or from ``port`` (Linux /proc/net/tcp*; None elsewhere).

    Each connection closed in the last minute leaves one; Windows keeps them for up to 4 minutes.
    """
    count = 0
    found = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "06" and port in (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)):
                count += 1
    return count if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running broker; default: start `tdcomfy up --simulate` here")
    parser.add_argument("--token", help="the broker's API token")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to pump (default 20)")
    parser.add_argument("--fps", type=float, default=60.0)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--max-in-flight", type=int, default=2)
    parser.add_argument("--when-busy", choices=("skip", "replace"), default="replace")
    parser.add_argument("--submit", choices=("every-frame", "when-ready"), default="every-frame",
                        help="every-frame: submit() on every tick (stress); when-ready: only when is_ready_for_next()")
    parser.add_argument("--sim-job-time", type=float, default=1.0, help="simulated job seconds when spawning")
    parser.add_argument("--params", default='{"width": 512, "height": 320, "frames": 25}',
                        help="workflow params JSON for each job ('' for the workflow defaults)")
    parser.add_argument("--target-ms", type=float, default=1.0)
    args = parser.parse_args()

    payload = frame_payload(args.width, args.height)
    print(f"frame: {args.width}x{args.height} PNG, {len(payload) / 1e6:.2f} MB")

    broker = None
    url = args.url
    if url is None:
        broker = Broker(Path(tempfile.mkdtemp(prefix="tdcomfy-bench-")), token=args.token,
                        sim_job_time=args.sim_job_time)
        broker.start()
        url = broker.url
        print(f"started {' '.join(broker.args)} at {url}")
    port = int(url.rsplit(":", 1)[1].split("/")[0]) if url.rsplit(":", 1)[1].split("/")[0].isdigit() else 80
    time_wait_before = time_wait_sockets(port)
    params = json.loads(args.params) if args.params else None

    pump_times: list[float] = []
    submit_times: list[float] = []
    cpu_times: list[float] = []  # thread CPU time of pump()+submit(): the work itself, no waiting
    late: list[float] = []
    counts = {"done": 0, "error": 0, "dropped": 0, "submitted": 0}
    downloaded = 0
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tdcomfy-bench-out-") as out:
        pipeline = tdc.FramePipeline(url, token=args.token, output_dir=out, max_in_flight=args.max_in_flight,
                                     when_busy=args.when_busy, keep_results=3, params=params)
        period = 1.0 / args.fps
        start = time.perf_counter()
        next_tick = start
        seed = 0
        try:
            while True:
                now = time.perf_counter()
                if now - start >= args.seconds:
                    break
                if next_tick > now:
                    time.sleep(next_tick - now)
                late.append(max(0.0, time.perf_counter() - next_tick))
                next_tick += period

                cpu0 = time.thread_time()
                t0 = time.perf_counter()
                events = pipeline.pump()
                pump_times.append(time.perf_counter() - t0)
                cpu = time.thread_time() - cpu0
                for event in events:
                    if event.kind in counts:
                        counts[event.kind] += 1
                    if event.kind == "done":
                        downloaded += Path(event.path).stat().st_size if Path(event.path).exists() else 0
                    if event.kind == "error":
                        errors.append(event.message)

                if args.submit == "every-frame" or pipeline.is_ready_for_next():
                    seed += 1
                    cpu0 = time.thread_time()
                    t0 = time.perf_counter()
                    pipeline.submit(payload, seed=seed)
                    submit_times.append(time.perf_counter() - t0)
                    cpu += time.thread_time() - cpu0
                cpu_times.append(cpu)
        finally:
            t0 = time.perf_counter()
            pipeline.close()
            close_s = time.perf_counter() - t0
            pipeline.wait_closed(5)
            time_wait_after = time_wait_sockets(port)
            if broker is not None:
                broker.stop()

    print(f"pumped {len(pump_times)} frames in {args.seconds:.0f} s at {args.fps:.0f} Hz; "
          f"jobs submitted={counts['submitted']} done={counts['done']} errors={counts['error']} "
          f"frames replaced={counts['dropped']}; downloaded {downloaded / 1e6:.2f} MB")
    print(summary("pump()", pump_times, args.target_ms))
    print(summary("submit()", submit_times, args.target_ms))
    print(summary("cpu pump+submit (info)", cpu_times, float("inf")))
    print(summary("tick lateness (info)", late, float("inf")))
    print("(wall times above include waiting for the GIL and for a CPU; 'cpu pump+submit' is the client's own work,"
          " 'tick lateness' how late the 60 Hz loop woke up)")
    print(f"close(): {close_s * 1000:.1f} ms")
    if time_wait_before is not None and time_wait_after is not None:
        print(f"sockets in TIME_WAIT for the broker's port: {time_wait_after - time_wait_before} "
              f"(connections closed during the run)")
    for message in errors[:5]:
        print("error:", message)
    worst = max(pump_times + submit_times, default=0.0) * 1000
    print(f"longest hold of the calling thread: {worst:.3f} ms (target {args.target_ms} ms)")
    return 0 if counts["done"] > 0 and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
