// The dashboard: the broker's jobs live over /events, workers and servers from /health and
// /workflows, and a form to submit a frame with a workflow's parameters.

import * as api from "./api.js";
import { JobCard, h, serversTable, workersTable } from "./view.js";

const RECENT = 20;
const $ = (sel) => document.querySelector(sel);

const cards = new Map(); // job id → JobCard
let workflows = [];
let es = null;

// ---- errors -------------------------------------------------------------------------------------

function report(err) {
  const msg = err && err.message ? err.message : String(err);
  const item = h("li", {}, h("time", {}, new Date().toLocaleTimeString()), " ", msg, err && err.field ? ` (field ${err.field})` : "");
  const list = $("#errors");
  list.prepend(item);
  while (list.children.length > 8) list.lastChild.remove();
  $("#errors-box").hidden = false;
}

// ---- token --------------------------------------------------------------------------------------

let tokenWaiters = null;

/** Shows the token form; resolves true when a token was entered. One form for all callers. */
function askToken(err) {
  const dlg = $("#token-dialog");
  $("#token-reason").textContent = api.token()
    ? "The broker refused this token: " + err.message
    : "This broker needs its API token (API_TOKEN). It is kept for this tab only.";
  if (!tokenWaiters) {
    tokenWaiters = [];
    dlg.hidden = false;
    $("#token-input").focus();
  }
  return new Promise((resolve) => tokenWaiters.push(resolve));
}

function tokenEntered(value) {
  api.setToken(value.trim());
  $("#token-dialog").hidden = true;
  const waiters = tokenWaiters || [];
  tokenWaiters = null;
  waiters.forEach((w) => w(true));
  connect(); // the event stream carries the token in its URL: open it again with the new one
}

// ---- jobs ---------------------------------------------------------------------------------------

const actions = {
  report,
  media: api.mediaUrl,
  async cancel(job) {
    try {
      await api.json(`/jobs/${job.id}/cancel`, { method: "POST" });
    } catch (e) {
      report(e);
    }
  },
  async retry(job) {
    try {
      // From the broker, not the browser's cache: a cancelled job's frame is gone there, and the
      // retry should say so rather than run a frame the broker no longer has.
      const frame = await (await api.call(`/jobs/${job.id}/input`, { cache: "no-store" })).blob();
      const form = new FormData();
      form.append("image", frame, "frame");
      form.append("prompt", job.prompt);
      form.append("negative_prompt", job.negative_prompt);
      if (job.seed !== null && job.seed !== undefined) form.append("seed", String(job.seed));
      form.append("workflow", job.workflow);
      if (job.params && Object.keys(job.params).length) form.append("params", JSON.stringify(job.params));
      form.append("previews", String(job.previews !== false));
      await submit(form);
    } catch (e) {
      report(e.status === 410 ? new Error("cannot retry: this job's input frame was deleted") : e);
    }
  },
};

function section(status) {
  if (status === "queued") return $("#queue");
  if (status === "running") return $("#running");
  return $("#recent");
}

/** A job's new state: its card is updated in place and moved only when its section changes. */
function upsert(job) {
  let card = cards.get(job.id);
  if (!card) {
    card = new JobCard(job, actions);
    cards.set(job.id, card);
  } else {
    card.update(job);
  }
  const target = section(card.job.status);
  if (card.el.parentElement !== target) {
    if (target.id === "recent") target.prepend(card.el);
    else target.append(card.el);
  }
  scheduleLayout();
}

let layoutPending = false;
function scheduleLayout() {
  if (layoutPending) return;
  layoutPending = true;
  requestAnimationFrame(() => {
    layoutPending = false;
    layout();
  });
}

/** Orders the queue by position, trims the finished list, updates the counts. */
function layout() {
  const queue = $("#queue");
  const queued = [...queue.children].sort(
    (a, b) => (cards.get(a.dataset.jobId)?.job.queue_position ?? 1e9) - (cards.get(b.dataset.jobId)?.job.queue_position ?? 1e9),
  );
  // Reordered only when the order changed: moving a card is a DOM removal and insertion.
  if (queued.some((el, i) => queue.children[i] !== el)) queue.append(...queued);
  const recent = $("#recent");
  while (recent.children.length > RECENT) {
    const el = recent.lastElementChild;
    cards.get(el.dataset.jobId)?.dispose();
    cards.delete(el.dataset.jobId);
  }
  for (const [id, el] of [["#queue-count", queue], ["#running-count", $("#running")], ["#recent-count", recent]]) {
    $(id).textContent = el.children.length;
  }
  for (const box of [queue, $("#running"), recent]) box.classList.toggle("is-empty", box.children.length === 0);
}

/**
 * Positions are ranks in the claim order: a job leaving the queue moves every later one up by
 * one, a job joining at position p moves those at p and after down by one. The page follows that
 * from the events alone, and re-reads the queue at most every POSITIONS_EVERY ms while it changes
 * (positions are computed as each event is published, so two close changes may be off by one
 * until then).
 */
const POSITIONS_EVERY = 5000;

function shiftPositions(from, by, except) {
  for (const card of cards.values()) {
    const p = card.job.queue_position;
    if (card.job.id === except || card.job.status !== "queued" || !p) continue;
    if (by < 0 ? p > from : p >= from) card.setPosition(p + by);
  }
  scheduleLayout();
}

/** Runs `fn` soon, at most once every `every` ms: calls in between join the pending run. */
function throttled(fn, every) {
  let timer = null;
  let last = -Infinity;
  return () => {
    if (timer) return;
    const wait = Math.max(250, last + every - performance.now());
    timer = setTimeout(async () => {
      timer = null;
      last = performance.now();
      await fn();
    }, wait);
  };
}

const refreshPositionsSoon = throttled(async () => {
  try {
    const list = await api.json("/jobs?status=queued&limit=500");
    for (const job of list.jobs) upsert(job);
  } catch (e) {
    report(e);
  }
}, POSITIONS_EVERY);

async function loadJobs() {
  const [queued, running, recent] = await Promise.all([
    api.json("/jobs?status=queued&limit=500"),
    api.json("/jobs?status=running&limit=500"),
    api.json(`/jobs?limit=${RECENT + 10}`),
  ]);
  const seen = new Set();
  for (const job of [...recent.jobs.reverse(), ...running.jobs, ...queued.jobs]) {
    seen.add(job.id);
    upsert(job);
  }
  // After a resync: jobs that left the lists (deleted by retention) go.
  for (const [id, card] of cards) {
    if (!seen.has(id) && (card.job.status === "queued" || card.job.status === "running")) {
      card.dispose();
      cards.delete(id);
    }
  }
}

// ---- event stream -------------------------------------------------------------------------------

function connect() {
  if (es) es.close();
  es = api.follow({
    job(name, ev) {
      const known = cards.get(ev.job_id);
      const wasQueued = !!known && known.job.status === "queued";
      const isQueued = ev.job.status === "queued";
      if (wasQueued && !isQueued && known.job.queue_position) shiftPositions(known.job.queue_position, -1, ev.job_id);
      if (!wasQueued && isQueued && ev.job.queue_position) shiftPositions(ev.job.queue_position, +1, ev.job_id);
      upsert(ev.job);
      if (wasQueued !== isQueued) refreshPositionsSoon();
      if (name !== "progress") refreshHealthSoon();
    },
    preview(p) {
      cards.get(p.job_id)?.showPreview(p.seq);
    },
    resync() {
      loadJobs().catch(report);
    },
    state(open) {
      const el = $("#live");
      el.textContent = open ? "live" : "reconnecting…";
      el.className = open ? "live" : "down";
      if (open) loadJobs().catch(report);
    },
  });
}

// ---- workers, servers, workflows ----------------------------------------------------------------

/**
 * The counts and the workers' jobs change with job events, workers come and go without any:
 * /health is read again after a change and every 2 s, at most once per 2 s in all.
 */
const refreshHealthSoon = throttled(() => pollHealth(), 2000);

async function pollHealth() {
  try {
    const health = await (await fetch("/health")).json();
    $("#workers").replaceChildren(workersTable(health.workers || []));
    $("#health-counts").textContent = `${health.queued} queued · ${health.running} running · ${health.done} done · ${health.error} failed · ${health.cancelled} cancelled`;
  } catch (e) {
    $("#health-counts").textContent = "broker unreachable";
  }
}

async function pollWorkflows() {
  try {
    const list = await api.json("/workflows");
    workflows = list.workflows;
    $("#servers").replaceChildren(serversTable(workflows));
    fillWorkflowSelect(list.default);
  } catch (e) {
    report(e);
  }
}

// ---- submit form --------------------------------------------------------------------------------

/** Parameters with fields of their own in the form (and in POST /jobs). */
const DEDICATED = { image: null, prompt: "prompt", negative: "negative_prompt", seed: "seed" };

function fillWorkflowSelect(defaultName) {
  const select = $("#workflow");
  const current = select.value || defaultName;
  const options = workflows.map((wf) => {
    const mark = wf.ready === false ? " (no server can run it)" : wf.ready === null ? "" : " ✓";
    return h("option", { value: wf.name, selected: wf.name === current }, wf.name + mark);
  });
  const same = select.options.length === options.length && options.every((o, i) => select.options[i].textContent === o.textContent);
  if (!same) {
    select.replaceChildren(...options);
    renderParams();
  }
  const wf = workflows.find((w) => w.name === select.value);
  const problems = (wf?.readiness || []).filter((r) => !r.ready).flatMap((r) => r.problems.map((p) => `${r.server}: ${p}`));
  $("#readiness").textContent = wf && wf.ready === false ? problems.join("; ") : "";
}

function renderParams() {
  const wf = workflows.find((w) => w.name === $("#workflow").value);
  const box = $("#params");
  box.replaceChildren();
  if (!wf) return;
  for (const p of wf.parameters) {
    if (p.name in DEDICATED) {
      const field = DEDICATED[p.name] && $(`[name=${DEDICATED[p.name]}]`);
      if (field) field.placeholder = String(p.default ?? "");
      continue;
    }
    let input;
    const attrs = { name: "param:" + p.name, id: "param-" + p.name, dataset: { type: p.type, default: JSON.stringify(p.default) } };
    if (p.type === "boolean") {
      input = h("input", { ...attrs, type: "checkbox", checked: p.default === true });
    } else if (p.type === "integer" || p.type === "number") {
      input = h("input", {
        ...attrs,
        type: "number",
        value: p.default ?? "",
        min: p.min,
        max: p.max,
        step: p.type === "integer" ? p.step || 1 : "any",
        inputmode: p.type === "integer" ? "numeric" : "decimal",
      });
    } else {
      input = h("input", { ...attrs, type: "text", value: p.default ?? "" });
    }
    const limits = [p.min != null ? `min ${p.min}` : null, p.max != null ? `max ${p.max}` : null, p.step ? `step ${p.step}` : null].filter(Boolean);
    box.append(
      h("label", { for: attrs.id, title: p.description }, h("span", {}, p.name), input, h("small", {}, [p.description, limits.join(", ")].filter(Boolean).join(" — "))),
    );
  }
}

/** The parameters the user changed from the workflow's defaults. */
function changedParams() {
  const params = {};
  for (const input of document.querySelectorAll("#params input")) {
    const name = input.name.slice("param:".length);
    const def = JSON.parse(input.dataset.default || "null");
    let value;
    if (input.dataset.type === "boolean") value = input.checked;
    else if (input.dataset.type === "integer" || input.dataset.type === "number") {
      if (input.value === "") continue;
      value = Number(input.value);
    } else value = input.value;
    if (value !== def) params[name] = value;
  }
  return params;
}

async function submit(form) {
  const resp = await api.json("/jobs", { method: "POST", body: form });
  $("#submit-status").textContent = `Job ${resp.job_id.slice(0, 8)} ${resp.status}` + (resp.queue_position ? ` at #${resp.queue_position}` : "");
  return resp;
}

function setupForm() {
  const form = $("#submit-form");
  const file = $("#image");
  const drop = $("#drop");
  const thumb = $("#drop-preview");
  const showFile = () => {
    const f = file.files[0];
    $("#drop-text").textContent = f ? `${f.name} · ${Math.round(f.size / 1024)} KiB` : "Drop an image here or tap to choose";
    if (thumb.dataset.url) URL.revokeObjectURL(thumb.dataset.url);
    if (f) {
      thumb.dataset.url = URL.createObjectURL(f);
      thumb.src = thumb.dataset.url;
      thumb.hidden = false;
    } else thumb.hidden = true;
  };
  file.addEventListener("change", showFile);
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) {
      file.files = e.dataTransfer.files;
      showFile();
    }
  });
  $("#workflow").addEventListener("change", () => {
    renderParams();
    fillWorkflowSelect();
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = file.files[0];
    if (!f) {
      report(new Error("choose an image first"));
      return;
    }
    const data = new FormData();
    data.append("image", f, f.name);
    for (const name of ["prompt", "negative_prompt", "seed", "stream"]) {
      const v = form.elements[name].value.trim();
      if (v) data.append(name, v);
    }
    data.append("workflow", $("#workflow").value);
    data.append("previews", String(form.elements.previews.checked));
    if (form.elements.stream.value.trim() && form.elements.latest.checked) data.append("mode", "latest");
    const params = changedParams();
    if (Object.keys(params).length) data.append("params", JSON.stringify(params));
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      await submit(data);
    } catch (err) {
      report(err);
      $("#submit-status").textContent = "Refused: " + err.message;
    } finally {
      button.disabled = false;
    }
  });
}

// ---- start --------------------------------------------------------------------------------------

function start() {
  api.onUnauthorized(askToken);
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    tokenEntered($("#token-input").value);
  });
  $("#forget-token").addEventListener("click", () => {
    api.setToken("");
    location.reload();
  });
  $("#clear-errors").addEventListener("click", () => {
    $("#errors").replaceChildren();
    $("#errors-box").hidden = true;
  });
  setupForm();
  layout();
  connect();
  pollHealth();
  pollWorkflows();
  // Workers and servers come and go without job events; these are two small reads.
  setInterval(refreshHealthSoon, 2000);
  setInterval(pollWorkflows, 10000);
}

start();
