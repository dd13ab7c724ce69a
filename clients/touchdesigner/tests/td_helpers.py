"""Test helpers (stdlib only): PNG writer, MP4 box parser, the real `tdcomfy up --simulate` process,
fake TouchDesigner operators, and event pumping."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import select
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = CLIENT_DIR.parent.parent

# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def png_bytes(width: int, height: int, *, noise: float = 0.0, level: int = 6, seed: int = 1) -> bytes:
    """A valid RGB PNG: a gradient whose first ``noise`` fraction of rows is random noise.

    Noise is incompressible: ``noise=1.0`` gives a file of about width*height*3 bytes (for size
    limits); ``noise≈0.15`` at 1080p gives about the size of a camera-like JPEG.
    """
    rng = random.Random(seed)
    noisy_rows = int(height * float(noise))
    rows = bytearray()
    row_cache: dict[int, bytes] = {}
    for y in range(height):
        if y < noisy_rows:
            rows.append(0)
            rows += rng.randbytes(width * 3)
            continue
        shade = (y * 255) // max(1, height - 1)
        row = row_cache.get(shade)
        if row is None:
            row = bytes([0]) + bytes(c for x in range(width) for c in ((x * 255) // max(1, width - 1), shade, 128))
            row_cache[shade] = row
        rows += row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows), level)) + chunk(
        b"IEND", b""
    )


# ---------------------------------------------------------------------------------------------
# MP4
# ---------------------------------------------------------------------------------------------

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"udta", b"mvex"}


@dataclasses.dataclass
class Box:
    kind: str
    offset: int
    size: int
    payload: bytes
    children: list[Box]

    def find(self, *path: str) -> Box | None:
        node: Box | None = self
        for kind in path:
            node = next((c for c in node.children if c.kind == kind), None) if node else None
        return node

    def find_all(self, kind: str) -> list[Box]:
        return [c for c in self.children if c.kind == kind]


def parse_boxes(data: bytes, start: int = 0, end: int | None = None) -> list[Box]:
    """Parses ISO-BMFF boxes; raises ValueError when sizes do not tile the range exactly."""
    end = len(data) if end is None else end
    boxes = []
    pos = start
    while pos < end:
        if end - pos < 8:
            raise ValueError(f"{end - pos} trailing bytes at {pos}")
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"box {kind!r} at {pos} has size {size}, beyond {end}")
        payload = data[pos + header : pos + size]
        children = parse_boxes(data, pos + header, pos + size) if kind in _CONTAINERS else []
        boxes.append(Box(kind.decode("latin-1"), pos, size, payload, children))
        pos += size
    return boxes


@dataclasses.dataclass
class Mp4Info:
    brand: str
    width: int
    height: int
    sample_count: int
    codec: str
    has_avcc: bool
    mdat_size: int
    duration_s: float | None


def mp4_info(data: bytes) -> Mp4Info:
    """Checks the MP4 structure (ftyp, moov, mdat) and reads the video track's avc1 entry and stsz."""
    top = parse_boxes(data)
    kinds = [b.kind for b in top]
    for needed in ("ftyp", "moov", "mdat"):
        if needed not in kinds:
            raise ValueError(f"no {needed} box (top-level boxes: {kinds})")
    ftyp = next(b for b in top if b.kind == "ftyp")
    moov = next(b for b in top if b.kind == "moov")
    mdat = next(b for b in top if b.kind == "mdat")
    root = Box("root", 0, len(data), b"", [moov])
    video = None
    for trak in root.find("moov").find_all("trak"):
        hdlr = trak.find("mdia", "hdlr")
        if hdlr is not None and hdlr.payload[8:12] == b"vide":
            video = trak
    if video is None:
        raise ValueError("no video track")
    stbl = video.find("mdia", "minf", "stbl")
    stsd = stbl.find("stsd") if stbl else None
    stsz = stbl.find("stsz") if stbl else None
    if stsd is None or stsz is None:
        raise ValueError("video track without stsd/stsz")
    entry_count = struct.unpack(">I", stsd.payload[4:8])[0]
    if entry_count < 1:
        raise ValueError("stsd without sample entries")
    entry = stsd.payload[8:]
    entry_size, codec = struct.unpack(">I4s", entry[:8])
    # VisualSampleEntry: 6 reserved + 2 data_reference_index + 16 pre_defined/reserved, then w, h.
    width, height = struct.unpack(">HH", entry[8 + 24 : 8 + 28])
    # After w/h: resolution (8), reserved (4), frame_count (2), compressor name (32), depth (2),
    # pre_defined (2) = 78 bytes of fixed fields from the start of the entry body; then child boxes.
    children = parse_boxes(entry, 8 + 78, entry_size)
    has_avcc = any(c.kind == "avcC" for c in children)
    sample_size, sample_count = struct.unpack(">II", stsz.payload[4:12])
    mdhd = video.find("mdia", "mdhd")
    duration = None
    if mdhd is not None:
        if mdhd.payload[0] == 1:
            timescale, dur = struct.unpack(">IQ", mdhd.payload[20:32])
        else:
            timescale, dur = struct.unpack(">II", mdhd.payload[12:20])
        duration = dur / timescale if timescale else None
    return Mp4Info(
        brand=ftyp.payload[:4].decode("latin-1"),
        width=width,
        height=height,
        sample_count=sample_count,
        codec=codec.decode("latin-1"),
        has_avcc=has_avcc,
        mdat_size=mdat.size,
        duration_s=duration,
    )


# ---------------------------------------------------------------------------------------------
# The real broker + worker + simulator
# ---------------------------------------------------------------------------------------------


def tdcomfy_binary() -> Path:
    """The `tdcomfy` binary: $TDCOMFY_BIN, $CARGO_TARGET_DIR/debug/tdcomfy, or <repo>/target/debug/tdcomfy."""
    if os.environ.get("TDCOMFY_BIN"):
        return Path(os.environ["TDCOMFY_BIN"])
    if os.environ.get("CARGO_TARGET_DIR"):
        return Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "tdcomfy"
    return REPO_ROOT / "target" / "debug" / "tdcomfy"


def workflows_dir(folder: Path, **extra: dict) -> Path:
    """``folder`` holding the repository's workflows plus ``extra`` (file stem -> API-format graph)."""
    import shutil

    for path in (REPO_ROOT / "workflows").glob("*.json"):
        shutil.copy(path, folder / path.name)
    for name, graph in extra.items():
        (folder / f"{name}.json").write_text(json.dumps(graph))
    return folder


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Broker:
    """`tdcomfy up --simulate` (broker + worker + simulator) in its own process group."""

    def __init__(
        self,
        data_dir: Path,
        *,
        token: str | None = None,
        max_upload_mb: float | None = None,
        sim_job_time: float = 0.5,
        extra_env: dict | None = None,
    ) -> None:
        self.binary = tdcomfy_binary()
        self.data_dir = data_dir
        self.api_port = free_port()
        self.comfy_port = free_port()
        self.token = token
        self.env = {k: v for k, v in os.environ.items() if k not in ("API_TOKEN", "WORKER_TOKEN")}
        self.env.update(
            {
                "API_HOST": "127.0.0.1",
                "API_PORT": str(self.api_port),
                "COMFYUI_HOST": "127.0.0.1",
                "COMFYUI_PORT": str(self.comfy_port),
                "DATA_DIR": str(data_dir),
                "SIM_JOB_TIME": str(sim_job_time),
                "RUST_LOG": os.environ.get("RUST_LOG", "info"),
            }
        )
        if "WORKFLOWS_DIR" not in os.environ and (REPO_ROOT / "workflows").is_dir():
            self.env["WORKFLOWS_DIR"] = str(REPO_ROOT / "workflows")
        if token:
            self.env["API_TOKEN"] = token
        if max_upload_mb is not None:
            self.env["MAX_UPLOAD_MB"] = str(max_upload_mb)
        self.env.update(extra_env or {})
        self.args = [str(self.binary), "up", "--simulate", "--sim-job-time", str(sim_job_time)]
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.env.get("TLS_CERT") else "http"
        return f"{scheme}://127.0.0.1:{self.api_port}"

    def _urlopen(self, url: str, timeout: float):
        # With the broker's own TLS (TLS_CERT), trust the CA that signed its certificate.
        ca = self.env.get("TDCOMFY_TEST_CA")
        context = ssl.create_default_context(cafile=ca) if ca else None
        return urllib.request.urlopen(url, timeout=timeout, context=context)

    def start(self, timeout: float = 60.0) -> Broker:
        if not self.binary.exists():
            raise AssertionError(
                f"tdcomfy binary not found at {self.binary}; build it first (cargo build -p tdcomfy) "
                "or set TDCOMFY_BIN"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_output, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"`{' '.join(self.args)}` exited with {self.proc.returncode}:\n{self.output()}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"broker not healthy within {timeout}s:\n{self.output()}")

    def healthy(self) -> bool:
        try:
            with self._urlopen(self.url + "/health", timeout=1.0) as resp:
                return resp.status == 200 and json.loads(resp.read()).get("status") == "healthy"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def wait_for_worker(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self._urlopen(self.url + "/health", timeout=1.0) as resp:
                    if json.loads(resp.read()).get("workers_connected", 0) >= 1:
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"no worker connected within {timeout}s:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL the whole process tree, like a crash or a power cut."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
        self._close_output()

    def _close_output(self) -> None:
        # The reader sees end-of-file once every process holding the pipe is gone.
        if self._reader is not None:
            self._reader.join(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._signal(signal.SIGKILL)  # children may outlive a dead leader
            self._close_output()
            return
        # A short grace period: the data directory is thrown away anyway, and a graceful stop
        # with a job in flight takes seconds.
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._close_output()

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _read_output(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self.log.append(raw.decode("utf-8", "replace").rstrip())

    def output(self, last: int = 80) -> str:
        return "\n".join(self.log[-last:])


# ---------------------------------------------------------------------------------------------
# Fake TouchDesigner objects
# ---------------------------------------------------------------------------------------------


class FakeTOP:
    """A TOP as far as the client uses it: saveByteArray(suffix, quality=…) -> bytearray."""

    def __init__(self, image: bytes = b"", path: str = "/project1/source_top") -> None:
        self.image = image
        self.path = path
        self.calls: list[tuple[str, dict]] = []

    def saveByteArray(self, filetype=".tiff", **kwargs):  # noqa: N802 - TouchDesigner's name
        self.calls.append((filetype, kwargs))
        return bytearray(self.image)


class FakePar:
    """A pulse parameter."""

    def __init__(self) -> None:
        self.pulses = 0

    def pulse(self) -> None:
        self.pulses += 1


class FakeParCollection:
    def __init__(self, **values) -> None:
        self.__dict__.update(values)


class FakeMovieFileIn(FakeTOP):
    """Movie File In TOP: file/play/cuepulse parameters, preload(), isFullyPreRead, isInvalid."""

    def __init__(self, path: str) -> None:
        super().__init__(path=path)
        self.par = FakeParCollection(file="", play=True, cuepulse=FakePar())
        self.preloads: list[tuple[str, object]] = []
        self.isFullyPreRead = False  # noqa: N815
        self.isInvalid = False  # noqa: N815
        self.isOpen = False  # noqa: N815
        self.isLastFrame = False  # noqa: N815
        self.unloads = 0

    def preload(self, index=None) -> None:
        self.preloads.append((self.par.file, index))
        self.isFullyPreRead = False

    def unload(self, cacheMemory=False) -> None:  # noqa: N803
        self.unloads += 1


class FakeSwitch:
    def __init__(self) -> None:
        self.par = FakeParCollection(index=0)


class FakeTextDAT:
    def __init__(self) -> None:
        self.text = ""


def pump_until(pipeline, predicate, timeout: float = 60.0, collected: list | None = None):
    """Pumps like TouchDesigner does (about 100 times a second) until ``predicate(event)``.

    Returns the matching event; every pumped event is appended to ``collected``.
    """
    collected = [] if collected is None else collected
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in pipeline.pump():
            collected.append(event)
            if predicate(event):
                return event
        time.sleep(0.01)
    raise AssertionError(f"no matching event within {timeout}s; got {[e.message for e in collected]}; "
                         f"stats {pipeline.stats()}")


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout}s")


# ---------------------------------------------------------------------------------------------
# A TLS 1.3 terminator (or plain TCP proxy) in front of the real broker
# ---------------------------------------------------------------------------------------------


def make_self_signed_cert(folder: Path) -> tuple[Path, Path, Path]:
    """(certificate, key, CA certificate) for 127.0.0.1 and localhost, made by the ``openssl`` CLI.

    A test CA signs the server certificate, which says CA:FALSE: rustls (the broker's own TLS)
    refuses a CA certificate as a server's (``CaUsedAsEndEntity``), and OpenSSL's verifier wants a
    CA as the trust anchor. Both TLS servers of the tests serve the same pair.
    """
    ca, ca_key = folder / "test-ca.pem", folder / "test-ca-key.pem"
    cert, key, csr = folder / "broker-cert.pem", folder / "broker-key.pem", folder / "broker.csr"
    ext = folder / "broker.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
        ["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
         "-subj", "/CN=tdcomfy test CA"],
        ["openssl", "req", "-new", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
         "-out", str(cert), "-days", "2", "-extfile", str(ext)],
    ):
        subprocess.run(cmd, check=True, capture_output=True)
    # A full chain, as certificate files usually are (Let's Encrypt's fullchain.pem): `tdcomfy up`
    # pins what TLS_CERT holds for its own worker, and the chain's CA is what anchors it.
    cert.write_text(cert.read_text() + ca.read_text())
    return cert, key, ca


class Proxy:
    """Forwards TCP connections to ``upstream`` (host, port); with ``certfile`` it terminates TLS 1.3.

    Python's ``ssl`` server (OpenSSL) sends TLS 1.3 session tickets right after the handshake, as
    production TLS servers do. Each accepted connection's client port is recorded in ``peers``.
    """

    def __init__(self, upstream: tuple[str, int], certfile: Path | None = None, keyfile: Path | None = None) -> None:
        self.upstream = upstream
        self.context = None
        if certfile is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.minimum_version = ssl.TLSVersion.TLSv1_3
            self.context.load_cert_chain(str(certfile), str(keyfile))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.peers: list[int] = []
        self.handshake_errors: list[str] = []
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="test-proxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.context else 'http'}://127.0.0.1:{self.port}"

    def connections(self) -> int:
        with self._lock:
            return len(self.peers)

    def drop_connections(self) -> None:
        """Closes every open connection (both sides), as an idle timeout would; keeps listening."""
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            try:
                sock.close()
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, address = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.peers.append(address[1])
                self._open.add(client)
            threading.Thread(target=self._serve, args=(client,), name="test-proxy-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.context is not None:
                try:
                    client = self.context.wrap_socket(client, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    self.handshake_errors.append(repr(exc))
                    return
            upstream = socket.create_connection(self.upstream)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open.update((client, upstream))
            self._pipe(client, upstream)
        except (OSError, ValueError):  # ValueError: close() closed a socket under select()
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with self._lock:
                        self._open.discard(sock)
                    try:
                        sock.close()
                    except OSError:
                        pass

    @staticmethod
    def _pipe(client: socket.socket, upstream: socket.socket) -> None:
        # One thread per connection: an SSL object must not be read and written from two threads.
        is_tls = isinstance(client, ssl.SSLSocket)
        while True:
            pending = is_tls and client.pending() > 0
            readable = [client] if pending else select.select([client, upstream], [], [], 5.0)[0]
            if client in readable:
                client.setblocking(False)
                try:
                    data = client.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    data = None  # only TLS records without application data arrived
                finally:
                    client.setblocking(True)
                if data == b"":
                    upstream.shutdown(socket.SHUT_WR)
                    return
                if data:
                    upstream.sendall(data)
            if upstream in readable:
                data = upstream.recv(65536)
                if not data:
                    return
                client.sendall(data)
