"""TouchDesigner client for the tdcomfy job broker (one file, standard library only).

This module owns the Python side of the TouchDesigner -> broker connection:

* ``TDComfyClient``: the blocking HTTP API (``submit_frame``, ``check_job``, ``get_result``,
  ``delete_job``, ``list_jobs``, ``health``, ``is_ready_for_next``) with the names and return shapes
  of the original design, so existing Execute DAT scripts keep working.
* ``FramePipeline``: the non-blocking layer for live use. Uploads, status updates (Server-Sent
  Events with reconnect, falling back to long-polling), downloads and deletes run on background
  threads; TouchDesigner's main thread only calls ``submit()`` and ``pump()``, which never touch
  the network or the disk.
* ``top_to_jpeg_bytes`` / ``top_to_png_bytes``: frame capture from a TOP.
* ``TDComfyError``: the one exception type everything here raises for network and API failures.

Copy this file next to your ``.toe`` (see README.md). It needs Python 3.11 (TouchDesigner 2023 and
2025 builds) and nothing outside the standard library. It never imports ``td``: TouchDesigner
objects are only touched by the functions you call with them, on the thread you call them from.

Quick start (blocking, e.g. from the Textport)::

    from touchdesigner_client import TDComfyClient, top_to_jpeg_bytes
    client = TDComfyClient("http://192.168.1.50:8080", token=None)
    job_id = client.submit_frame(top_to_jpeg_bytes(op('source_top')), prompt="a foggy forest")
    client.check_job(job_id)["status"]          # 'queued' | 'running' | 'done' | 'error' | 'cancelled'

Live use (from an Execute DAT; see examples/execute_dat_pipeline.py)::

    pipeline = FramePipeline("http://192.168.1.50:8080", output_dir=project.folder + "/results")
    pipeline.submit(top_to_jpeg_bytes(op('source_top')), prompt="a foggy forest")  # returns at once
    for event in pipeline.pump():                # every frame, in onFrameStart
        if event.kind == "done":
            op('moviefilein1').par.file = event.path
"""

import collections
import contextlib
import dataclasses
import functools
import http.client
import io
import json
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "AbortSignal",
    "FramePipeline",
    "PipelineEvent",
    "ServerEvent",
    "TDComfyClient",
    "TDComfyError",
    "TDComfyExt",
    "build_component",
    "top_to_jpeg_bytes",
    "top_to_png_bytes",
]

_log = logging.getLogger("tdcomfy")

#: Job statuses after which nothing changes any more.
TERMINAL_STATUSES = ("done", "error", "cancelled")

#: Error codes the client produces itself (the broker's own codes are passed through unchanged).
CLIENT_ERROR_CODES = (
    "connection_error",  # could not connect, connection reset/refused, DNS failure, TLS failure
    "timeout",  # the broker did not answer within the timeout
    "http_error",  # an error status without the broker's JSON error body (e.g. from a proxy)
    "bad_response",  # a success status with a body that is not what the API promises
    "events_unsupported",  # the server does not stream Server-Sent Events on that route
    "job_failed",  # FramePipeline: the job ended with status "error" (message = the job's error)
    "capture_failed",  # top_to_*_bytes: no TOP, or the TOP returned no image
    "io_error",  # writing a downloaded result to disk failed
    "closed",  # the call was interrupted because close() was called
    "internal_error",  # a bug in this module, reported as an event instead of a dead thread
)

_CHUNK = 256 * 1024
# Uploads at least this big ask for "100 Continue" first, so a broker that rejects the request
# (413 too large, 401 no token) answers before megabytes are sent into a closing socket.
_EXPECT_CONTINUE_MIN = 512 * 1024
_EXPECT_CONTINUE_WAIT = 1.0
_MAX_ERROR_BODY = 64 * 1024
# The answers of a broker with RESULT_REDIRECT=presigned (it sends 307).
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# Kept-alive connections: at most this many idle ones per client, each for at most this long
# (below common server/proxy idle timeouts: nginx 75 s, many load balancers 60 s).
_MAX_IDLE = 4
_IDLE_SECONDS = 20.0
# How long a finished one-job event stream may take to end, so its connection can be reused.
_STREAM_END_WAIT = 0.25
# How often the housekeeper retries deleting old result files that are still open in a player.
_TRASH_RETRY_SECONDS = 1.0
_RESULT_EXTENSIONS = {
    "video/mp4": ".mp4",
    "video/quicktime": ".mov",
    "video/webm": ".webm",
    "image/gif": ".gif",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "application/zip": ".zip",
}


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class TDComfyError(Exception):
    """The single exception type for network and API failures.

    Attributes:
        code: the broker's snake_case error code (``payload_too_large``, ``job_not_found``,
            ``unsupported_image``, ``unauthorized`` …) or one of ``CLIENT_ERROR_CODES``
            (``connection_error``, ``timeout`` …) when the broker could not be asked.
        message: a human sentence (the broker's message when it sent one).
        status: the HTTP status, or ``None`` when no response arrived.
        field: the request field the broker blamed, if any.
        limit: the numeric limit the broker named (e.g. the byte limit for 413), if any.
        job_id: the job concerned, when known.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        field: str | None = None,
        limit: float | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.field = field
        self.limit = limit
        self.job_id = job_id

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed later (network trouble, broker restarting)."""
        return self.code in ("connection_error", "timeout") or self.status in (502, 503, 504)

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"TDComfyError(code={self.code!r}, message={self.message!r}, status={self.status!r})"


def _error_from_body(status: int, body: bytes, job_id: str | None = None) -> TDComfyError:
    """Builds the error for a non-2xx response from the broker's ``{"error": {...}}`` body."""
    try:
        err = json.loads(body.decode("utf-8"))["error"]
        code = str(err.get("code") or "http_error")
        message = str(err.get("message") or f"HTTP {status}")
        field = err.get("field")
        limit = err.get("limit")
        return TDComfyError(code, message, status, field, limit, job_id)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        text = body[:300].decode("utf-8", "replace").strip()
        message = f"HTTP {status} without a broker error body" + (f": {text}" if text else "")
        return TDComfyError("http_error", message, status, job_id=job_id)


# ---------------------------------------------------------------------------------------------
# Interrupting blocked calls from another thread
# ---------------------------------------------------------------------------------------------


class AbortSignal:
    """Lets one thread interrupt network calls that another thread is blocked in.

    Pass it as ``abort=`` to a ``TDComfyClient`` call; ``trigger()`` (from any thread) shuts down
    the sockets of every call using it, which then raises ``TDComfyError`` with code ``closed``.
    ``FramePipeline.close()`` uses this so that no background thread outlives it.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[http.client.HTTPConnection] = set()

    def is_set(self) -> bool:
        """True once ``trigger()`` was called."""
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleeps up to ``seconds``; returns early (True) when triggered."""
        return self._event.wait(seconds)

    def trigger(self) -> None:
        """Interrupts every call using this signal now and every later one."""
        self._event.set()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _shutdown_socket(conn.sock)

    def _register(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._connections.add(conn)
        # Checked after adding so a trigger() racing with us cannot miss this connection.
        if self._event.is_set():
            _shutdown_socket(conn.sock)

    def _registered_socket(self, conn: http.client.HTTPConnection) -> None:
        # A socket created after trigger() saw no socket yet must be shut down too.
        if self._event.is_set():
            _shutdown_socket(conn.sock)

    def _unregister(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._connections.discard(conn)


def _shutdown_socket(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        # The plain socket method, not SSLSocket.shutdown: that one also drops the TLS object
        # under a thread that may be reading from it.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------------------------------------
# Server-Sent Events
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServerEvent:
    """One Server-Sent Event: ``event`` name, last ``id`` and ``data`` (parsed JSON when it is JSON)."""

    event: str
    id: str | None
    data: Any


class _SSEParser:
    """Incremental parser for the ``text/event-stream`` format (lines in, events out)."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self.last_id: str | None = None

    def feed(self, line: str) -> ServerEvent | None:
        """Feeds one line (with or without its line ending); returns an event when one completes."""
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = None
                return None
            text = "\n".join(self._data)
            name = self._event or "message"
            self._data = []
            self._event = None
            try:
                data: Any = json.loads(text)
            except ValueError:
                data = text
            return ServerEvent(name, self.last_id, data)
        if line.startswith(":"):
            return None  # keep-alive comment
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None


# ---------------------------------------------------------------------------------------------
# Blocking client
# ---------------------------------------------------------------------------------------------


def _image_type(data: bytes | bytearray | memoryview) -> tuple[str, str]:
    """(content type, file name) for an image judged by its first bytes, like the broker does."""
    head = bytes(data[:12])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png", "frame.png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg", "frame.jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp", "frame.webp"
    return "application/octet-stream", "frame.bin"


def _check_image_arg(image_bytes: Any) -> None:
    if hasattr(image_bytes, "saveByteArray"):
        raise TypeError(
            "submit_frame() takes image bytes, not a TOP: use top_to_jpeg_bytes(top) or top_to_png_bytes(top)"
        )
    if not isinstance(image_bytes, (bytes, bytearray, memoryview)):
        raise TypeError(f"image_bytes must be bytes, bytearray or memoryview, not {type(image_bytes).__name__}")


def _multipart(fields: list[tuple[str, str]], image: bytes | bytearray | memoryview) -> tuple[str, list[Any]]:
    """Builds a multipart/form-data body as a list of parts, so the image is never copied."""
    boundary = "tdcomfy-" + uuid.uuid4().hex
    head = bytearray()
    for name, value in fields:
        head += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        head += value.encode("utf-8") + b"\r\n"
    content_type, filename = _image_type(image)
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", [bytes(head), image, tail]


def _readable(sock: socket.socket, timeout: float = 0.0) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


def _await_continue(sock: socket.socket, wait: float) -> str:
    """After sending headers with ``Expect: 100-continue``: 'continue', 'final' or 'timeout'.

    Consumes an interim ``100 Continue`` response; leaves a final response in the socket for
    ``http.client`` to read. Uses MSG_PEEK, so only for plain (non-TLS) sockets.
    """
    deadline = time.monotonic() + wait
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not _readable(sock, remaining):
            return "timeout"
        peeked = sock.recv(4096, socket.MSG_PEEK)
        if not peeked:
            return "final"  # closed: let getresponse() report it
        if len(peeked) >= 12 and peeked[9:10] != b"1":
            return "final"
        end = peeked.find(b"\r\n\r\n")
        if end >= 0:
            if peeked[9:12] != b"100":
                return "final"  # another 1xx: leave it to http.client, which skips them
            to_consume = end + 4
            while to_consume > 0:
                got = sock.recv(to_consume)
                if not got:
                    return "final"
                to_consume -= len(got)
            return "continue"
        # Part of the status line arrived; the rest is a moment away.
        time.sleep(0.002)


def _send_body(
    sock: socket.socket, parts: list[Any], expect_continue: bool
) -> tuple[OSError | None, bytes, bool]:
    """Sends the body in chunks, stopping early when the server already answered.

    Returns ``(send error, early bytes, whole body sent)``. The send error is returned, not
    raised: a server that rejects an upload (413) may close the connection while we are still
    sending, and its response is then still waiting in our receive buffer. Early bytes are
    response bytes a TLS socket had to consume to see them; the response is read with them in
    front (``_PrefixedResponse``).
    """
    tls = isinstance(sock, ssl.SSLSocket)
    if expect_continue and _await_continue(sock, _EXPECT_CONTINUE_WAIT) == "final":
        return None, b"", False
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            for offset in range(0, len(view), _CHUNK):
                if tls:
                    # A readable TLS socket may only hold TLS records (the session tickets a
                    # TLS 1.3 server sends after the handshake): only application data is an answer.
                    early = _early_tls_data(sock)
                    if early is not None:
                        return None, early, False
                # A late "100 Continue" is consumed; anything else readable is an early final
                # answer (an error): stop sending and let http.client read it.
                elif _readable(sock) and _await_continue(sock, _EXPECT_CONTINUE_WAIT) != "continue":
                    return None, b"", False
                sock.sendall(view[offset : offset + _CHUNK])
    except OSError as exc:
        return exc, b"", False
    return None, b"", True


def _early_tls_data(sock: ssl.SSLSocket) -> bytes | None:
    """Response bytes that arrived on a TLS socket while sending, or None when there are none.

    Reads without blocking: ``SSLWantReadError`` means the readable bytes were TLS records without
    application data (session tickets, key updates), which OpenSSL has now processed. ``b""``
    means the server closed the connection.
    """
    if not sock.pending() and not _readable(sock):
        return None
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return sock.recv(_CHUNK)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return None
    finally:
        sock.settimeout(timeout)


class _PrefixedRaw(io.RawIOBase):
    """A socket reader that first returns bytes already taken from the socket."""

    def __init__(self, prefix: bytes, raw: Any) -> None:
        super().__init__()
        self._prefix = memoryview(prefix)
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _PrefixedResponse(http.client.HTTPResponse):
    """An HTTP response whose first bytes were read from the socket before ``getresponse()``."""

    def __init__(self, sock: socket.socket, *args: Any, prefix: bytes = b"", **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the reader makefile() made; replaced by one that starts with the prefix
        self.fp = io.BufferedReader(_PrefixedRaw(prefix, sock.makefile("rb", buffering=0)))


class TDComfyClient:
    """Blocking client for the broker's HTTP API.

    Every method except ``is_ready_for_next()`` does network I/O on the calling thread and can
    take up to ``timeout`` seconds per socket operation. In TouchDesigner, call them from the
    Textport, from a pulse you accept to stall, or from your own thread; for per-frame use take
    ``FramePipeline``, which runs them on background threads.

    Args:
        url: the broker, e.g. ``"http://192.168.1.50:8080"`` (``https://`` works; a path prefix
            such as ``https://host/tdcomfy`` is kept; ``host:port`` means ``http://host:port``).
        token: the broker's ``API_TOKEN`` (sent as ``Authorization: Bearer …``), or None.
        timeout: seconds allowed for connecting and for each read/write on the socket.
        verify_tls: check the server certificate for https (default True; uses ``certifi`` when
            it is installed, as in TouchDesigner, otherwise the system store).
        ca_file: a PEM file of certificates to trust for https instead, e.g. the certificate of a
            broker with a self-signed one (``verify_tls`` stays on).

    Errors: every failure raises ``TDComfyError``.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 10.0,
        verify_tls: bool = True,
        *,
        ca_file: str | None = None,
    ) -> None:
        if "://" not in url:
            url = "http://" + url
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self.token = token or None
        self.timeout = float(timeout)
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port or (443 if self._https else 80)
        self._base_path = parsed.path.rstrip("/")
        self.verify_tls = bool(verify_tls)
        self.ca_file = ca_file
        # Made at the first HTTPS connection, on whichever thread makes it: loading the CA bundle
        # takes tens of milliseconds, which TouchDesigner's main thread must not pay.
        self._ssl_context: ssl.SSLContext | None = None
        self._ssl_lock = threading.Lock()
        #: The job of the last successful ``submit_frame``; ``check_job()`` & co. default to it.
        self.current_job_id: str | None = None
        #: The broker's answer to the last successful ``submit_frame`` (queue_position, workflow…).
        self.last_submit: dict | None = None
        self._status_cache: collections.OrderedDict[str, tuple[str, int | None]] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._abort = AbortSignal()
        # Idle keep-alive connections (connection, idle since), shared by every thread using
        # this client: one at a time each. Reuse spares a TCP (and TLS) handshake per request
        # and the TIME_WAIT socket each closed connection leaves behind (minutes on Windows).
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []
        self._idle_lock = threading.Lock()
        self._refresher: threading.Thread | None = None
        self._refresh_wake = threading.Event()
        self._closed = False

    # -- the design's API ----------------------------------------------------------------------

    def submit_frame(
        self,
        image_bytes: bytes | bytearray | memoryview,
        prompt: str = "",
        negative_prompt: str = "",
        seed: int | None = None,
        workflow: str | None = None,
        params: dict | str | None = None,
        *,
        stream: str | None = None,
        mode: str | None = None,
        preempt: bool = False,
        dedupe: bool = False,
        previews: bool = False,
        idempotency_key: str | None = None,
        abort: AbortSignal | None = None,
    ) -> str:
        """Uploads one frame and returns the new job's id.

        ``image_bytes`` is a PNG, JPEG or WebP file in memory (see ``top_to_jpeg_bytes``).
        ``negative_prompt``, ``seed``, ``workflow`` and ``params`` are only sent when given;
        ``params`` is a dict of named workflow inputs (see ``workflows()``).

        Live use: ``stream`` names this source (1 to 128 visible ASCII characters, e.g. one per
        TD component); jobs of one stream start in order, and streams share the GPUs in turns.
        ``mode="latest"`` (needs ``stream``) cancels the stream's jobs that have not started
        (``cancel_reason: "superseded"``); ``preempt=True`` also cancels its running one.
        ``dedupe=True`` (needs ``stream``) answers an unchanged frame with unchanged settings at
        once with the stream's last result (the answer's ``status`` is ``done`` and
        ``reused_from`` names that job; see ``last_submit``).
        These are only sent when given, so older brokers see the request they know.

        The request carries an ``Idempotency-Key`` (``idempotency_key`` or a fresh random one);
        on a connection error or timeout it is retried once with the same key, so the broker
        never makes two jobs from one call. ``previews=True`` asks for preview images while the
        job runs (``preview`` events on its stream, ``get_preview()``).
        """
        _check_image_arg(image_bytes)
        fields = [("prompt", prompt or "")]
        if negative_prompt:
            fields.append(("negative_prompt", negative_prompt))
        if seed is not None:
            fields.append(("seed", str(seed)))
        if workflow:
            fields.append(("workflow", workflow))
        if params is not None:
            fields.append(("params", params if isinstance(params, str) else json.dumps(params)))
        if stream:
            fields.append(("stream", str(stream)))
        if mode:
            fields.append(("mode", str(mode)))
        for name, flag in (("preempt", preempt), ("dedupe", dedupe), ("previews", previews)):
            if flag:
                fields.append((name, "true"))
        content_type, parts = _multipart(fields, image_bytes)
        headers = {"Content-Type": content_type, "Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        for attempt in (1, 2):
            try:
                _, _, body = self._request("POST", "/jobs", body=parts, headers=headers, abort=abort)
                break
            except TDComfyError as exc:
                if attempt == 2 or exc.code not in ("connection_error", "timeout"):
                    raise
                _log.info("submit failed (%s); retrying once with the same Idempotency-Key", exc)
                if (abort or self._abort).wait(0.2):
                    raise TDComfyError("closed", "submit interrupted by close()") from exc
        answer = _json_object(body, "POST /jobs")
        job_id = answer.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise TDComfyError("bad_response", f"POST /jobs answered without a job_id: {answer!r}")
        self.current_job_id = job_id
        self.last_submit = answer
        self._remember(job_id, str(answer.get("status") or "queued"), None)
        self._refresh_wake.set()
        return job_id

    def check_job(
        self,
        job_id: str | None = None,
        wait: float | None = None,
        since: int | None = None,
        *,
        abort: AbortSignal | None = None,
    ) -> dict:
        """Returns the broker's job JSON (``status``, ``progress``, ``error_message`` …).

        With ``wait`` (seconds, at most 60) the broker holds the request until the job changes
        (its ``version`` exceeds ``since``) or ``wait`` passes: a long-poll.
        """
        job_id = self._job(job_id)
        query = {}
        if wait is not None:
            query["wait"] = _fmt_seconds(wait)
        if since is not None:
            query["since"] = str(int(since))
        read_timeout = self.timeout + (float(wait) if wait else 0.0)
        _, _, body = self._request(
            "GET", f"/jobs/{_quote(job_id)}", query=query, read_timeout=read_timeout, abort=abort, job_id=job_id
        )
        job = _json_object(body, "GET /jobs/{id}")
        if isinstance(job.get("status"), str):
            self._remember(job_id, job["status"], job.get("version"))
        return job

    def get_result(self, job_id: str | None = None, *, abort: AbortSignal | None = None) -> bytes:
        """Downloads the finished job's result (an MP4 for the default workflow) into memory."""
        job_id = self._job(job_id)
        _, _, body = self._request("GET", f"/jobs/{_quote(job_id)}/result", abort=abort, job_id=job_id)
        return body

    def delete_job(self, job_id: str | None = None, *, abort: AbortSignal | None = None) -> dict:
        """Cancels a queued/running job or deletes a finished job's files; returns the broker's answer.

        The answer (``{"job_id", "status", "message"}``) is truthy, so ``if client.delete_job(j):``
        from older scripts keeps working. Repeating it is harmless; an unknown id raises
        ``TDComfyError`` with status 404 and code ``job_not_found``.
        """
        job_id = self._job(job_id)
        _, _, body = self._request("DELETE", f"/jobs/{_quote(job_id)}", abort=abort, job_id=job_id)
        answer = _json_object(body, "DELETE /jobs/{id}")
        self._remember(job_id, "cancelled", None)
        if job_id == self.current_job_id:
            self.current_job_id = None
        return answer

    def list_jobs(self, status: str | None = None, limit: int = 50, *, abort: AbortSignal | None = None) -> list[dict]:
        """Lists jobs, newest first, as a list of job dicts (``status`` filters, ``limit`` ≤ 500)."""
        query = {"limit": str(int(limit))}
        if status:
            query["status"] = status
        _, _, body = self._request("GET", "/jobs", query=query, abort=abort)
        answer = _json_object(body, "GET /jobs")
        jobs = answer.get("jobs")
        if not isinstance(jobs, list):
            raise TDComfyError("bad_response", "GET /jobs answered without a jobs list")
        return jobs

    def health(self, *, abort: AbortSignal | None = None) -> dict:
        """The broker's ``GET /health`` (queue counts, connected workers). Needs no token."""
        _, _, body = self._request("GET", "/health", abort=abort)
        return _json_object(body, "GET /health")

    def health_check(self) -> dict:
        """Same as ``health()``; the name older scripts use."""
        return self.health()

    def is_ready_for_next(self) -> bool:
        """True when there is no current job or it has finished — without any network I/O.

        Answers from cached state. The first call while a job is pending starts one daemon thread
        that long-polls the current job and keeps the cache current (stopped by ``close()``), so
        calling this every frame costs microseconds. ``check_job()`` also refreshes the cache.
        """
        job_id = self.current_job_id
        if job_id is None:
            return True
        with self._cache_lock:
            cached = self._status_cache.get(job_id)
        if cached is not None and cached[0] in TERMINAL_STATUSES + ("gone",):
            return True
        self._ensure_refresher()
        return False

    # -- extras --------------------------------------------------------------------------------

    def cancel_job(self, job_id: str | None = None, *, abort: AbortSignal | None = None) -> dict:
        """``POST /jobs/{id}/cancel``: the same as ``delete_job``."""
        job_id = self._job(job_id)
        _, _, body = self._request("POST", f"/jobs/{_quote(job_id)}/cancel", abort=abort, job_id=job_id)
        self._remember(job_id, "cancelled", None)
        return _json_object(body, "POST /jobs/{id}/cancel")

    def workflows(self, *, abort: AbortSignal | None = None) -> dict:
        """``GET /workflows``: the workflow names and the parameters each one accepts."""
        _, _, body = self._request("GET", "/workflows", abort=abort)
        return _json_object(body, "GET /workflows")

    def get_preview(
        self, job_id: str | None = None, *, etag: str | None = None, abort: AbortSignal | None = None
    ) -> tuple[bytes, str, int, str] | None:
        """The running job's latest preview image: ``(bytes, content_type, seq, etag)``.

        None when the job has no preview now (none yet, submitted without previews, or no longer
        running) or, with ``etag``, when the copy the caller has is still the latest. A preview is
        at most 2 MiB, so it is read whole. Blocking: use it on your own thread.
        """
        job_id = self._job(job_id)
        headers = {"Accept": "image/*"}
        if etag:
            headers["If-None-Match"] = etag
        try:
            status, answer, body = self._request(
                "GET", f"/jobs/{_quote(job_id)}/preview", headers=headers, abort=abort, job_id=job_id
            )
        except TDComfyError as exc:
            if exc.code == "no_preview":
                return None
            raise
        if status == 304:
            return None
        content_type = str(answer.get("Content-Type") or "application/octet-stream").split(";")[0].strip()
        try:
            seq = int(answer.get("Preview-Seq") or 0)
        except ValueError:
            seq = 0
        return body, content_type, seq, str(answer.get("ETag") or "")

    def download_result(self, job_id: str, path: str, *, abort: AbortSignal | None = None) -> str:
        """Streams the result to ``path`` safely and returns ``path``.

        Data goes to ``path + ".part"`` first and is renamed with ``os.replace`` only when
        complete, so a Movie File In TOP never sees a half-written file. After an interrupted
        download, calling again resumes from the ``.part`` file with an HTTP Range request.
        A broker with ``RESULT_REDIRECT=presigned`` answers with a redirect to its object store:
        the result is then read from there, with the same Range and without this client's token.
        """
        part = path + ".part"
        try:
            offset = os.path.getsize(part)
        except OSError:
            offset = 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        conn, resp = self._request(
            "GET", f"/jobs/{_quote(job_id)}/result", headers=headers, stream=True, abort=abort,
            job_id=job_id, ok_statuses=(416,),
        )
        pooled = True
        if resp.status in _REDIRECT_STATUSES:
            location = resp.getheader("Location") or ""
            try:
                resp.read(_MAX_ERROR_BODY)
            except Exception:  # noqa: BLE001 - the broker's connection is just not reused then
                pass
            self._finish(conn, abort, reuse=_reusable(resp))
            conn, resp = self._get_redirected(location, headers, abort, job_id)
            # A connection to the store, not the broker: closed after, never pooled.
            pooled = False
        reuse = False
        try:
            if resp.status == 416:
                # The .part file is no prefix of the result (a stale leftover): start over.
                _remove_quietly(part)
                resp.read()
                return self.download_result(job_id, path, abort=abort)
            mode = "ab" if resp.status == 206 and offset else "wb"
            expected = _expected_total(resp, offset if mode == "ab" else 0)
            try:
                with open(part, mode) as out:
                    while True:
                        try:
                            chunk = resp.read(_CHUNK)
                        except Exception as exc:  # noqa: BLE001 - mapped to TDComfyError below
                            raise self._wrap_error(exc, abort, "GET result") from exc
                        if not chunk:
                            break
                        out.write(chunk)
                    written = out.tell()
            except OSError as exc:
                raise TDComfyError("io_error", f"cannot write {part}: {exc}", job_id=job_id) from exc
            if expected is not None and written != expected:
                raise TDComfyError(
                    "connection_error", f"result download ended after {written} of {expected} bytes", job_id=job_id
                )
            reuse = pooled and _reusable(resp)
            try:
                os.replace(part, path)
            except OSError as exc:
                raise TDComfyError("io_error", f"cannot move {part} to {path}: {exc}", job_id=job_id) from exc
            return path
        finally:
            self._finish(conn, abort, reuse=reuse)

    def iter_events(
        self,
        job_id: str | None = None,
        *,
        last_event_id: str | None = None,
        read_timeout: float = 45.0,
        abort: AbortSignal | None = None,
    ) -> Iterator[ServerEvent]:
        """Yields the broker's Server-Sent Events: all jobs (``/events``) or one (``/jobs/{id}/events``).

        The one-job stream starts with a ``snapshot`` event and ends after a terminal status.
        A silent connection raises ``TDComfyError('timeout')`` after ``read_timeout`` seconds
        (the broker sends a keep-alive comment every 15 s). Blocking: use it on your own thread.
        """
        path = "/events" if job_id is None else f"/jobs/{_quote(job_id)}/events"
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        conn, resp = self._request(
            "GET", path, headers=headers, stream=True, read_timeout=read_timeout, abort=abort, job_id=job_id
        )
        terminal_seen = False
        try:
            content_type = resp.getheader("Content-Type") or ""
            if "text/event-stream" not in content_type:
                raise TDComfyError(
                    "events_unsupported", f"{path} answered {content_type or 'no content type'}, not an event stream",
                    resp.status, job_id=job_id,
                )
            parser = _SSEParser()
            pending = b""
            while True:
                try:
                    raw = resp.readline(_CHUNK)
                except Exception as exc:  # noqa: BLE001 - mapped to TDComfyError
                    raise self._wrap_error(exc, abort, f"GET {path}") from exc
                if not raw:
                    return  # the server ended the stream
                if not raw.endswith(b"\n"):
                    pending += raw  # a line longer than the read limit
                    continue
                line, pending = (pending + raw).decode("utf-8", "replace"), b""
                event = parser.feed(line)
                if event is not None:
                    if job_id is not None and _is_terminal_event(event):
                        terminal_seen = True
                    yield event
        finally:
            # The one-job stream ends right after the final status: when the caller stops there,
            # read that end (briefly) so the connection can be kept alive instead of closed.
            reuse = False
            try:
                if terminal_seen and not resp.isclosed() and conn.sock is not None:
                    deadline = time.monotonic() + _STREAM_END_WAIT
                    drained = 0
                    while drained <= _MAX_ERROR_BODY and time.monotonic() < deadline:
                        conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
                        chunk = resp.read(_CHUNK)
                        if not chunk:
                            break
                        drained += len(chunk)
                reuse = _reusable(resp)
            except Exception:  # noqa: BLE001 - no end in time (or a broken stream): just close it
                reuse = False
            self._finish(conn, abort, reuse=reuse)

    def close(self) -> None:
        """Stops the ``is_ready_for_next`` refresh thread, without waiting for it. Safe to call twice.

        Calls in progress are interrupted (``TDComfyError('closed')``). ``wait_closed()`` waits
        until the thread is gone.
        """
        self._closed = True
        self._abort.trigger()
        self._refresh_wake.set()
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            _close_quietly(conn)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """After ``close()``: waits up to ``timeout`` seconds for the refresh thread; True when it is gone."""
        thread = self._refresher
        if thread is not None and thread.ident is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return self._closed

    def __enter__(self) -> "TDComfyClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TDComfyClient({self.url!r}, token={'***' if self.token else None})"

    # -- internals -----------------------------------------------------------------------------

    def _job(self, job_id: str | None) -> str:
        job_id = job_id or self.current_job_id
        if not job_id:
            raise ValueError("no job id given and no job submitted yet")
        return str(job_id)

    def _remember(self, job_id: str, status: str, version: Any) -> None:
        with self._cache_lock:
            self._status_cache[job_id] = (status, version if isinstance(version, int) else None)
            self._status_cache.move_to_end(job_id)
            while len(self._status_cache) > 256:
                self._status_cache.popitem(last=False)

    def _ensure_refresher(self) -> None:
        if self._closed:
            return
        if self._refresher is None or not self._refresher.is_alive():
            self._refresher = threading.Thread(target=self._refresh_loop, name="tdcomfy-ready-refresh", daemon=True)
            self._refresher.start()
        self._refresh_wake.set()

    def _refresh_loop(self) -> None:
        failures = 0
        while not self._closed:
            job_id = self.current_job_id
            with self._cache_lock:
                cached = self._status_cache.get(job_id) if job_id else None
            if job_id is None or (cached is not None and cached[0] in TERMINAL_STATUSES + ("gone",)):
                self._refresh_wake.wait(1.0)
                self._refresh_wake.clear()
                continue
            version = cached[1] if cached else None
            try:
                job = self.check_job(job_id, wait=10 if version is not None else None, since=version, abort=self._abort)
                failures = 0
                if not isinstance(job.get("version"), int):
                    self._abort.wait(1.0)  # no version, no long-poll: do not hammer the broker
            except TDComfyError as exc:
                if self._closed:
                    return
                if exc.code == "job_not_found":
                    self._remember(job_id, "gone", None)
                else:
                    failures += 1
                    self._abort.wait(min(5.0, 0.25 * 2**failures))

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            with self._ssl_lock:
                if self._ssl_context is None:
                    self._ssl_context = _make_ssl_context(self.verify_tls, self.ca_file)
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl_context)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _checkout(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection that is still open, else a new (unconnected) one; and whether reused."""
        while True:
            with self._idle_lock:
                if not self._idle:
                    break
                conn, since = self._idle.pop()
            if time.monotonic() - since <= _IDLE_SECONDS and _still_open(conn.sock):
                return conn, True
            _close_quietly(conn)
        return self._connection(self.timeout), False

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        if conn.sock is not None:
            with self._idle_lock:
                # Checked under the lock: close() sets _closed before it empties the pool.
                if not self._closed and len(self._idle) < _MAX_IDLE:
                    self._idle.append((conn, time.monotonic()))
                    return
        _close_quietly(conn)

    def _get_redirected(
        self, location: str, headers: dict, abort: AbortSignal | None, job_id: str
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """GETs a result where the broker sent it (``RESULT_REDIRECT=presigned``: a short-lived
        presigned URL of the object store). Only ``Range`` goes along: the URL itself is the
        permission, this client's ``Authorization`` is for the broker alone (S3 refuses a request
        with two credentials). Certificates are checked against the system's roots."""
        abort = abort or self._abort
        url = urllib.parse.urljoin(self.url + "/", location)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TDComfyError("bad_response", f"GET result: the broker redirected to {location!r}", job_id=job_id)
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port or 443, timeout=self.timeout, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        what = f"GET result from {parts.hostname}"
        abort._register(conn)
        try:
            if abort.is_set():
                raise TDComfyError("closed", f"{what} not sent: closed")
            conn.connect()
            abort._registered_socket(conn)
            conn.putrequest("GET", target, skip_accept_encoding=True)
            conn.putheader("User-Agent", f"tdcomfy-touchdesigner/{__version__}")
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            resp = conn.getresponse()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a TDComfyError
            self._finish(conn, abort)
            raise self._wrap_error(exc, abort, what) from exc
        if resp.status >= 300 and resp.status != 416:
            try:
                data = resp.read(_MAX_ERROR_BODY)
            except Exception:  # noqa: BLE001 - the status alone is still worth reporting
                data = b""
            self._finish(conn, abort)
            raise TDComfyError(
                "http_error", f"{what} answered {resp.status}: {data[:200].decode('utf-8', 'replace')}",
                resp.status, job_id=job_id,
            )
        return conn, resp

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: dict | None = None,
        body: list[Any] | None = None,
        headers: dict | None = None,
        read_timeout: float | None = None,
        stream: bool = False,
        abort: AbortSignal | None = None,
        job_id: str | None = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> Any:
        """One HTTP exchange. Returns (status, headers, body), or (conn, response) with ``stream``.

        Raises TDComfyError for every failure, including non-2xx statuses (except ``ok_statuses``).
        Uses a kept-alive connection when one is idle; when that one turns out to be closed by
        the server (before any answer), the request is sent once more on a new connection.
        """
        abort = abort or self._abort
        target = self._base_path + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        what = f"{method} {path}"
        while True:
            conn, reused = self._checkout()
            abort._register(conn)
            keep_open = False
            reusable = False
            try:
                send_error: OSError | None = None
                complete = True
                try:
                    if abort.is_set():
                        raise TDComfyError("closed", f"{what} not sent: closed")
                    if not reused:
                        conn.connect()
                        abort._registered_socket(conn)
                    conn.sock.settimeout(read_timeout if read_timeout is not None else self.timeout)
                    conn.putrequest(method, target, skip_accept_encoding=True)
                    all_headers = {"User-Agent": f"tdcomfy-touchdesigner/{__version__}", "Accept": "application/json"}
                    if self.token:
                        all_headers["Authorization"] = f"Bearer {self.token}"
                    all_headers.update(headers or {})
                    expect = False
                    if body is not None:
                        size = sum(memoryview(p).nbytes for p in body)
                        all_headers["Content-Length"] = str(size)
                        expect = size >= _EXPECT_CONTINUE_MIN and not self._https
                        if expect:
                            all_headers["Expect"] = "100-continue"
                    for name, value in all_headers.items():
                        conn.putheader(name, value)
                    conn.endheaders()
                    if body is not None:
                        send_error, early, complete = _send_body(conn.sock, body, expect)
                        if early:
                            conn.response_class = functools.partial(_PrefixedResponse, prefix=early)
                    resp = conn.getresponse()
                except Exception as exc:  # noqa: BLE001 - every failure becomes a TDComfyError
                    if reused and not abort.is_set() and _closed_by_server(send_error or exc):
                        _log.debug("%s: kept-alive connection was closed by the server; reconnecting", what)
                        continue  # the finally closes the stale connection
                    # A failed send is the better explanation than the failed read that followed it.
                    raise self._wrap_error(send_error or exc, abort, what) from exc
                if resp.status >= 400 and resp.status not in ok_statuses:
                    try:
                        data = resp.read(_MAX_ERROR_BODY)
                    except Exception:  # noqa: BLE001 - the status alone is still worth reporting
                        data = b""
                    reusable = complete and _reusable(resp)
                    raise _error_from_body(resp.status, data, job_id)
                if stream:
                    keep_open = True
                    return conn, resp
                try:
                    data = resp.read()
                except Exception as exc:  # noqa: BLE001
                    raise self._wrap_error(exc, abort, what) from exc
                reusable = complete and _reusable(resp)
                return resp.status, resp.headers, data
            finally:
                if not keep_open:
                    self._finish(conn, abort, reuse=reusable)

    def _finish(self, conn: http.client.HTTPConnection, abort: AbortSignal | None, reuse: bool = False) -> None:
        (abort or self._abort)._unregister(conn)
        if reuse and not (abort or self._abort).is_set():
            self._checkin(conn)
        else:
            _close_quietly(conn)

    def _wrap_error(self, exc: BaseException, abort: AbortSignal | None, what: str) -> TDComfyError:
        if isinstance(exc, TDComfyError):
            return exc
        if (abort or self._abort).is_set():
            return TDComfyError("closed", f"{what} interrupted by close()")
        if isinstance(exc, TimeoutError):
            return TDComfyError("timeout", f"{what}: no answer from {self.url} within the timeout")
        if isinstance(exc, http.client.IncompleteRead):
            return TDComfyError("connection_error", f"{what}: the connection to {self.url} ended early")
        if isinstance(exc, (OSError, http.client.HTTPException, ValueError)):
            return TDComfyError("connection_error", f"{what}: cannot reach the broker at {self.url} ({exc})")
        return TDComfyError("connection_error", f"{what}: {exc!r}")


def _is_terminal_event(event: ServerEvent) -> bool:
    job = event.data.get("job") if isinstance(event.data, dict) else None
    return isinstance(job, dict) and job.get("status") in TERMINAL_STATUSES


def _close_quietly(conn: http.client.HTTPConnection) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
        pass


def _reusable(resp: http.client.HTTPResponse) -> bool:
    """True when the response was read to its end and the server keeps the connection open."""
    return resp.isclosed() and not resp.will_close


def _still_open(sock: socket.socket | None) -> bool:
    """True when an idle kept-alive connection is still usable (nothing unexpected to read)."""
    if sock is None:
        return False
    try:
        if isinstance(sock, ssl.SSLSocket):
            # TLS records without application data (session tickets) leave it usable.
            return _early_tls_data(sock) is None
        return not _readable(sock)  # readable while idle: closed by the server (or garbage)
    except (OSError, ValueError):
        return False


def _closed_by_server(exc: BaseException) -> bool:
    """True for the failures a kept-alive connection the server already closed produces."""
    return isinstance(
        exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
              ssl.SSLEOFError, ssl.SSLZeroReturnError)
    )


def _make_ssl_context(verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    if verify and ca_file:
        return ssl.create_default_context(cafile=ca_file)
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        import certifi  # bundled with TouchDesigner; optional elsewhere

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()


def _quote(job_id: str) -> str:
    return urllib.parse.quote(str(job_id), safe="")


def _fmt_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{float(seconds):.3f}"


def _json_object(body: bytes, what: str) -> dict:
    try:
        value = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TDComfyError("bad_response", f"{what} answered something that is not JSON") from exc
    if not isinstance(value, dict):
        raise TDComfyError("bad_response", f"{what} answered {type(value).__name__}, not a JSON object")
    return value


def _expected_total(resp: http.client.HTTPResponse, offset: int) -> int | None:
    length = resp.getheader("Content-Length")
    try:
        return offset + int(length) if length is not None else None
    except ValueError:
        return None


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Frame capture
# ---------------------------------------------------------------------------------------------


def top_to_png_bytes(top: Any) -> bytes:
    """Encodes a TOP as PNG in memory (``top.saveByteArray('.png')``); main thread only.

    Lossless but slow: a 1080p frame can take hundreds of milliseconds. Prefer
    ``top_to_jpeg_bytes`` and scale the TOP down to the generation size first.
    """
    return _capture(top, ".png")


def top_to_jpeg_bytes(top: Any, quality: float = 0.9) -> bytes:
    """Encodes a TOP as JPEG in memory (``top.saveByteArray('.jpg', quality=…)``); main thread only.

    ``quality`` is TouchDesigner's 0..1 scale; values above 1 are read as percent (90 → 0.9).
    Typically 30–100× cheaper than PNG.
    """
    q = float(quality)
    if q > 1.0:
        q /= 100.0
    q = min(1.0, max(0.0, q))
    return _capture(top, ".jpg", quality=q)


def _capture(top: Any, suffix: str, **options: Any) -> bytes:
    if top is None:
        raise TDComfyError("capture_failed", "no TOP given (did op('…') find nothing?)")
    save = getattr(top, "saveByteArray", None)
    if save is None:
        raise TDComfyError("capture_failed", f"{top!r} is not a TOP: it has no saveByteArray()")
    data = save(suffix, **options)
    if not data:
        raise TDComfyError("capture_failed", f"{getattr(top, 'path', top)!r} returned no image data")
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# Non-blocking pipeline
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PipelineEvent:
    """Something that happened to a submitted frame, handed out by ``FramePipeline.pump()``.

    Attributes:
        kind: ``submitted`` (the broker made a job; ``job_id`` set), ``started`` (a worker began),
            ``progress`` (``progress`` is 0..1), ``done`` (``path`` is the downloaded result),
            ``error`` (``error`` is a TDComfyError), ``cancelled`` (the job was cancelled),
            ``dropped`` (a waiting frame was replaced by a newer one and will not be sent), or
            ``preview`` (``previews=True`` only: ``path`` is a complete preview image of the
            running job, ``preview_seq`` its number).
        ticket: the number ``submit()`` returned for the frame; 0 for an ``error`` of the
            pipeline itself (a fault in its housekeeping, which goes on).
        job_id: the broker's job id (None before the upload succeeded).
        path: the local result file (``done``), or the preview image file (``preview``; one of
            two names used in turn, each replaced whole, so an image TOP never reads a torn file).
        progress: 0..1 (``progress`` only).
        job: the broker's latest job JSON, when one was seen.
        error: the failure (``error`` only).
        cancel_reason: why the broker cancelled the job (``cancelled`` only): ``"superseded"``
            when a newer frame of the stream replaced it (``mode="latest"``), ``"cancelled"`` for
            a cancel; None when the broker did not say.
        reused_from: on ``done``, the earlier job whose result was reused (``dedupe=True`` and
            nothing changed); None when the job ran.
    """

    kind: str
    ticket: int
    job_id: str | None = None
    path: str | None = None
    progress: float | None = None
    job: dict | None = None
    error: TDComfyError | None = None
    cancel_reason: str | None = None
    reused_from: str | None = None
    preview_seq: int | None = None

    @property
    def message(self) -> str:
        """A one-line description for a status display."""
        if self.ticket == 0:  # about the pipeline itself, not one frame
            return f"pipeline: {self.error}" if self.error is not None else f"pipeline: {self.kind}"
        if self.kind == "progress" and self.progress is not None:
            return f"frame {self.ticket}: {self.progress:.0%}"
        if self.kind == "error" and self.error is not None:
            return f"frame {self.ticket}: {self.error}"
        if self.kind == "done":
            return f"frame {self.ticket}: done -> {self.path}"
        if self.kind == "preview":
            return f"frame {self.ticket}: preview -> {self.path}"
        return f"frame {self.ticket}: {self.kind}"


@dataclasses.dataclass
class _Frame:
    ticket: int
    image: Any
    fields: dict
    job_id: str | None = None
    status: str | None = None
    progress: float | None = None
    job: dict | None = None
    cancel_requested: bool = False


# The live-stream arguments of ``submit_frame``, in the order the broker documents them.
_STREAM_FIELDS = ("stream", "mode", "preempt", "dedupe", "previews")


class _Stopped(Exception):
    """Raised inside background threads when the pipeline is closing."""


class FramePipeline:
    """Non-blocking frame → video pipeline for TouchDesigner's main thread.

    ``submit()`` and ``pump()`` are the only calls meant for every frame; both return in
    microseconds because they only touch in-memory queues. Everything else runs on daemon
    threads: one uploader, one thread per job in flight (status via Server-Sent Events with
    reconnect, or long-polling; then the download), and one housekeeper (remote deletes, local
    file cleanup).

    Args:
        url: the broker URL, or a ready ``TDComfyClient`` (its url/token/timeout are used as is).
        token: the broker's API token.
        output_dir: where results are written (created if missing). Default: ``<temp>/tdcomfy``.
            Use one folder per pipeline: old results in it are cleaned up (see ``keep_results``).
        max_in_flight: how many frames may be between ``submit()`` and their result at once.
        when_busy: what ``submit()`` does when ``max_in_flight`` frames are in flight:
            ``"skip"`` drops the new frame (``submit`` returns None); ``"replace"`` keeps it as
            the one waiting frame, replacing (and reporting as ``dropped``) an older waiting one.
        keep_results: how many result files to keep on disk (newest first); older ones are
            deleted in the background, retrying while a player still holds them open.
            None keeps everything.
        status_transport: ``"sse"`` (push, falling back to long-poll when the broker or a proxy
            does not stream) or ``"poll"`` (long-poll ``GET /jobs/{id}?wait=…`` only).
        delete_remote: delete each job on the broker after its result was downloaded.
        cancel_on_close: ``close()`` also cancels jobs still running on the broker.
        prompt, negative_prompt, seed, workflow, params: defaults for ``submit()``; they are plain
            attributes you may change at any time (e.g. from a Parameter Execute DAT).
        stream, mode, preempt, dedupe: live-stream defaults for ``submit()`` (plain
            attributes too), sent as ``TDComfyClient.submit_frame`` describes. With
            ``mode="latest"`` the broker keeps at most one frame of the stream waiting and
            reports replaced ones as ``cancelled`` events with ``cancel_reason="superseded"``;
            raise ``max_in_flight`` to 2 or more so a new frame is sent while one runs. When
            ``mode="latest"`` or ``dedupe`` is set without a ``stream``, the pipeline makes one
            for itself (``self.stream``).
        timeout: seconds per socket operation.
        submit_retry_for: how long an upload keeps being retried while the broker is unreachable.
        download_retry_for: the same for downloads.
        poll_wait: long-poll duration in seconds.
        file_prefix: result files are named ``<file_prefix><job_id>.mp4``.
        verify_tls, ca_file: https certificate checking, as for ``TDComfyClient``.
        previews: ask the broker for preview images while each job runs and hand them out as
            ``preview`` events (needs ``status_transport="sse"``). They are downloaded on a
            thread of the pipeline, newest first (an older one not yet fetched is skipped), to
            ``<output_dir>/<file_prefix>preview_0.jpg`` and ``…preview_1.jpg`` in turn, each
            written to a temporary file and renamed over the older of the two.
        max_events: how many events wait for ``pump()`` at most. When more arrive, the oldest
            ``preview``, then ``progress`` (then ``started``) events are dropped; ``submitted``, ``done``, ``error``,
            ``cancelled`` and ``dropped`` never are. None: no bound.
    """

    def __init__(
        self,
        url: str | TDComfyClient,
        token: str | None = None,
        output_dir: str | None = None,
        *,
        max_in_flight: int = 1,
        when_busy: str = "skip",
        keep_results: int | None = 4,
        status_transport: str = "sse",
        delete_remote: bool = True,
        cancel_on_close: bool = False,
        prompt: str = "",
        negative_prompt: str = "",
        seed: int | None = None,
        workflow: str | None = None,
        params: dict | None = None,
        stream: str | None = None,
        mode: str | None = None,
        preempt: bool = False,
        dedupe: bool = False,
        previews: bool = False,
        timeout: float = 10.0,
        submit_retry_for: float = 30.0,
        download_retry_for: float = 120.0,
        poll_wait: float = 25.0,
        file_prefix: str = "tdcomfy_",
        verify_tls: bool = True,
        ca_file: str | None = None,
        max_events: int | None = 1000,
    ) -> None:
        if when_busy not in ("skip", "replace"):
            raise ValueError('when_busy must be "skip" or "replace"')
        if status_transport not in ("sse", "poll"):
            raise ValueError('status_transport must be "sse" or "poll"')
        if int(max_in_flight) < 1:
            raise ValueError("max_in_flight must be at least 1")
        if max_events is not None and int(max_events) < 1:
            raise ValueError("max_events must be at least 1 (or None for no bound)")
        if keep_results is not None and int(keep_results) < 1:
            raise ValueError("keep_results must be at least 1 (or None to keep everything)")
        self._owns_client = not (isinstance(url, TDComfyClient) or hasattr(url, "submit_frame"))
        self.client = (
            TDComfyClient(url, token=token, timeout=timeout, verify_tls=verify_tls, ca_file=ca_file)
            if self._owns_client
            else url
        )
        self.output_dir = os.path.abspath(output_dir or os.path.join(_tempdir(), "tdcomfy"))
        os.makedirs(self.output_dir, exist_ok=True)
        self.max_in_flight = int(max_in_flight)
        self.when_busy = when_busy
        self.keep_results = None if keep_results is None else int(keep_results)
        self.status_transport = status_transport
        self.delete_remote = delete_remote
        self.cancel_on_close = cancel_on_close
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.workflow = workflow
        self.params = params
        if stream is None and (mode == "latest" or dedupe):
            stream = f"td-{uuid.uuid4().hex[:16]}"
        self.stream = stream
        self.mode = mode
        self.preempt = preempt
        self.dedupe = dedupe
        self.submit_retry_for = float(submit_retry_for)
        self.download_retry_for = float(download_retry_for)
        self.poll_wait = float(poll_wait)
        self.sse_read_timeout = 45.0
        self.file_prefix = file_prefix

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self.max_events = None if max_events is None else int(max_events)
        self._events: collections.deque[PipelineEvent] = collections.deque()
        self._events_lock = threading.Lock()
        self._waiting: collections.deque[_Frame] = collections.deque()
        self._active: dict[int, _Frame] = {}
        self._next_ticket = 1
        self._dedupe_kept: str | None = None  # the last done job kept on the broker for dedupe
        self._stop = threading.Event()
        self._abort = AbortSignal()
        self._closed = False
        self._threads: set[threading.Thread] = set()
        self._teardown: threading.Thread | None = None
        self._teardown_threads: list[threading.Thread] = []
        self._housekeeping: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._stats = {
            "submitted": 0, "done": 0, "errors": 0, "cancelled": 0, "dropped": 0, "skipped": 0,
            "last_error": None, "last_progress": None, "last_result": None, "events_dropped": 0,
        }
        self._results: collections.deque[str] = collections.deque()  # owned by the housekeeping thread
        self.previews = bool(previews)
        # job id -> (frame, seq, url) of the newest preview announced and not fetched yet.
        self._preview_wanted: dict[str, tuple[_Frame, int, str]] = {}
        self._preview_seen: dict[str, int] = {}  # job id -> newest seq announced
        self._preview_ready = threading.Condition(threading.Lock())
        self._preview_slot = 0
        self._preview_tickets: dict[str, int] = {}  # job id -> ticket, for jobs with previews announced
        self._preview_thread_started = False
        self._spawn(self._upload_loop, "tdcomfy-upload")
        if self.previews:
            self._start_preview_thread()
        self._spawn(self._housekeeping_loop, "tdcomfy-housekeeping")

    # -- main-thread API -----------------------------------------------------------------------

    def submit(
        self,
        image_bytes: bytes | bytearray | memoryview,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        seed: int | None = None,
        workflow: str | None = None,
        params: dict | None = None,
        *,
        stream: str | None = None,
        mode: str | None = None,
        preempt: bool | None = None,
        dedupe: bool | None = None,
        previews: bool | None = None,
    ) -> int | None:
        """Queues a frame for upload and returns its ticket number at once, or None if skipped.

        Arguments left as None take the pipeline's defaults (``self.prompt`` …). Nothing is
        copied or encoded here: the bytes are handed to the upload thread as they are, so do not
        modify a bytearray after passing it.
        """
        _check_image_arg(image_bytes)
        fields = {
            "prompt": self.prompt if prompt is None else prompt,
            "negative_prompt": self.negative_prompt if negative_prompt is None else negative_prompt,
            "seed": self.seed if seed is None else seed,
            "workflow": self.workflow if workflow is None else workflow,
            "params": self.params if params is None else params,
            "stream": self.stream if stream is None else stream,
            "mode": self.mode if mode is None else mode,
            "preempt": self.preempt if preempt is None else preempt,
            "dedupe": self.dedupe if dedupe is None else dedupe,
            "previews": self.previews if previews is None else previews,
        }
        if not fields["stream"] and (fields["mode"] == "latest" or fields["dedupe"]):
            # mode and dedupe may be switched on after construction (plain attributes): both need a
            # stream, so the pipeline makes its own the first time.
            if not self.stream:
                self.stream = f"td-{uuid.uuid4().hex[:16]}"
            fields["stream"] = self.stream
        with self._work:
            if self._closed:
                raise TDComfyError("closed", "submit() after close()")
            occupied = len(self._active) + len(self._waiting)
            if occupied >= self.max_in_flight:
                if self.when_busy == "skip":
                    self._stats["skipped"] += 1
                    return None
                if occupied > self.max_in_flight:
                    # "replace": the newest waiting frame is the one parked beyond capacity.
                    dropped = self._waiting.pop()
                    self._stats["dropped"] += 1
                    self._put_event(PipelineEvent("dropped", dropped.ticket))
            ticket = self._next_ticket
            self._next_ticket += 1
            self._waiting.append(_Frame(ticket, image_bytes, fields))
            self._work.notify_all()
            return ticket

    def pump(self, max_events: int | None = None) -> list[PipelineEvent]:
        """Returns the events that happened since the last call (oldest first). Never blocks.

        Call it once per frame from the main thread (an Execute DAT's ``onFrameStart``).
        """
        if not self._events:  # the usual frame: nothing happened (len of a deque is atomic)
            return []
        with self._events_lock:
            count = len(self._events) if max_events is None else min(int(max_events), len(self._events))
            events = [self._events.popleft() for _ in range(count)]
        for event in events:
            if event.kind == "done" and event.path:
                # Only a result the caller has seen may be trimmed (keep_results).
                self._housekeeping.put(("result", event.path))
        return events

    def is_ready_for_next(self) -> bool:
        """True when ``submit()`` would start a frame now without skipping or replacing one."""
        with self._lock:
            return not self._closed and len(self._active) + len(self._waiting) < self.max_in_flight

    @property
    def in_flight(self) -> int:
        """Frames uploading, processing or downloading."""
        with self._lock:
            return len(self._active)

    @property
    def waiting(self) -> int:
        """Frames accepted by ``submit()`` but not uploading yet."""
        with self._lock:
            return len(self._waiting)

    def stats(self) -> dict:
        """Counters for a status display (submitted, done, errors, in_flight, last_error …)."""
        with self._lock:
            snapshot = dict(self._stats)
            snapshot["in_flight"] = len(self._active)
            snapshot["waiting"] = len(self._waiting)
            snapshot["jobs"] = [
                {"ticket": f.ticket, "job_id": f.job_id, "status": f.status or "uploading", "progress": f.progress}
                for f in self._active.values()
            ]
        snapshot["closed"] = self._closed
        return snapshot

    def cancel(self, ticket_or_job_id: int | str) -> bool:
        """Cancels one frame (by ticket or job id) in the background. False if it is unknown.

        A waiting frame is dropped at once (a ``cancelled`` event follows); a submitted job is
        deleted on the broker and reported as ``cancelled`` when the broker confirms.
        """
        with self._lock:
            for frame in list(self._waiting):
                if ticket_or_job_id in (frame.ticket, frame.job_id):
                    self._waiting.remove(frame)
                    self._stats["cancelled"] += 1
                    self._put_event(PipelineEvent("cancelled", frame.ticket))
                    self._work.notify_all()
                    return True
            for frame in self._active.values():
                if ticket_or_job_id in (frame.ticket, frame.job_id):
                    frame.cancel_requested = True
                    if frame.job_id:
                        self._housekeeping.put(("delete", frame.job_id, 0))
                    return True
        return False

    def cancel_all(self) -> None:
        """Cancels every waiting and in-flight frame (in the background)."""
        with self._lock:
            tickets = [f.ticket for f in self._waiting] + list(self._active)
        for ticket in tickets:
            self.cancel(ticket)

    def close(self, timeout: float = 3.0, *, wait: bool = False) -> None:
        """Stops every background thread without waiting for them; safe on TouchDesigner's main thread.

        Returns at once: open connections are shut down now, and a daemon thread
        (``tdcomfy-close``) joins the others for at most ``timeout`` seconds in total. Use
        ``wait_closed()`` (or ``wait=True``) where you need them gone, e.g. in scripts and tests.
        Safe to call twice. Jobs still running on the broker keep running unless
        ``cancel_on_close`` is set. Events already produced can still be read with ``pump()``.
        """
        with self._work:
            if self._closed:
                already = True
            else:
                already = False
                self._closed = True
                self._stop.set()
                waiting = list(self._waiting)
                self._waiting.clear()
                threads = list(self._threads)
                self._work.notify_all()
        if not already:
            for frame in waiting:
                self._put_event(PipelineEvent("dropped", frame.ticket))
            self._abort.trigger()
            with self._preview_ready:
                self._preview_ready.notify_all()
            self._housekeeping.put(("stop",))
            self._teardown_threads = threads
            self._teardown = threading.Thread(
                target=self._run_teardown, args=(threads, float(timeout)), name="tdcomfy-close", daemon=True
            )
            self._teardown.start()
        if wait:
            self.wait_closed(timeout)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Waits up to ``timeout`` seconds (None: as long as it takes) for ``close()`` to finish.

        True when every background thread has stopped; False before ``close()`` or while a
        thread is still running. Not for TouchDesigner's main thread: it blocks.
        """
        teardown = self._teardown
        if teardown is None:
            return False
        if teardown is not threading.current_thread():
            teardown.join(timeout)
        if teardown.is_alive():
            return False
        return not any(t.is_alive() for t in self._teardown_threads if t is not threading.current_thread())

    def _run_teardown(self, threads: list[threading.Thread], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._owns_client:
            self.client.close()
            waiter = getattr(self.client, "wait_closed", None)
            if waiter is not None:
                waiter(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "FramePipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=True)

    def __repr__(self) -> str:
        return f"FramePipeline({getattr(self.client, 'url', self.client)!r}, in_flight={self.in_flight})"

    # -- background threads --------------------------------------------------------------------

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            # close() sets _stop under this lock before it collects threads to join, so a thread
            # is either joined by close() or never started. Starting it under the lock too means
            # close() never sees a thread it cannot join yet.
            if self._stop.is_set():
                return
            self._threads.add(thread)
            thread.start()

    def _put_event(self, event: PipelineEvent) -> None:
        """Queues an event for pump(), dropping the oldest progress/started events beyond max_events."""
        with self._events_lock:
            if self.max_events is not None and len(self._events) >= self.max_events:
                for droppable in _DROPPABLE_EVENTS:
                    index = next((i for i, e in enumerate(self._events) if e.kind == droppable), None)
                    if index is not None:
                        del self._events[index]
                        with self._lock:
                            self._stats["events_dropped"] += 1
                        break
            self._events.append(event)

    def _report_bug(self, where: str, exc: BaseException) -> None:
        """A bug in a background thread becomes an ``error`` event (ticket 0), not a dead thread."""
        _log.error("%s failed", where, exc_info=exc)
        error = TDComfyError("internal_error", f"{where} failed: {exc!r}")
        with self._lock:
            self._stats["errors"] += 1
            self._stats["last_error"] = str(error)
        self._put_event(PipelineEvent("error", 0, error=error))

    def _emit(self, kind: str, frame: _Frame, **fields: Any) -> None:
        fields.setdefault("job", frame.job)
        self._put_event(PipelineEvent(kind, frame.ticket, frame.job_id, **fields))

    def _upload_loop(self) -> None:
        while True:
            with self._work:
                while not self._stop.is_set() and not (self._waiting and len(self._active) < self.max_in_flight):
                    self._work.wait()
                if self._stop.is_set():
                    return
                frame = self._waiting.popleft()
                self._active[frame.ticket] = frame
            try:
                self._upload(frame)
            except _Stopped:
                self._release(frame)
                return
            except TDComfyError as exc:
                self._fail(frame, exc)
                self._release(frame)
                continue
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the uploader silently
                _log.exception("upload failed")
                self._fail(frame, TDComfyError("internal_error", f"upload failed: {exc!r}"))
                self._release(frame)
                continue
            self._spawn(self._job_thread, f"tdcomfy-job-{frame.ticket}", frame)

    def _upload(self, frame: _Frame) -> None:
        if frame.fields.get("previews"):
            self._start_preview_thread()  # previews asked for by this submit() only
        key = uuid.uuid4().hex  # one key for every retry of this frame: never two jobs
        deadline = time.monotonic() + self.submit_retry_for
        failures = 0
        fields = frame.fields
        # Passed only when set, so a client object written before streams (or a test double)
        # that does not take them keeps working.
        stream_args = {name: fields[name] for name in _STREAM_FIELDS if fields.get(name)}
        while True:
            try:
                job_id = self.client.submit_frame(
                    frame.image, prompt=fields["prompt"] or "", negative_prompt=fields["negative_prompt"] or "",
                    seed=fields["seed"], workflow=fields["workflow"], params=fields["params"],
                    idempotency_key=key, abort=self._abort, **stream_args,
                )
                break
            except TDComfyError as exc:
                if self._stop.is_set():
                    raise _Stopped() from exc
                if not exc.retryable or time.monotonic() > deadline:
                    raise
                failures += 1
                self._sleep(_backoff(failures))
        frame.image = None  # the bytes are on the broker now; free them
        with self._lock:
            frame.job_id = job_id
            frame.status = "queued"
            self._stats["submitted"] += 1
            cancel_requested = frame.cancel_requested
        answer = getattr(self.client, "last_submit", None)
        self._emit("submitted", frame, job=answer if isinstance(answer, dict) else None)
        if cancel_requested:
            self._housekeeping.put(("delete", job_id, 0))

    def _job_thread(self, frame: _Frame) -> None:
        remote_finished = False
        status = None
        try:
            job = self._watch(frame)
            remote_finished = True
            self._forget_previews(frame)  # before the end is announced: no preview after it
            status = job.get("status")
            if status == "done":
                path = self._download(frame, job)
                with self._lock:
                    self._stats["done"] += 1
                    self._stats["last_result"] = path
                self._emit("done", frame, path=path, reused_from=job.get("reused_from"))
            elif status == "cancelled":
                with self._lock:
                    self._stats["cancelled"] += 1
                self._emit("cancelled", frame, cancel_reason=job.get("cancel_reason"))
            else:
                message = job.get("error_message") or "the job failed"
                self._fail(frame, TDComfyError("job_failed", str(message), job_id=frame.job_id))
        except _Stopped:
            pass
        except TDComfyError as exc:
            if not self._stop.is_set():
                exc.job_id = exc.job_id or frame.job_id
                self._fail(frame, exc)
                remote_finished = exc.code == "job_not_found"
        except Exception as exc:  # noqa: BLE001 - report bugs as events, not as a silent dead thread
            _log.exception("job thread failed")
            self._fail(frame, TDComfyError("internal_error", f"job thread failed: {exc!r}", job_id=frame.job_id))
        finally:
            self._forget_previews(frame)
            self._release(frame)
            if frame.job_id and self.delete_remote and remote_finished and not self._stop.is_set():
                delete = frame.job_id
                if status == "done" and frame.fields.get("dedupe"):
                    # The stream's last result is what an unchanged frame reuses: it stays on the
                    # broker until a newer one replaces it (each reuse owns its own copy).
                    with self._lock:
                        delete, self._dedupe_kept = self._dedupe_kept, delete
                if delete:
                    self._housekeeping.put(("delete", delete, 0))

    def _watch(self, frame: _Frame) -> dict:
        """Follows the job until a terminal status; returns the final job JSON."""
        failures = 0
        timeouts = 0
        version: int | None = None
        while True:
            if self._stop.is_set():
                raise _Stopped()
            try:
                if self.status_transport == "sse":
                    events = self.client.iter_events(
                        frame.job_id, read_timeout=self.sse_read_timeout, abort=self._abort
                    )
                    with contextlib.closing(events):
                        for event in events:
                            failures = timeouts = 0
                            if event.event == "preview":
                                self._preview_announced(frame, event.data)
                                continue
                            job = event.data.get("job") if isinstance(event.data, dict) else None
                            if isinstance(job, dict) and self._observe(frame, job):
                                return job
                    # The stream ended before a terminal status (broker restarting): reconnect.
                    failures += 1
                else:
                    job = self.client.check_job(
                        frame.job_id, wait=self.poll_wait if version is not None else None, since=version,
                        abort=self._abort,
                    )
                    failures = 0
                    version = job.get("version") if isinstance(job.get("version"), int) else None
                    if self._observe(frame, job):
                        return job
                    if version is None:
                        # Without a version the broker cannot long-poll for us: pace ourselves.
                        self._sleep(1.0)
                    continue
            except TDComfyError as exc:
                if self._stop.is_set() or exc.code == "closed":
                    raise _Stopped() from exc
                if exc.code == "job_not_found":
                    raise
                if self.status_transport == "sse" and _events_missing(exc):
                    _log.info("no event stream (%s); falling back to long-polling", exc)
                    self.status_transport = "poll"
                    continue
                if exc.code == "timeout" and self.status_transport == "sse":
                    timeouts += 1
                    if timeouts >= 2:
                        # Something between us and the broker buffers the stream: poll instead.
                        self.status_transport = "poll"
                        continue
                if not exc.retryable:
                    raise
                failures += 1
            self._sleep(_backoff(failures))

    def _observe(self, frame: _Frame, job: dict) -> bool:
        """Records a job state, emits started/progress events; True when the status is terminal."""
        status = job.get("status")
        progress = job.get("progress")
        value = progress.get("value") if isinstance(progress, dict) else None
        with self._lock:
            previous = frame.status
            frame.status = status if isinstance(status, str) else previous
            frame.job = job
        if status == "running":
            if previous != "running":
                self._emit("started", frame)
            if isinstance(value, (int, float)) and value != frame.progress:
                frame.progress = float(value)
                with self._lock:
                    self._stats["last_progress"] = frame.progress
                self._emit("progress", frame, progress=frame.progress)
        return status in TERMINAL_STATUSES

    def _start_preview_thread(self) -> None:
        with self._preview_ready:
            if self._preview_thread_started:
                return
            self._preview_thread_started = True
        self._spawn(self._preview_loop, "tdcomfy-previews")

    def _preview_announced(self, frame: _Frame, data: Any) -> None:
        """Notes a ``preview`` event for the preview thread (job thread; never downloads here)."""
        if not frame.fields.get("previews") or not isinstance(data, dict) or not frame.job_id:
            return
        seq, url = data.get("seq"), data.get("url")
        if not isinstance(seq, int) or not isinstance(url, str):
            return
        with self._preview_ready:
            if seq <= self._preview_seen.get(frame.job_id, 0):
                return  # one we already have (a stream reopened with the current preview)
            self._preview_seen[frame.job_id] = seq
            self._preview_tickets[frame.job_id] = frame.ticket
            if frame.ticket < max(self._preview_tickets.values()):
                # Two jobs render at once (several GPUs): the two files show the newest frame's
                # job only, or they would flicker between two scenes.
                self._preview_wanted.pop(frame.job_id, None)
                return
            # Latest wins: an older preview not fetched yet is replaced, never fetched.
            self._preview_wanted[frame.job_id] = (frame, seq, url)
            self._preview_ready.notify()

    def _forget_previews(self, frame: _Frame) -> None:
        if frame.job_id:
            with self._preview_ready:
                self._preview_wanted.pop(frame.job_id, None)
                self._preview_seen.pop(frame.job_id, None)
                self._preview_tickets.pop(frame.job_id, None)

    def _preview_loop(self) -> None:
        """Fetches announced previews, newest per job, and writes them under two alternating names."""
        while True:
            with self._preview_ready:
                while not self._preview_wanted and not self._stop.is_set():
                    self._preview_ready.wait()
                if self._stop.is_set():
                    return
                job_id = next(iter(self._preview_wanted))
                frame, seq, _url = self._preview_wanted.pop(job_id)
            try:
                self._fetch_preview(frame, job_id, seq)
            except TDComfyError as exc:
                if self._stop.is_set() or exc.code == "closed":
                    return
                # A preview that does not arrive is skipped: the next one is on its way.
                _log.debug("preview of %s not fetched: %s", job_id, exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not kill previews silently
                self._report_bug("preview download", exc)

    def _fetch_preview(self, frame: _Frame, job_id: str, seq: int) -> None:
        got = self.client.get_preview(job_id, abort=self._abort)
        if got is None:
            return  # the job finished meanwhile: its preview went with it
        image, content_type, got_seq, _etag = got
        with self._preview_ready:
            if job_id not in self._preview_seen:
                return  # the job ended while this was on its way
            newer = self._preview_wanted.get(job_id)
            if newer is not None and newer[1] <= got_seq:
                # The broker had the next announced preview already: this download is it.
                del self._preview_wanted[job_id]
        extension = _PREVIEW_EXTENSIONS.get(content_type, ".img")
        slot = self._preview_slot
        path = os.path.join(self.output_dir, f"{self.file_prefix}preview_{slot}{extension}")
        part = f"{path}.{uuid.uuid4().hex[:8]}.part"
        try:
            with open(part, "wb") as f:
                f.write(image)
            os.replace(part, path)  # atomic: a reader sees the old file or the new one, whole
        except OSError as exc:
            # E.g. Windows refusing to replace a file an image TOP holds open: skip this preview.
            _try_remove(part)
            _log.debug("could not write preview %s: %s", path, exc)
            return
        with self._preview_ready:
            # Checked again with the emit under the lock: the job thread forgets a job's previews
            # before it announces the job's end, so no preview event follows its done/error.
            if job_id not in self._preview_seen or frame.ticket < max(self._preview_tickets.values(), default=0):
                return
            self._preview_slot = 1 - slot
            self._emit("preview", frame, path=path, preview_seq=got_seq or seq)

    def _download(self, frame: _Frame, job: dict) -> str:
        result = job.get("result") if isinstance(job.get("result"), dict) else {}
        extension = _RESULT_EXTENSIONS.get(str(result.get("content_type") or "").split(";")[0].strip(), ".mp4")
        path = os.path.join(self.output_dir, f"{self.file_prefix}{frame.job_id}{extension}")
        deadline = time.monotonic() + self.download_retry_for
        failures = 0
        while True:
            try:
                return self.client.download_result(frame.job_id, path, abort=self._abort)
            except TDComfyError as exc:
                if self._stop.is_set() or exc.code == "closed":
                    raise _Stopped() from exc
                if not exc.retryable or time.monotonic() > deadline:
                    raise
                failures += 1
                self._sleep(_backoff(failures))

    def _fail(self, frame: _Frame, exc: TDComfyError) -> None:
        with self._lock:
            self._stats["errors"] += 1
            self._stats["last_error"] = str(exc)
        self._emit("error", frame, error=exc)

    def _release(self, frame: _Frame) -> None:
        with self._work:
            self._active.pop(frame.ticket, None)
            self._work.notify_all()

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped()

    def _housekeeping_loop(self) -> None:
        """Remote deletes (with retries) and local result cleanup, off the main thread.

        Survives any exception: each one is reported as an ``error`` event and the loop goes on.
        """
        deletes: list[tuple[float, str, int]] = []  # (due time, job id, attempts so far)
        trash: list[str] = []
        try:
            self._results.extend(self._existing_results())
            self._sweep_partials()
            self._trim_results(trash)
        except Exception as exc:  # noqa: BLE001 - reported, and housekeeping goes on
            self._report_bug("housekeeping", exc)
        while True:
            try:
                if self._housekeeping_step(deletes, trash):
                    return
            except Exception as exc:  # noqa: BLE001 - reported, and housekeeping goes on
                self._report_bug("housekeeping", exc)
                if self._stop.wait(0.05):  # a failure that repeats must not spin a CPU
                    try:
                        self._shutdown_housekeeping(trash)
                    except Exception as final:  # noqa: BLE001
                        _log.error("housekeeping shutdown failed", exc_info=final)
                    return

    def _housekeeping_step(self, deletes: list[tuple[float, str, int]], trash: list[str]) -> bool:
        """One round of housekeeping; True when told to stop."""
        now = time.monotonic()
        due = [d for d in deletes if d[0] <= now]
        deletes[:] = [d for d in deletes if d[0] > now]
        for _, job_id, attempts in due:
            retry = self._delete_remote(job_id, attempts)
            if retry is not None:
                deletes.append(retry)
        trash[:] = [path for path in trash if not _try_remove(path)]
        wake = _TRASH_RETRY_SECONDS if trash else 5.0
        if deletes:
            wake = min(wake, max(0.0, min(d[0] for d in deletes) - time.monotonic()))
        try:
            task = self._housekeeping.get(timeout=wake)
        except queue.Empty:
            return False
        if task[0] == "stop":
            self._shutdown_housekeeping(trash)
            return True
        if task[0] == "delete":
            deletes.append((time.monotonic(), task[1], task[2]))
        elif task[0] == "result":
            self._results.append(task[1])
            self._trim_results(trash)
        return False

    def _delete_remote(self, job_id: str, attempts: int) -> tuple[float, str, int] | None:
        try:
            self.client.delete_job(job_id, abort=self._abort)
        except TDComfyError as exc:
            if exc.status in (404, 410) or self._stop.is_set():
                return None
            if exc.retryable and attempts < 5:
                return (time.monotonic() + _backoff(attempts + 1), job_id, attempts + 1)
            _log.warning("could not delete job %s on the broker: %s", job_id, exc)
        return None

    def _trim_results(self, trash: list[str]) -> None:
        if self.keep_results is None:
            return
        while len(self._results) > self.keep_results:
            trash.append(self._results.popleft())

    def _shutdown_housekeeping(self, trash: list[str]) -> None:
        for path in trash:
            _try_remove(path)
        if not self.cancel_on_close:
            return
        with self._lock:
            unfinished = [f.job_id for f in self._active.values() if f.job_id and f.status not in TERMINAL_STATUSES]
        # A fresh client: the pipeline's sockets are being shut down by close().
        url = getattr(self.client, "url", None)
        if not url:
            return
        quick = TDComfyClient(
            url, getattr(self.client, "token", None), timeout=1.0,
            verify_tls=getattr(self.client, "verify_tls", True), ca_file=getattr(self.client, "ca_file", None),
        )
        try:
            for job_id in unfinished:
                try:
                    quick.delete_job(job_id)
                except TDComfyError as exc:
                    _log.info("cancel on close failed for %s: %s", job_id, exc)
        finally:
            quick.close()

    def _existing_results(self) -> list[str]:
        """Result files left in the output folder by earlier sessions, oldest first."""
        found = []
        try:
            with os.scandir(self.output_dir) as entries:
                for entry in entries:
                    preview = entry.name.startswith(f"{self.file_prefix}preview_")
                    ours = entry.name.startswith(self.file_prefix) and not entry.name.endswith(".part")
                    if ours and not preview and entry.is_file():
                        found.append((entry.stat().st_mtime, entry.path))
        except OSError:
            return []
        return [path for _, path in sorted(found)]

    def _sweep_partials(self) -> None:
        """Removes ``.part`` files of ours older than an hour (downloads a crash left behind)."""
        cutoff = time.time() - 3600
        try:
            with os.scandir(self.output_dir) as entries:
                for entry in entries:
                    ours = entry.name.startswith(self.file_prefix) and entry.name.endswith(".part")
                    if ours and entry.stat().st_mtime < cutoff:
                        _try_remove(entry.path)
        except OSError:
            pass


# Event kinds that may be dropped when the queue is full, in this order; the others never are.
_DROPPABLE_EVENTS = ("preview", "progress", "started")

# File extensions of preview images by MIME type.
_PREVIEW_EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp"}


def _events_missing(exc: TDComfyError) -> bool:
    """True when the error means 'no event stream here' rather than 'try again later'."""
    if exc.code == "events_unsupported":
        return True
    return exc.status in (404, 405, 406, 501) and exc.code != "job_not_found"


def _backoff(failures: int) -> float:
    return min(2.0, 0.1 * 2 ** min(failures, 8))


def _try_remove(path: str) -> bool:
    """Deletes a file; True when it is gone, False when it is still held open (retry later)."""
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _tempdir() -> str:
    import tempfile

    return tempfile.gettempdir()


# ---------------------------------------------------------------------------------------------
# The TouchDesigner component: build_component() and its extension, TDComfyExt
# ---------------------------------------------------------------------------------------------
#
# Everything below runs on TouchDesigner's main thread except _Monitor's thread, which only does
# HTTP and hands its answers over through a queue; the extension's Frame() drains it. Each name
# of TouchDesigner's API used here is listed, with its Derivative page, in
# tests/fake_td.md (the table the fake TouchDesigner of the tests follows).

#: The parameters of the TDComfy page, in page order: (name, style, label, default, extra).
_COMPONENT_PARS = (
    ("Url", "Str", "Broker URL", "http://127.0.0.1:8080", {}),
    ("Token", "Str", "API Token", "", {}),
    ("Workflow", "Menu", "Workflow", None, {}),  # names and value come from GET /workflows
    ("Refresh", "Pulse", "Refresh Workflows", None, {}),
    ("Prompt", "Str", "Prompt", "", {}),
    ("Negative", "Str", "Negative Prompt", "", {}),
    ("Seed", "Int", "Seed (-1 = random)", -1, {"min": -1, "max": 2147483647, "normMax": 100000}),
    ("Mode", "Menu", "Mode", "one", {"menu": (("one", "One at a time"), ("latest", "Latest wins"),
                                               ("queue", "Queue (up to Max In Flight)"))}),
    ("Maxinflight", "Int", "Max In Flight", 2, {"min": 1, "max": 16}),
    ("Active", "Toggle", "Active (keep sending)", False, {}),
    ("Send", "Pulse", "Send One Frame", None, {}),
    ("Cancel", "Pulse", "Cancel All", None, {}),
    ("Dedupe", "Toggle", "Dedupe Unchanged Frames", False, {}),
    ("Preview", "Toggle", "Live Preview", True, {}),
    ("Captureformat", "Menu", "Capture Format", "jpeg", {"menu": (("jpeg", "JPEG"), ("png", "PNG (lossless, slow)"))}),
    ("Jpegquality", "Float", "JPEG Quality", 0.9, {"min": 0.0, "max": 1.0}),
    ("Fadeframes", "Int", "Fade Frames (0 = cut)", 0, {"min": 0, "max": 600, "normMax": 60}),
)
#: Workflow parameters that the TDComfy page already has (sent as their own fields).
_PAGE_FIELDS = {"prompt": "Prompt", "negative": "Negative", "seed": "Seed"}
#: Where the extension keeps what survives a re-init and a .tox save (COMP storage).
_STORE_PARS = "tdcomfy_workflow_pars"  # TD par name -> [schema name, type, choices or None]
_STORE_VALUES = "tdcomfy_values"  # workflow name -> {schema name: value}, the values last set
_STORE_SIGNATURE = "tdcomfy_page_signature"  # what the Workflow page was built from
_INT_LIMIT = 2**31 - 1  # TD Int parameters are taken as 32-bit here: wider limits are clamped
_ERROR_PAUSE = 2.0  # seconds without automatic sends after an error
_LATEST_REFRESH = 0.5  # Mode "latest": seconds a sent frame may wait to start before a newer one replaces it

_EXEC_DAT_TEXT = '''"""tdcomfy: pumps the component's FramePipeline every frame (Execute DAT, Frame Start on)."""


def onFrameStart(frame):
    me.parent().ext.TDComfyExt.Frame(frame)


def onExit():
    me.parent().ext.TDComfyExt.Close()
'''

_PAREXEC_DAT_TEXT = '''"""tdcomfy: hands the component's parameter changes and pulses to its extension."""


def onValueChange(par, prev):
    me.parent().ext.TDComfyExt.OnParChange(par)


def onPulse(par):
    me.parent().ext.TDComfyExt.OnPulse(par)
'''

_CHOP_CALLBACKS_TEXT = '''"""tdcomfy: the info CHOP (Script CHOP), one sample per channel, cooked when the info changes."""


def onCook(scriptOp):
    scriptOp.clear()
    scriptOp.numSamples = 1
    for name, value in scriptOp.parent().ext.TDComfyExt.InfoChannels():
        scriptOp.appendChan(name)[0] = value
'''

_CALLBACKS_TEXT = '''"""tdcomfy callbacks: edit freely (a rebuild keeps this DAT's text).

Each gets the component and a dict: kind, ticket, job_id, path (done/preview), progress (0..1),
queue_position, error (text), error_code, cancel_reason ("superseded" or "cancelled"),
latency (seconds from capture to result, done only), job (the broker's job JSON).
They run on the main thread: keep them short.
"""


def onQueued(comp, info):
    return


def onStarted(comp, info):
    return


def onProgress(comp, info):
    return


def onPreview(comp, info):
    return


def onDone(comp, info):
    return


def onError(comp, info):
    return


def onCancelled(comp, info):
    return
'''

#: info CHOP channel values of ``state``.
_STATE_CODES = {"idle": 0, "offline": 1, "sending": 2, "queued": 3, "running": 4, "done": 5, "error": 6,
                "cancelled": 7}


def _td_name(name: str) -> str:
    """A TouchDesigner custom parameter name: first letter upper case, the rest lower case or digits."""
    kept = "".join(c for c in str(name) if c.isascii() and c.isalnum())
    if not kept or not kept[0].isalpha():
        kept = "P" + kept
    return kept[0].upper() + kept[1:].lower()


def _label(name: str) -> str:
    return " ".join(word.capitalize() for word in str(name).replace("-", "_").split("_") if word) or str(name)


def _own_source() -> str:
    """This file's text, for the component's library DAT."""
    path = globals().get("__file__")
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    raise TDComfyError(
        "io_error", "build_component() needs the client file on disk; pass source=<the file's text>"
    )


def build_component(parent_comp: Any, name: str = "tdcomfy", *, url: str | None = None,
                    source: str | None = None) -> Any:
    """Builds (or rebuilds in place) the tdcomfy Base COMP inside ``parent_comp``; returns it.

    Run once from the Textport, then save the COMP as a .tox (right click > Save Component)::

        import touchdesigner_client
        touchdesigner_client.build_component(op('/project1'))

    The COMP carries a copy of this file in its Text DAT ``tdcomfy_client``, which its extension
    (``TDComfyExt``) is compiled from, so the saved .tox works on its own. Building over an existing
    tdcomfy COMP keeps its parameter values and its ``callbacks`` DAT, and refreshes the library.
    Main thread only (it creates operators); it does no network I/O.
    """
    text = source if source is not None else _own_source()
    comp = parent_comp.op(name)
    if comp is None:
        comp = parent_comp.create("baseCOMP", name)
    elif comp.op("tdcomfy_client") is None and comp.children:
        raise ValueError(f"{comp.path} exists and is not a tdcomfy component; pass another name=")
    kept = {}
    for page in list(comp.customPages):
        if page.name == "TDComfy":
            for par in page.pars:
                if not par.isPulse:
                    kept[par.name] = _par_state(par)
            page.destroy()
    if url is not None:
        kept["Url"] = url
    page = comp.appendCustomPage("TDComfy")
    for par_name, style, label, default, extra in _COMPONENT_PARS:
        par = getattr(page, "append" + style)(par_name, label=label)[0]
        if "menu" in extra:
            par.menuNames = [n for n, _ in extra["menu"]]
            par.menuLabels = [lbl for _, lbl in extra["menu"]]
        for limit in ("min", "max"):
            if limit in extra:
                setattr(par, limit, extra[limit])
                setattr(par, "norm" + limit.capitalize(), extra.get("norm" + limit.capitalize(), extra[limit]))
                setattr(par, "clamp" + limit.capitalize(), True)
        if par_name == "Workflow" and isinstance(kept.get("Workflow"), str) and kept["Workflow"]:
            # Keep the chosen workflow through a rebuild, as the only entry until the broker answers.
            par.menuNames = par.menuLabels = [str(kept["Workflow"])]
            par.val = str(kept["Workflow"])
        if default is not None:
            par.default = default
            state = kept.get(par_name, default)
            if isinstance(state, dict) and "expr" in state:
                par.expr = state["expr"]  # a binding the user made (e.g. Prompt from a DAT) stays one
            else:
                par.val = state
    names = [p.name for p in comp.customPages]
    comp.sortCustomPages("TDComfy", *[n for n in names if n != "TDComfy"])

    def child(op_type: str, child_name: str, x: int, y: int) -> Any:
        found = comp.op(child_name)
        if found is None:
            found = comp.create(op_type, child_name)
            found.nodeX, found.nodeY = x, y
        return found

    library = child("textDAT", "tdcomfy_client", 0, 400)
    library.text = text
    callbacks = child("textDAT", "callbacks", 200, 400)
    if not callbacks.text.strip():
        callbacks.text = _CALLBACKS_TEXT
    child("executeDAT", "tdcomfy_exec", 400, 400).text = _EXEC_DAT_TEXT
    execute = comp.op("tdcomfy_exec")
    execute.par.framestart = True
    execute.par.exit = True
    parexec = child("parameterexecuteDAT", "tdcomfy_parexec", 600, 400)
    parexec.text = _PAREXEC_DAT_TEXT
    parexec.par.op = ".."
    parexec.par.pars = "*"
    parexec.par.custom = True
    parexec.par.builtin = False
    parexec.par.valuechange = True
    parexec.par.onpulse = True
    child("inTOP", "in1", 0, 200)
    movies = []
    for index, movie_name in enumerate(("moviefilein_a", "moviefilein_b")):
        movie = child("moviefileinTOP", movie_name, 200, 100 + index * 150)
        movie.par.playmode = "sequential"
        movie.par.play = False
        movie.par.textendright = "cycle"  # loop the clip until the next one is ready
        movie.par.prereadframes = 8
        movies.append(movie)
    cross = child("crossTOP", "result_cross", 400, 150)
    cross.inputConnectors[0].connect(movies[0])
    cross.inputConnectors[1].connect(movies[1])
    cross.par.cross = 0
    child("outTOP", "out_video", 600, 150).inputConnectors[0].connect(cross)
    preview = child("moviefileinTOP", "preview_movie", 200, -100)
    preview.par.playmode = "sequential"
    child("outTOP", "out_preview", 600, -100).inputConnectors[0].connect(preview)
    info = child("tableDAT", "info", 400, -300)
    child("outDAT", "out_info", 600, -450).inputConnectors[0].connect(info)
    chop_callbacks = child("textDAT", "info_chop_callbacks", 200, -300)
    chop_callbacks.text = _CHOP_CALLBACKS_TEXT
    chop = child("scriptCHOP", "info_chop", 600, -300)
    chop.par.callbacks = "info_chop_callbacks"
    child("outCHOP", "out_info_chop", 800, -300).inputConnectors[0].connect(chop)
    comp.par.ext0object = "op('./tdcomfy_client').module.TDComfyExt(me)"
    comp.par.ext0promote = True
    comp.par.reinitextensions.pulse()  # (re)compiles the extension from the library just written
    return comp


class _Monitor:
    """A daemon thread that watches the broker (``/health``) and fetches ``/workflows``.

    It never touches TouchDesigner objects: each answer goes into ``results`` for the main thread.
    While the broker is unreachable it asks every second, so the component sees it come back
    without a pulse; while it is up, every ``interval`` seconds.
    """

    def __init__(self, client: TDComfyClient, interval: float = 5.0) -> None:
        self.client = client
        self.interval = interval
        self.results: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._want_workflows = True
        self._thread = threading.Thread(target=self._run, name="tdcomfy-monitor", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        self._want_workflows = True
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.client.close()

    def _run(self) -> None:
        up = None
        workers = None
        fetched_at = 0.0
        while not self._stop.is_set():
            try:
                health = self.client.health()
                if up is not True:
                    self._want_workflows = True  # a broker back from a restart may have others
                # Readiness comes from the workers' preflight: fetched again when workers come or
                # go, and every 30 s (a server's models may have been installed meanwhile).
                now_workers = health.get("workers_connected") if isinstance(health, dict) else None
                if now_workers != workers or time.monotonic() - fetched_at > 30.0:
                    self._want_workflows = True
                workers = now_workers
                up = True
                self.results.put(("up", None))
            except TDComfyError as exc:
                up = False
                self.results.put(("down", exc))
            except Exception as exc:  # noqa: BLE001 - a bug must not end the watching silently
                up = False
                self.results.put(("down", TDComfyError("internal_error", f"health check failed: {exc!r}")))
            if up and self._want_workflows and not self._stop.is_set():
                self._want_workflows = False
                fetched_at = time.monotonic()
                try:
                    self.results.put(("workflows", self.client.workflows()))
                except TDComfyError as exc:
                    self._want_workflows = True
                    self.results.put(("workflows_failed", exc))
            self._wake.wait(self.interval if up else 1.0)
            self._wake.clear()


class _ABPlayer:
    """Two Movie File In TOPs into a Cross TOP: a new clip is shown only once it is fully pre-read."""

    def __init__(self, movies: tuple[Any, Any], cross: Any, preload_timeout: float = 10.0) -> None:
        self.movies = movies
        self.cross = cross
        self.preload_timeout = preload_timeout
        self.live = 1 if float(cross.par.cross.eval()) >= 0.5 else 0
        self.live_path: str | None = None
        self.pending_path: str | None = None
        self.pending_since = 0.0
        self.fading_from: int | None = None
        self.last_error: str | None = None
        self.swaps = 0

    def load(self, path: str) -> None:
        if self.fading_from is not None:
            self._finish_fade()  # the player fading out is about to get the new file: cut to the end
        movie = self.movies[1 - self.live]
        movie.par.play = False  # hold the first frame while hidden
        movie.par.file = path
        movie.preload(0)
        self.pending_path = path
        self.pending_since = time.monotonic()

    def update(self, fade_frames: int) -> bool:
        """Every frame: advances a fade, switches to a pending clip once ready; True on a switch."""
        if self.fading_from is not None:
            self._fade_step(fade_frames)
        if self.pending_path is None:
            return False
        movie = self.movies[1 - self.live]
        if movie.isInvalid:
            self.last_error = f"cannot open {self.pending_path}"
            self.pending_path = None
            return False
        waited = time.monotonic() - self.pending_since
        if not (movie.isFullyPreRead or (waited > self.preload_timeout and movie.isOpen)):
            return False
        if self.fading_from is not None:  # a fade still running: finish it first
            self._finish_fade()
        movie.par.cuepulse.pulse()  # start from the cue point (the first frame)
        movie.par.play = True
        self.fading_from = self.live
        self.live = 1 - self.live
        self.live_path, self.pending_path = self.pending_path, None
        self.last_error = None
        self.swaps += 1
        self._fade_step(fade_frames)
        return True

    def _fade_step(self, fade_frames: int) -> None:
        target = float(self.live)
        current = float(self.cross.par.cross.eval())
        step = 1.0 if fade_frames <= 0 else 1.0 / fade_frames
        value = min(target, current + step) if target > current else max(target, current - step)
        self.cross.par.cross = value
        if value == target:
            self._finish_fade()

    def _finish_fade(self) -> None:
        self.cross.par.cross = float(self.live)
        old = self.movies[self.fading_from]
        old.par.play = False
        # Let go of the old file, so the pipeline may delete it (Windows locks open files): with
        # its File still set, a Movie File In would open it again at its next cook.
        old.unload()
        old.par.file = ""
        self.fading_from = None


def _menu_value(par: Any) -> str:
    """A menu parameter's current item name. ``Par.eval()`` gives it (Par_Class), but the name at
    ``menuIndex`` in ``menuNames`` is what the menu shows, whatever ``eval()`` returns in a build."""
    value = par.eval()
    names = list(par.menuNames or [])
    if isinstance(value, str) and (not names or value in names):
        return value
    try:
        index = int(par.menuIndex)
    except (TypeError, ValueError):
        return str(value)
    return names[index] if 0 <= index < len(names) else str(value)


class TDComfyExt:
    """The extension of the tdcomfy component (``build_component``); main thread only.

    It owns a ``FramePipeline`` and a ``_Monitor``; ``Frame()`` (the component's Execute DAT calls
    it every frame) pumps the pipeline, applies what the monitor found, plays results, captures the
    input TOP when a frame will be sent (``Active`` and room in the pipeline, or ``Send``), and
    updates the info DAT and CHOP only when something changed. Network and disk work happen on the
    pipeline's and the monitor's threads. Errors go to the COMP (``addScriptError``), the info
    DAT/CHOP and the ``onError`` callback, not only the Textport.
    """

    def __init__(self, ownerComp: Any) -> None:  # noqa: N803 - TouchDesigner's name
        self.ownerComp = ownerComp
        # Kept in the COMP's storage (saved with the .toe), so latest mode and Dedupe go on with the
        # same stream after a re-init or a reload.
        self.stream = ownerComp.fetch("tdcomfy_stream", None, search=False)
        if not isinstance(self.stream, str) or not self.stream:
            self.stream = f"td-{uuid.uuid4().hex[:16]}"
            ownerComp.store("tdcomfy_stream", self.stream)
        # Per TD process too: two TouchDesigners on one machine may have a component at the same path.
        self.output_dir = os.path.join(_tempdir(), "tdcomfy", f"{_safe_folder(str(ownerComp.path))}-{os.getpid()}")
        self.pipeline: FramePipeline | None = None
        self.monitor: _Monitor | None = None
        self.workflows: dict | None = None  # the last GET /workflows answer
        self.player = _ABPlayer((ownerComp.op("moviefilein_a"), ownerComp.op("moviefilein_b")),
                                ownerComp.op("result_cross"))
        self.connected: bool | None = None
        self.info = {"state": "idle", "progress": 0.0, "queue_position": -1, "frames_done": 0,
                     "last_latency": 0.0, "last_error": "", "in_flight": 0, "connected": 0}
        self._info_dirty = True
        self._sent_at: dict[int, float] = {}
        self._unstarted: dict[int, float] = {}  # ticket -> when sent, until its job starts or ends
        self._paused_until = 0.0
        self._error_shown = False
        self._closed = False
        self._settings: tuple | None = None
        self._start()

    # -- lifecycle --------------------------------------------------------------------------------

    def onInitTD(self) -> None:  # noqa: N802 - TouchDesigner 2025 calls it after initialization
        return

    def onDestroyTD(self) -> None:  # noqa: N802 - TouchDesigner 2025: extension re-init or destroy
        self.Close()

    def __delTD__(self) -> None:  # noqa: N807 - TouchDesigner 2023's name for the same hook
        self.Close()

    def Close(self) -> None:  # noqa: N802 - promoted
        """Stops the pipeline and the monitor without waiting (their threads end by themselves)."""
        self._closed = True
        if self.pipeline is not None:
            self.pipeline.close()
        if self.monitor is not None:
            self.monitor.stop()

    def _pipeline_settings(self) -> tuple:
        par = self.ownerComp.par
        return (str(par.Url.eval()).strip(), str(par.Token.eval()).strip() or None)

    def _start(self) -> None:
        """(Re)creates the pipeline and the monitor for the current Url and Token."""
        if self.pipeline is not None:
            self.pipeline.close()
        if self.monitor is not None:
            self.monitor.stop()
        self._closed = False
        self._sent_at.clear()  # the old pipeline's tickets end with it
        self._unstarted.clear()
        self._settings = self._pipeline_settings()
        url, token = self._settings
        try:
            # previews=True starts the preview downloader; whether a job asks for previews is the
            # Preview toggle at the time its frame is sent (SendFrame), so toggling needs no restart.
            # cancel_on_close: frames of a component that is closed (TD quits, Url/Token change,
            # re-init) are nobody's any more; their jobs would hold the GPU for nothing.
            self.pipeline = FramePipeline(url, token=token, output_dir=self.output_dir, keep_results=4,
                                          stream=self.stream, previews=True, cancel_on_close=True)
            self.monitor = _Monitor(TDComfyClient(url, token=token, timeout=3.0))
        except ValueError as exc:  # a Url that is not an http(s) URL
            self.pipeline = self.monitor = None
            self._show_error("bad_url", f"Url: {exc}")
            return
        self._apply_mode()

    def _apply_mode(self) -> None:
        """Mode, Maxinflight and Dedupe are plain pipeline attributes: changed in place."""
        if self.pipeline is None:
            return
        par = self.ownerComp.par
        mode = _menu_value(par.Mode)
        self.pipeline.max_in_flight = 1 if mode == "one" else max(1, int(par.Maxinflight.eval()))
        self.pipeline.mode = "latest" if mode == "latest" else None
        self.pipeline.dedupe = bool(par.Dedupe.eval())

    # -- called by the component's DATs -----------------------------------------------------------

    def Frame(self, frame: Any = None) -> None:  # noqa: N802 - promoted; the Execute DAT's onFrameStart
        if self._closed:
            return
        if self.monitor is not None:
            self._drain_monitor()
        if self.pipeline is not None:
            # Bounded per frame: after a stall, a backlog (with the user's callbacks) spreads over
            # frames instead of freezing one.
            for event in self.pipeline.pump(max_events=64):
                self._handle(event)
        self.player.update(int(self.ownerComp.par.Fadeframes.eval()))
        if self.player.last_error:
            self._show_error("playback", self.player.last_error)
            self.player.last_error = None
        if (self.pipeline is not None and self.connected and self.ownerComp.par.Active.eval()
                and time.monotonic() >= self._paused_until and self.pipeline.is_ready_for_next()
                and self._fresh_frame_wanted()):
            self.SendFrame()
        if self.pipeline is not None:
            in_flight = self.pipeline.in_flight + self.pipeline.waiting
            if in_flight != self.info["in_flight"]:
                self._set_info(in_flight=in_flight)
        if self._info_dirty:
            self._publish_info()

    def _fresh_frame_wanted(self) -> bool:
        """Latest mode: a new frame only when none of ours waits to start, or the one waiting is
        older than _LATEST_REFRESH (it is then stale and the new one supersedes it). Without this,
        every free slot a supersede opens would cost a capture and an upload on every frame."""
        if self.pipeline.mode != "latest":
            return True
        now = time.monotonic()
        return all(now - sent >= _LATEST_REFRESH for sent in self._unstarted.values())

    def OnParChange(self, par: Any) -> None:  # noqa: N802 - the Parameter Execute DAT's onValueChange
        name = par.name
        if name in ("Url", "Token"):
            if self._pipeline_settings() != self._settings:
                self._start()
        elif name in ("Mode", "Maxinflight", "Dedupe"):
            self._apply_mode()
        elif name == "Workflow":
            self._build_workflow_page()

    def OnPulse(self, par: Any) -> None:  # noqa: N802 - the Parameter Execute DAT's onPulse
        name = par.name
        if name == "Refresh" and self.monitor is not None:
            self.monitor.refresh()
        elif name == "Send":
            self.SendFrame()
        elif name == "Cancel" and self.pipeline is not None:
            self.pipeline.cancel_all()

    def SendFrame(self) -> int | None:  # noqa: N802 - promoted
        """Captures the input TOP (JPEG, or PNG) and submits it; the ticket, or None when it was not sent.

        Nothing is captured when the pipeline has no room (the frame would be skipped anyway).
        """
        if self.pipeline is None or not self.pipeline.is_ready_for_next():
            return None
        par = self.ownerComp.par
        top = self.ownerComp.op("in1")
        try:
            if _menu_value(par.Captureformat) == "png":
                image = top_to_png_bytes(top)
            else:
                image = top_to_jpeg_bytes(top, float(par.Jpegquality.eval()))
        except TDComfyError as exc:
            self._fail_locally(exc)
            return None
        workflow = _menu_value(par.Workflow) or None
        if workflow != self.ownerComp.fetch("tdcomfy_page_workflow", None, search=False):
            # Workflow changed this frame and its onValueChange has not run yet: the page must
            # match the workflow before its values are sent.
            self._build_workflow_page()
        seed = int(par.Seed.eval())
        ticket = self.pipeline.submit(image, prompt=str(par.Prompt.eval()), negative_prompt=str(par.Negative.eval()),
                                      seed=seed, workflow=workflow, params=self.WorkflowParams(),
                                      previews=bool(par.Preview.eval()))
        if ticket is not None:
            self._sent_at[ticket] = self._unstarted[ticket] = time.monotonic()
            self._set_info(state="sending")
        return ticket

    def WorkflowParams(self) -> dict:  # noqa: N802 - promoted
        """The Workflow page's values as the broker's ``params`` (schema names and JSON types)."""
        params = {}
        par = self.ownerComp.par
        for td_name, (schema_name, kind, choices) in (self.ownerComp.fetch(_STORE_PARS, {}, search=False)).items():
            p = getattr(par, td_name, None)
            if p is None:
                continue
            params[schema_name] = _json_value(kind, p.eval(), choices)
        return params

    def InfoChannels(self) -> list[tuple[str, float]]:  # noqa: N802 - the info CHOP's onCook
        info = self.info
        return [
            ("state", float(_STATE_CODES.get(info["state"], 0))),
            ("progress", float(info["progress"])),
            ("queue_position", float(info["queue_position"])),
            ("frames_done", float(info["frames_done"])),
            ("last_latency", float(info["last_latency"])),
            ("error", 1.0 if info["last_error"] else 0.0),
            ("connected", float(info["connected"])),
            ("in_flight", float(info["in_flight"])),
        ]

    # -- internals --------------------------------------------------------------------------------

    def _drain_monitor(self) -> None:
        while True:
            try:
                kind, value = self.monitor.results.get_nowait()
            except queue.Empty:
                return
            if kind == "up":
                if self.connected is not True:
                    self.connected = True
                    if self.info["state"] == "offline":
                        self._set_info(state="idle")
                    if self._error_shown and self.info.get("error_code") in ("connection_error", "timeout"):
                        self._clear_error()
                    self._set_info(connected=1)
            elif kind == "down":
                if self.connected is not False:
                    self.connected = False
                    self._set_info(state="offline", connected=0)
                    self._report_error(value.code, f"broker unreachable: {value.message}")
            elif kind == "workflows":
                self.workflows = value
                self._fill_workflow_menu()
                self._build_workflow_page()
            elif kind == "workflows_failed":
                self._report_error(value.code, f"GET /workflows failed: {value.message}")

    def _fill_workflow_menu(self) -> None:
        par = self.ownerComp.par.Workflow
        entries = self.workflows.get("workflows") if isinstance(self.workflows, dict) else None
        if not isinstance(entries, list):
            return
        names, labels = [], []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                continue
            names.append(entry["name"])
            ready = entry.get("ready")
            note = {True: " (ready)", False: " (not ready)"}.get(ready, "")
            labels.append(entry["name"] + (" [default]" if entry.get("is_default") else "") + note)
        if list(par.menuNames) != names or list(par.menuLabels) != labels:
            par.menuNames = names
            par.menuLabels = labels
        if names and str(par.eval()) not in names:
            default = self.workflows.get("default")
            par.val = default if default in names else names[0]

    def _schema(self, workflow: str) -> list[dict] | None:
        entries = self.workflows.get("workflows") if isinstance(self.workflows, dict) else None
        for entry in entries or []:
            if isinstance(entry, dict) and entry.get("name") == workflow:
                params = entry.get("parameters")
                return [p for p in params if isinstance(p, dict)] if isinstance(params, list) else []
        return None

    def _build_workflow_page(self) -> None:
        """Rebuilds the Workflow page from the selected workflow's schema, keeping values by name."""
        comp = self.ownerComp
        workflow = _menu_value(comp.par.Workflow)
        schema = self._schema(workflow)
        if schema is None:
            return  # not known yet (no answer from the broker): keep the page as it is
        wanted = [p for p in schema if p.get("type") != "image" and p.get("name") not in _PAGE_FIELDS]
        signature = json.dumps([workflow, wanted], sort_keys=True, default=str)
        if comp.fetch(_STORE_SIGNATURE, None, search=False) == signature:
            return
        # What the user set, by schema name: this page's current values, then what each workflow
        # had when it was last shown, so a switch away and back loses nothing.
        remembered = dict(comp.fetch(_STORE_VALUES, {}, search=False))
        current = {}
        old_pars = comp.fetch(_STORE_PARS, {}, search=False)
        old_workflow = comp.fetch("tdcomfy_page_workflow", None, search=False)
        for td_name, (schema_name, kind, choices) in old_pars.items():
            p = getattr(comp.par, td_name, None)
            if p is not None:
                state = _par_state(p)
                current[schema_name] = state if isinstance(state, dict) else _json_value(kind, state, choices)
        if old_workflow is not None:
            remembered[old_workflow] = current
        # Values belong to their workflow: a rebuild of the same one keeps the page's values, a
        # switch takes what the new one had when last shown, else its defaults.
        carried = dict(remembered.get(workflow, {}))
        if old_workflow == workflow:
            carried.update(current)
        for page in list(comp.customPages):
            if page.name == "Workflow":
                page.destroy()
        mapping = {}
        if wanted:
            page = comp.appendCustomPage("Workflow")
            taken = {name for name, *_ in _COMPONENT_PARS}
            for spec in wanted:
                schema_name = str(spec.get("name"))
                td_name = _td_name(schema_name)
                base, n = td_name, 2
                while td_name in taken:
                    td_name, n = f"{base}{n}", n + 1
                taken.add(td_name)
                kind, choices = _par_kind(spec)
                par = self._append_schema_par(page, td_name, spec, kind, choices)
                value = carried.get(schema_name, spec.get("default"))
                _set_par_value(par, kind, spec.get("default"), spec.get("default"))
                if isinstance(value, dict) and "expr" in value:
                    par.expr = value["expr"]
                else:
                    _set_par_value(par, kind, value, spec.get("default"))
                mapping[td_name] = [schema_name, kind, choices]
        comp.store(_STORE_PARS, mapping)
        comp.store(_STORE_VALUES, remembered)
        comp.store(_STORE_SIGNATURE, signature)
        comp.store("tdcomfy_page_workflow", workflow)

    @staticmethod
    def _append_schema_par(page: Any, td_name: str, spec: dict, kind: str, choices: list | None) -> Any:
        label = _label(spec.get("name"))
        if kind == "menu":
            par = page.appendMenu(td_name, label=label)[0]
            par.menuNames = [str(c) for c in choices]
            par.menuLabels = [str(c) for c in choices]
        elif kind == "toggle":
            par = page.appendToggle(td_name, label=label)[0]
        elif kind in ("int", "float"):
            par = (page.appendInt if kind == "int" else page.appendFloat)(td_name, label=label)[0]
            low, high = spec.get("min"), spec.get("max")
            if kind == "int":
                low = None if low is None else max(-_INT_LIMIT, min(_INT_LIMIT, int(low)))
                high = None if high is None else max(-_INT_LIMIT, min(_INT_LIMIT, int(high)))
            if isinstance(low, (int, float)):
                par.min, par.normMin, par.clampMin = low, low, True
            if isinstance(high, (int, float)):
                par.max, par.clampMax = high, True
                # A slider over 0..16384 is useless: its range ends at a few times the default.
                default = spec.get("default")
                norm = high
                if isinstance(default, (int, float)) and default > 0:
                    norm = min(high, default * 4)
                par.normMax = norm
        else:
            par = page.appendStr(td_name, label=label)[0]
        description = spec.get("description")
        if isinstance(description, str) and description:
            try:
                par.help = description
            except Exception:  # noqa: BLE001 - Par_Class lists `help` as read only yet says it can be set
                pass
        return par

    def _handle(self, event: PipelineEvent) -> None:
        job = event.job if isinstance(event.job, dict) else {}
        info = {"kind": event.kind, "ticket": event.ticket, "job_id": event.job_id, "path": event.path,
                "progress": event.progress, "queue_position": job.get("queue_position"),
                "error": None, "error_code": None, "cancel_reason": event.cancel_reason,
                "latency": None, "job": event.job}
        if event.kind not in ("submitted", "progress", "preview"):
            self._unstarted.pop(event.ticket, None)  # started, or over
        if event.kind == "submitted":
            position = job.get("queue_position")
            self._set_info(state="queued", progress=0.0,
                           queue_position=position if isinstance(position, int) else -1)
            self._callback("onQueued", info)
        elif event.kind == "started":
            self._set_info(state="running", queue_position=-1)
            self._callback("onStarted", info)
        elif event.kind == "progress":
            self._set_info(state="running", progress=float(event.progress or 0.0))
            self._callback("onProgress", info)
        elif event.kind == "preview":
            self.ownerComp.op("preview_movie").par.file = event.path
            self._callback("onPreview", info)
        elif event.kind == "done":
            sent = self._sent_at.pop(event.ticket, None)
            latency = time.monotonic() - sent if sent is not None else 0.0
            info["latency"] = latency
            self.player.load(event.path)
            self._set_info(state="done", progress=1.0, queue_position=-1,
                           frames_done=self.info["frames_done"] + 1, last_latency=round(latency, 3))
            if self._error_shown:
                self._clear_error()
            self._callback("onDone", info)
        elif event.kind == "error":
            self._sent_at.pop(event.ticket, None)
            error = event.error
            code = error.code if error is not None else "error"
            message = error.message if error is not None else "failed"
            info["error"], info["error_code"] = f"{code}: {message}", code
            self._paused_until = time.monotonic() + _ERROR_PAUSE
            self._show_error(code, message)
            self._callback("onError", info)
        elif event.kind == "cancelled":
            self._sent_at.pop(event.ticket, None)
            self._set_info(state="cancelled", queue_position=-1)
            self._callback("onCancelled", info)
        elif event.kind == "dropped":
            self._sent_at.pop(event.ticket, None)

    def _fail_locally(self, exc: TDComfyError) -> None:
        self._paused_until = time.monotonic() + _ERROR_PAUSE
        self._report_error(exc.code, exc.message)

    def _report_error(self, code: str, message: str) -> None:
        """An error of the component itself (no job): on the COMP and to ``onError``."""
        self._show_error(code, message)
        self._callback("onError", {"kind": "error", "ticket": None, "job_id": None, "path": None,
                                   "progress": None, "queue_position": None, "error": f"{code}: {message}",
                                   "error_code": code, "cancel_reason": None, "latency": None, "job": None})

    def _show_error(self, code: str, message: str) -> None:
        text = f"{code}: {message}"
        if self.info["last_error"] == text and self._error_shown:
            return
        comp = self.ownerComp
        comp.clearScriptErrors()
        comp.addScriptError(f"tdcomfy {text}")
        self._error_shown = True
        self.info["error_code"] = code
        self._set_info(last_error=text, state="offline" if self.connected is False else "error")

    def _clear_error(self) -> None:
        self.ownerComp.clearScriptErrors()
        self._error_shown = False
        self.info["error_code"] = None
        self._set_info(last_error="")

    def _callback(self, name: str, info: dict) -> None:
        dat = self.ownerComp.op("callbacks")
        if dat is None:
            return
        try:
            function = getattr(dat.module, name, None)
            if function is not None:
                function(self.ownerComp, info)
        except Exception as exc:  # noqa: BLE001 - a user's callback must not stop the component
            self._show_error("callback_failed", f"{name}: {exc!r}")

    def _set_info(self, **values: Any) -> None:
        for key, value in values.items():
            if self.info.get(key) != value:
                self.info[key] = value
                self._info_dirty = True

    def _publish_info(self) -> None:
        self._info_dirty = False
        table = self.ownerComp.op("info")
        if table is not None:
            table.clear()
            for key in ("state", "progress", "queue_position", "frames_done", "last_latency", "last_error",
                        "in_flight", "connected"):
                table.appendRow([key, self.info[key]])
        chop = self.ownerComp.op("info_chop")
        if chop is not None:
            chop.cook(force=True)


def _par_kind(spec: dict) -> tuple[str, list | None]:
    """How a schema parameter becomes a TD parameter: (kind, menu choices)."""
    choices = spec.get("choices")
    if isinstance(choices, list) and choices:
        return "menu", list(choices)
    return {"integer": "int", "number": "float", "boolean": "toggle"}.get(spec.get("type"), "str"), None


def _par_state(par: Any) -> Any:
    """What a rebuild keeps of a parameter: ``{"expr": …}`` when it is in expression mode, else its value.

    ``Par.mode`` is a ``ParMode`` member (https://docs.derivative.ca/Par_Class); its name is read
    whether it prints as ``EXPRESSION`` or ``ParMode.EXPRESSION``.
    """
    mode = par.mode
    if str(getattr(mode, "name", mode)).endswith("EXPRESSION") and par.expr:
        return {"expr": str(par.expr)}
    return par.eval()


def _json_value(kind: str, value: Any, choices: list | None = None) -> Any:
    if kind == "menu" and choices:
        # A menu holds names (strings): send the choice itself, with its JSON type.
        return next((c for c in choices if str(c) == str(value)), str(value))
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "toggle":
        return bool(value)
    return str(value)


def _set_par_value(par: Any, kind: str, value: Any, default: Any) -> None:
    """Sets a new parameter's default and value; a kept value that no longer fits gives way to the default."""
    convert = str if kind == "menu" else functools.partial(_json_value, kind)
    if default is not None:
        try:
            par.default = convert(default)
        except (TypeError, ValueError):
            pass
    try:
        par.val = convert(value)
    except (TypeError, ValueError):
        if default is not None:
            par.val = convert(default)


def _safe_folder(path: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in path.strip("/")) or "root"
