// Building the page: a tiny element helper, job cards updated in place (so a playing video or a
// preview is never rebuilt by an unrelated change), and the workers / servers tables.

/** `h("div", {class: "x", onclick: f}, child, "text")`. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Input frames and results are loaded one at a time, newest card first, at most one every
 * MEDIA_SPACING ms, skipping cards no longer on the page: at 20 jobs/s a page would otherwise
 * download every frame and clip, and fifty open pages would cost the broker more than the jobs.
 */
const MEDIA_SPACING = 1000;
const mediaWanted = [];
let mediaBusy = false;
let mediaLast = -Infinity;

function wantMedia(card, kind) {
  mediaWanted.push({ card, kind });
  pumpMedia();
}

async function pumpMedia() {
  if (mediaBusy) return;
  mediaBusy = true;
  try {
    while (mediaWanted.length) {
      const { card, kind } = mediaWanted.pop(); // the newest request first
      if (!card.el.isConnected) continue;
      const wait = mediaLast + MEDIA_SPACING - performance.now();
      if (wait > 0) await sleep(wait);
      mediaLast = performance.now();
      if (card.el.isConnected) await (kind === "input" ? card.loadInput() : card.loadResult());
    }
  } finally {
    mediaBusy = false;
  }
}

/** Previews of one card are fetched at most this often (the newest wins; the rest are skipped). */
const PREVIEW_SPACING = 500;

export function secs(v) {
  if (v === null || v === undefined) return "–";
  return v < 10 ? v.toFixed(1) + " s" : Math.round(v) + " s";
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

/** The line under a running job's bar: step, node, stage. */
function progressText(p) {
  const parts = [Math.round((p.value || 0) * 100) + "%"];
  if (p.step != null && p.max_steps) parts.push(`step ${p.step}/${p.max_steps}`);
  if (p.node_type) parts.push(p.node_type);
  if (p.stage) parts.push(p.stage);
  return parts.join(" · ");
}

/**
 * One job's card. `actions` has `cancel(job)`, `retry(job)`, `media(path, opts)` (→ {url, revoke})
 * and `report(error)`.
 */
export class JobCard {
  constructor(job, actions) {
    this.actions = actions;
    this.job = null;
    this.inputWanted = false;
    this.resultWanted = false;
    this.previewSeq = 0;
    this.previewBusy = false;
    this.previewWanted = 0;
    this.revokers = [];
    this.el = h("article", { class: "job", dataset: { jobId: job.id } });
    this.thumb = h("img", { class: "input", alt: "input frame" });
    this.title = h("div", { class: "title" });
    this.meta = h("div", { class: "meta" });
    this.bar = h("div", { class: "fill" });
    this.barBox = h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100 }, this.bar);
    this.progress = h("div", { class: "progress-text" });
    this.preview = h("img", { class: "preview", alt: "live preview", hidden: true });
    this.result = h("div", { class: "result" });
    this.error = h("div", { class: "error-text", hidden: true });
    this.buttons = h("div", { class: "buttons" });
    this.el.append(
      h("div", { class: "media" }, this.thumb, this.preview),
      h("div", { class: "body" }, this.title, this.meta, this.barBox, this.progress, this.error, this.result, this.buttons),
    );
    this.update(job);
  }

  update(job) {
    if (this.job && job.version < this.job.version) return;
    const was = this.job && this.job.status;
    this.job = job;
    const s = job.status;
    this.el.className = "job " + s;
    this.el.dataset.status = s;
    const title = [
      h("span", { class: "badge " + s }, s === "queued" && job.queue_position ? `#${job.queue_position}` : s),
      " ",
      h("span", { class: "workflow" }, job.workflow),
    ];
    if (job.stream) title.push(h("span", { class: "stream" }, ` · stream ${job.stream}`));
    this.title.replaceChildren(...title);
    this.title.title = job.id;
    const meta = [job.prompt ? `“${job.prompt.slice(0, 120)}”` : "(no prompt)"];
    if (s === "running" || job.processing_time != null) meta.push(secs(job.processing_time));
    if (job.attempts > 1) meta.push(`attempt ${job.attempts}`);
    if (job.waiting_reason) meta.push(job.waiting_reason);
    if (job.cancel_reason === "superseded") meta.push("superseded");
    if (job.reused_from) meta.push("reused result");
    this.meta.textContent = meta.join(" · ");
    const running = s === "running";
    this.barBox.hidden = !running;
    this.progress.hidden = !running;
    if (running) {
      const pct = Math.round((job.progress.value || 0) * 100);
      this.bar.style.width = pct + "%";
      this.barBox.setAttribute("aria-valuenow", pct);
      this.progress.textContent = progressText(job.progress);
    }
    if (!running) this.preview.hidden = true;
    this.error.hidden = !(s === "error" && job.error_message);
    this.error.textContent = s === "error" ? job.error_message || "" : "";
    this.renderButtons();
    // A queued card's frame waits until it runs: queued cards come and go fastest.
    if (!this.inputWanted && s !== "cancelled" && s !== "queued") {
      this.inputWanted = true;
      wantMedia(this, "input");
    }
    if (s === "done" && job.has_result && !this.resultWanted) {
      this.resultWanted = true;
      wantMedia(this, "result");
    }
    if (s === "done" && !job.has_result && was === "done") this.result.replaceChildren(h("span", { class: "meta" }, "result deleted"));
  }

  renderButtons() {
    const s = this.job.status;
    const btns = [];
    if (s === "queued" || s === "running") {
      btns.push(h("button", { class: "cancel", onclick: () => this.actions.cancel(this.job) }, "Cancel"));
    }
    if (s === "error" || s === "cancelled" || s === "done") {
      btns.push(h("button", { class: "retry", onclick: () => this.actions.retry(this.job) }, "Retry"));
    }
    if (s === "done" && this.job.has_result) {
      btns.push(h("a", { class: "download", href: "#", onclick: (e) => this.download(e) }, "Download"));
    }
    this.buttons.replaceChildren(...btns);
  }

  /** Shows a new queue position (positions move without an event of this job). */
  setPosition(position) {
    if (this.job.status !== "queued" || this.job.queue_position === position) return;
    this.job = { ...this.job, queue_position: position };
    const badge = this.title.querySelector(".badge");
    if (badge) badge.textContent = `#${position}`;
  }

  async loadInput() {
    try {
      const m = await this.actions.media(`/jobs/${this.job.id}/input`);
      this.revokers.push(m.revoke);
      this.thumb.src = m.url;
    } catch (e) {
      this.thumb.hidden = true;
    }
  }

  async loadResult() {
    const info = this.job.result || { content_type: "" };
    try {
      const m = await this.actions.media(`/jobs/${this.job.id}/result`);
      this.revokers.push(m.revoke);
      let el;
      if (info.content_type.startsWith("video/")) {
        // Muted, so browsers let it play on its own; looped, as TouchDesigner plays it.
        el = h("video", { src: m.url, controls: true, muted: true, autoplay: true, loop: true, playsinline: true, preload: "auto" });
        el.muted = true;
      } else {
        el = h("img", { src: m.url, alt: "result" });
      }
      this.result.replaceChildren(el, h("div", { class: "meta" }, `${info.content_type} · ${bytes(info.size)}`));
    } catch (e) {
      this.result.replaceChildren(h("span", { class: "meta" }, "result: " + e.message));
    }
  }

  async download(e) {
    e.preventDefault();
    try {
      const m = await this.actions.media(`/jobs/${this.job.id}/result`, { fresh: true });
      const a = h("a", { href: m.url, download: `${this.job.id}` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(m.revoke, 60_000);
    } catch (err) {
      this.actions.report(err);
    }
  }

  /** A `preview` event: fetch the newest image, one download at a time, skipping stale ones. */
  async showPreview(seq) {
    if (seq <= this.previewSeq) return;
    this.previewWanted = Math.max(this.previewWanted, seq);
    if (this.previewBusy) return;
    this.previewBusy = true;
    try {
      while (this.previewWanted > this.previewSeq && this.job.status === "running") {
        const wait = (this.previewAt || -Infinity) + PREVIEW_SPACING - performance.now();
        if (wait > 0) await sleep(wait);
        this.previewAt = performance.now();
        const want = this.previewWanted;
        const m = await this.actions.media(`/jobs/${this.job.id}/preview`, { fresh: true });
        if (this.job.status !== "running") {
          m.revoke();
          break;
        }
        const old = this.previewRevoke;
        this.preview.src = m.url;
        this.previewRevoke = m.revoke;
        this.preview.hidden = false;
        this.preview.dataset.seq = want;
        if (old) this.preview.addEventListener("load", old, { once: true });
        this.previewSeq = want;
      }
    } catch (e) {
      // A preview that is gone (the job ended) is no error worth showing.
    } finally {
      this.previewBusy = false;
    }
  }

  dispose() {
    this.revokers.forEach((r) => r());
    if (this.previewRevoke) this.previewRevoke();
    this.el.remove();
  }
}

function ago(ms) {
  return ms < 1000 ? "now" : secs(ms / 1000) + " ago";
}

/** A device as the worker reports it (ComfyUI's `/system_stats`): name and VRAM. */
function device(d) {
  if (!d || typeof d !== "object") return String(d);
  const name = d.name || d.type || "device";
  const total = d.vram_total ?? d.vram_total_bytes;
  const free = d.vram_free ?? d.vram_free_bytes;
  const vram = total ? ` · ${bytes(total - (free || 0))} / ${bytes(total)} VRAM used` : "";
  return name + vram;
}

/** Workers from `/health` (fields the broker does not send are left out). */
export function workersTable(workers) {
  if (!workers.length) return h("p", { class: "empty" }, "No worker connected.");
  return h(
    "table",
    { class: "workers" },
    h("thead", {}, h("tr", {}, ["Worker", "Server", "State", "Job", "Prefetched", "Last workflow", "GPU", "Seen"].map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      workers.map((w) =>
        h(
          "tr",
          { dataset: { worker: w.id } },
          h("td", {}, w.id),
          h("td", {}, w.server ?? "–"),
          h("td", {}, w.state ?? (w.job_id ? "running" : "idle")),
          h("td", { class: "mono" }, w.job_id ? w.job_id.slice(0, 8) : "–"),
          h("td", {}, Array.isArray(w.prefetched_jobs) ? w.prefetched_jobs.length : w.prefetched_jobs ?? "–"),
          h("td", {}, w.last_workflow ?? "–"),
          h("td", {}, Array.isArray(w.devices) && w.devices.length ? w.devices.map(device).join("; ") : "–"),
          h("td", {}, ago(w.last_seen_ms_ago)),
        ),
      ),
    ),
  );
}

/** ComfyUI servers and what each can run, from `/workflows` readiness. */
export function serversTable(workflows) {
  const servers = new Map();
  for (const wf of workflows) {
    for (const r of wf.readiness || []) {
      const s = servers.get(r.server) || { server: r.server, worker: r.worker, reachable: r.reachable, ready: [], missing: [] };
      s.reachable = s.reachable && r.reachable;
      (r.ready ? s.ready : s.missing).push(r.ready ? wf.name : `${wf.name}: ${(r.problems || []).join("; ") || "not ready"}`);
      servers.set(r.server, s);
    }
  }
  if (!servers.size) return h("p", { class: "empty" }, "No ComfyUI server reported yet.");
  return h(
    "table",
    { class: "servers" },
    h("thead", {}, h("tr", {}, ["Server", "Worker", "Up", "Can run", "Cannot run"].map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      [...servers.values()].map((s) =>
        h(
          "tr",
          {},
          h("td", { class: "mono" }, s.server),
          h("td", {}, s.worker),
          h("td", {}, h("span", { class: "badge " + (s.reachable ? "done" : "error") }, s.reachable ? "up" : "down")),
          h("td", {}, s.ready.join(", ") || "–"),
          h("td", { class: "problems" }, s.missing.join(" | ") || "–"),
        ),
      ),
    ),
  );
}
