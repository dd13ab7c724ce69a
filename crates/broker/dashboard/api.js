// The broker's HTTP API as the dashboard uses it: the token (asked once, kept in sessionStorage),
// JSON calls, downloads that need the token turned into blob: URLs, and the event stream.

const TOKEN_KEY = "tdcomfy.token";

/** The token this tab was given, or "" (a broker without API_TOKEN needs none). */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** An error answer of the broker: `{error: {code, message, field, limit}}`. */
export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || "http_" + status;
    this.field = e.field || null;
  }
}

let askForToken = async () => false;

/**
 * Sets what is called when the broker answers 401: it shows the token form and resolves true once
 * a new token is stored (the call is then made again), false to give up.
 */
export function onUnauthorized(fn) {
  askForToken = fn;
}

/** A call to the broker with the token; a 401 asks for the token and tries again. */
export async function call(path, init = {}) {
  for (;;) {
    const headers = new Headers(init.headers || {});
    if (token()) headers.set("Authorization", "Bearer " + token());
    const resp = await fetch(path, { ...init, headers });
    if (resp.status === 401) {
      const body = await resp.json().catch(() => null);
      if (await askForToken(new ApiError(401, body))) continue;
    }
    if (!resp.ok) {
      const body = await resp.json().catch(() => null);
      throw new ApiError(resp.status, body);
    }
    return resp;
  }
}

export async function json(path, init) {
  return (await call(path, init)).json();
}

/**
 * A URL an <img> or <video> can load for `path`. Without a token it is the path itself, so the
 * browser streams it (with Range requests for video); with one, media elements cannot send the
 * header, so the bytes are fetched with it and handed over as a blob: URL (revoke it when done).
 */
export async function mediaUrl(path, { fresh = false } = {}) {
  if (!token() && !fresh) return { url: path, revoke() {} };
  const resp = await call(path, { cache: fresh ? "no-store" : "default" });
  const url = URL.createObjectURL(await resp.blob());
  return { url, revoke: () => URL.revokeObjectURL(url) };
}

/**
 * Follows `/events` (EventSource, which resumes with Last-Event-ID by itself). `handlers` gets
 * `job(eventName, JobEvent)`, `preview(PreviewEvent)`, `resync()`, `state(open)`.
 */
export function follow(handlers) {
  // Batched: a person cannot tell 200 ms, and the broker then writes to each open page five
  // times a second at most, however many events there are.
  const q = "?batch_ms=200" + (token() ? "&token=" + encodeURIComponent(token()) : "");
  const es = new EventSource("/events" + q);
  for (const name of ["queued", "started", "progress", "done", "error", "cancelled", "deleted"]) {
    es.addEventListener(name, (m) => handlers.job(name, JSON.parse(m.data)));
  }
  es.addEventListener("preview", (m) => handlers.preview(JSON.parse(m.data)));
  es.addEventListener("resync", () => handlers.resync());
  es.onopen = () => handlers.state(true);
  es.onerror = () => handlers.state(false);
  return es;
}
