// The broker's dashboard in a real browser: Debian's Chromium driven by playwright-core (no
// browser download), against a real `tdcomfy up --simulate` (broker + worker + ComfyUI simulator).
//
// Env: TDCOMFY_BIN (default ../../target/debug/tdcomfy, or $CARGO_TARGET_DIR/debug/tdcomfy),
// CHROMIUM (default /usr/bin/chromium), SCREENSHOT_DIR (default a fresh temporary folder; printed),
// DOCS_SCREENSHOT (a path: also save the finished-job screenshot there, for docs/).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../..");
const binary =
  process.env.TDCOMFY_BIN ||
  path.join(process.env.CARGO_TARGET_DIR || path.join(repo, "target"), "debug", "tdcomfy");
const frame = path.join(repo, "examples", "frame.png");
const shots = process.env.SCREENSHOT_DIR || fs.mkdtempSync(path.join(os.tmpdir(), "tdcomfy-dashboard-shots-"));
fs.mkdirSync(shots, { recursive: true });
console.log(`# screenshots: ${shots}`);

// The simulator's default workflow output: 97 frames at 24 fps.
const VIDEO_SECONDS = 97 / 24;

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
    srv.on("error", reject);
  });
}

/** `tdcomfy up --simulate` in its own process group, until `stop()`. */
async function startPipeline({ token = null, jobTime = 3 } = {}) {
  assert.ok(fs.existsSync(binary), `tdcomfy binary not found at ${binary}: cargo build -p tdcomfy, or set TDCOMFY_BIN`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tdcomfy-dashboard-"));
  const [api, comfy] = [await freePort(), await freePort()];
  const env = { ...process.env, API_HOST: "127.0.0.1", API_PORT: String(api), COMFYUI_HOST: "127.0.0.1",
    COMFYUI_PORT: String(comfy), DATA_DIR: path.join(dir, "data"), SIM_DATA_DIR: path.join(dir, "sim"),
    WORKFLOWS_DIR: path.join(repo, "workflows"), RUST_LOG: "warn" };
  delete env.API_TOKEN;
  delete env.WORKER_TOKEN;
  if (token) env.API_TOKEN = token;
  const proc = spawn(binary, ["up", "--simulate", "--sim-job-time", String(jobTime)], { env, cwd: dir, detached: true,
    stdio: ["ignore", "pipe", "pipe"] });
  let log = "";
  proc.stdout.on("data", (d) => (log += d));
  proc.stderr.on("data", (d) => (log += d));
  const base = `http://127.0.0.1:${api}`;
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`tdcomfy up exited with ${proc.exitCode}:\n${log}`);
    try {
      const h = await (await fetch(base + "/health")).json();
      if (h.workers_connected >= 1) break;
    } catch {}
    if (Date.now() > deadline) throw new Error(`no worker within 60 s:\n${log}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  const auth = token ? { Authorization: `Bearer ${token}` } : {};
  return {
    base,
    comfy,
    auth,
    log: () => log,
    async job(id) {
      return (await fetch(`${base}/jobs/${id}`, { headers: auth })).json();
    },
    stop() {
      try {
        process.kill(-proc.pid, "SIGTERM");
      } catch {}
      return new Promise((resolve) => (proc.exitCode !== null ? resolve() : proc.on("exit", resolve)));
    },
  };
}

let context;

before(async () => {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "tdcomfy-chromium-profile-"));
  // A persistent context on a fresh folder is Chromium's --user-data-dir, new for this run.
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    // Without the background-networking flags Chromium keeps dialling Google, which this closed
    // network refuses; the sandbox needs user namespaces a CI container (root) does not give.
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run", "--disable-quic", "--autoplay-policy=no-user-gesture-required"],
    viewport: { width: 1280, height: 900 },
  });
});

after(async () => {
  await context?.close();
});

/** The numeric width of a running card's progress bar, in percent. */
async function barPercent(card) {
  return card.locator(".fill").evaluate((el) => parseFloat(el.style.width || "0"));
}

test("submit with the form, watch progress and the preview, play the finished video", { timeout: 120_000 }, async () => {
  const pipe = await startPipeline({ jobTime: 4 });
  const page = await context.newPage();
  const consoleErrors = [];
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  try {
    await page.goto(pipe.base + "/");
    await page.locator("#live.live").waitFor({ timeout: 15_000 });
    // The workflow list and its parameter form come from GET /workflows.
    await page.locator("#workflow option[value=ltxv_image_to_video]").waitFor({ state: "attached" });
    assert.equal(await page.locator("#workflow").inputValue(), "ltxv_image_to_video");
    await page.locator("details:has(#params) summary").click();
    await page.locator("#param-cfg").waitFor();
    assert.equal(await page.locator("#param-cfg").inputValue(), "3");
    await page.locator("#param-cfg").fill("4.5");

    await page.setInputFiles("#image", frame);
    await page.fill("[name=prompt]", "a lighthouse at dusk, waves rolling in");
    await page.click("#submit-form button[type=submit]");
    await page.locator("#submit-status", { hasText: "Job " }).waitFor();

    const card = page.locator("#running article.job");
    await card.waitFor({ timeout: 20_000 });
    const id = await card.getAttribute("data-job-id");
    assert.deepEqual((await pipe.job(id)).params, { cfg: 4.5 }, "the changed parameter reached the job");
    // The bar moves: two readings, the second larger.
    let first = await barPercent(card);
    const deadline = Date.now() + 20_000;
    let later = first;
    while (later <= first && Date.now() < deadline) {
      await page.waitForTimeout(150);
      if ((await card.count()) === 0) break;
      later = await barPercent(card);
    }
    assert.ok(later > first, `progress bar moved from ${first}% to ${later}%`);
    // The live preview: an image the browser decoded.
    const preview = card.locator("img.preview");
    await preview.waitFor({ state: "visible", timeout: 20_000 });
    await page.waitForFunction((el) => el.complete && el.naturalWidth > 0, await preview.elementHandle());
    await page.screenshot({ path: path.join(shots, "running.png"), fullPage: true });

    // Done: the card moves to Recent with its input frame and the video, which loads and plays.
    const done = page.locator(`#recent article.job[data-job-id="${id}"][data-status=done]`);
    await done.waitFor({ timeout: 40_000 });
    const video = done.locator("video");
    await video.waitFor();
    const handle = await video.elementHandle();
    await page.waitForFunction((v) => v.readyState >= 2, handle, { timeout: 20_000 });
    const state = await video.evaluate(async (v) => {
      await v.play();
      const t0 = v.currentTime;
      await new Promise((r) => setTimeout(r, 600));
      return { readyState: v.readyState, duration: v.duration, advanced: v.currentTime !== t0, paused: v.paused,
        width: v.videoWidth };
    });
    assert.ok(state.readyState >= 2, JSON.stringify(state));
    assert.ok(Math.abs(state.duration - VIDEO_SECONDS) < 0.1, `duration ${state.duration}, expected ${VIDEO_SECONDS}`);
    assert.ok(state.advanced && !state.paused, `the video plays: ${JSON.stringify(state)}`);
    assert.ok(state.width > 0);
    await page.waitForFunction(
      (img) => img.complete && img.naturalWidth > 0,
      await done.locator("img.input").elementHandle(),
    );
    // The docs' screenshot: the form folded, the finished job with its frame and video.
    await page.locator("details:has(#params) summary").click();
    const shot = path.join(shots, "finished.png");
    await page.screenshot({ path: shot, fullPage: true });
    if (process.env.DOCS_SCREENSHOT) fs.copyFileSync(shot, process.env.DOCS_SCREENSHOT);
    // On a phone's width, one column and nothing wider than the screen but the tables' own scroll.
    await page.setViewportSize({ width: 390, height: 844 });
    await page.waitForTimeout(100);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(overflow <= 390, `the page is ${overflow} px wide on a 390 px screen`);
    await page.screenshot({ path: path.join(shots, "phone.png"), fullPage: true });
    // Workers and servers from /health and /workflows: the worker's ComfyUI server, its state and
    // its GPU as the worker reports them, and the server up with the workflows it can run.
    const server = `http://127.0.0.1:${pipe.comfy}`;
    const worker = page.locator("#workers tr[data-worker]").first();
    await worker.locator("td", { hasText: server }).waitFor({ timeout: 15_000 });
    const health = await (await fetch(pipe.base + "/health")).json();
    const reported = health.workers.find((w) => w.server === server);
    assert.ok(reported, JSON.stringify(health.workers));
    if (reported.devices?.length) {
      await worker.locator("td", { hasText: reported.devices[0].name }).waitFor();
    }
    await page.locator("#servers tr", { hasText: server }).locator(".badge", { hasText: "up" }).waitFor();
    assert.match(await page.locator("#servers tr", { hasText: server }).textContent(), /ltxv_image_to_video/);
    assert.deepEqual(consoleErrors, []);
  } catch (e) {
    await page.screenshot({ path: path.join(shots, "failure-submit.png"), fullPage: true }).catch(() => {});
    e.message += `\n--- tdcomfy up log ---\n${pipe.log().slice(-4000)}`;
    throw e;
  } finally {
    await page.close();
    await pipe.stop();
  }
});

test("cancel a queued job; retry a failed one with its frame and fields", { timeout: 120_000 }, async () => {
  const pipe = await startPipeline({ jobTime: 6 });
  const page = await context.newPage();
  try {
    await page.goto(pipe.base + "/");
    await page.locator("#live.live").waitFor({ timeout: 15_000 });
    await page.setInputFiles("#image", frame);
    // One worker, one simulated GPU: the first runs, the second is leased ahead of it (the
    // worker's PREFETCH=1, shown running), the next two wait in the queue.
    for (const n of [1, 2, 3, 4]) {
      await page.fill("[name=prompt]", `job ${n}`);
      await page.click("#submit-form button[type=submit]");
      await page.locator("#submit-status", { hasText: /queued/ }).waitFor();
      await page.locator("#submit-status").evaluate((el) => (el.textContent = ""));
    }
    await page.locator("#queue article.job").nth(1).waitFor({ timeout: 20_000 });
    const positions = await page.locator("#queue article .badge").allTextContents();
    assert.deepEqual(positions, ["#1", "#2"]);
    const last = page.locator("#queue article.job").nth(1);
    const id = await last.getAttribute("data-job-id");
    await last.locator("button.cancel").click();
    const cancelled = page.locator(`#recent article.job[data-job-id="${id}"][data-status=cancelled]`);
    await cancelled.waitFor({ timeout: 10_000 });
    assert.equal((await pipe.job(id)).status, "cancelled");
    assert.equal(await page.locator("#queue article.job").count(), 1);
    await page.screenshot({ path: path.join(shots, "cancelled.png"), fullPage: true });
    // Retry of a cancelled job: its frame was deleted with it, which the page says.
    await cancelled.locator("button.retry").click();
    await page.locator("#errors li", { hasText: "input frame was deleted" }).waitFor();

    // A job that fails in ComfyUI shows its error; Retry submits its frame and fields again.
    await page.locator("details:has(#params) summary").click();
    await page.locator("#param-cfg").fill("5");
    await page.fill("[name=prompt]", "this one fails [sim:error]");
    await page.fill("[name=seed]", "1234");
    await page.click("#submit-form button[type=submit]");
    const failed = page.locator("#recent article.job[data-status=error]").first();
    await failed.waitFor({ timeout: 60_000 });
    const failedId = await failed.getAttribute("data-job-id");
    const message = (await pipe.job(failedId)).error_message;
    assert.ok(message, "the failed job has an error message");
    assert.equal(await failed.locator(".error-text").textContent(), message);
    await page.screenshot({ path: path.join(shots, "failed.png"), fullPage: true });
    const before = new Set(await page.locator("article.job").evaluateAll((els) => els.map((e) => e.dataset.jobId)));
    await failed.locator("button.retry").click();
    const retried = page.locator("article.job", { hasText: "this one fails" });
    await page.waitForFunction(
      (known) => [...document.querySelectorAll("article.job")].some((e) => !known.includes(e.dataset.jobId)),
      [...before],
    );
    const ids = await retried.evaluateAll((els) => els.map((e) => e.dataset.jobId));
    const newId = ids.find((i) => !before.has(i));
    const [old, again] = [await pipe.job(failedId), await pipe.job(newId)];
    for (const field of ["prompt", "negative_prompt", "seed", "workflow", "params"]) {
      assert.deepEqual(again[field], old[field], field);
    }
    assert.deepEqual(again.params, { cfg: 5 });
    const frameOf = async (jobId) =>
      Buffer.from(await (await fetch(`${pipe.base}/jobs/${jobId}/input`, { headers: pipe.auth })).arrayBuffer());
    assert.ok((await frameOf(newId)).equals(await frameOf(failedId)), "the retry sent the same frame");
  } finally {
    await page.close();
    await pipe.stop();
  }
});

test("a broker with API_TOKEN refuses the page until the token is given", { timeout: 90_000 }, async () => {
  const token = "dashboard-test-secret";
  const pipe = await startPipeline({ token, jobTime: 1 });
  const page = await context.newPage();
  try {
    await page.goto(pipe.base + "/");
    const dialog = page.locator("#token-dialog");
    await dialog.waitFor({ state: "visible", timeout: 15_000 });
    // Without the token the API refuses the page's own calls.
    const status = await page.evaluate(async () => (await fetch("/jobs")).status);
    assert.equal(status, 401);
    assert.equal(await page.locator("#queue article").count(), 0);
    await page.screenshot({ path: path.join(shots, "token-asked.png") });

    await page.fill("#token-input", "wrong-token");
    await page.click("#token-form button[type=submit]");
    await page.locator("#token-reason", { hasText: "refused this token" }).waitFor({ timeout: 10_000 });
    assert.ok(await dialog.isVisible());

    await page.fill("#token-input", token);
    await page.click("#token-form button[type=submit]");
    await dialog.waitFor({ state: "hidden" });
    await page.locator("#live.live").waitFor({ timeout: 15_000 });
    assert.equal(await page.evaluate(() => sessionStorage.getItem("tdcomfy.token")), token);
    // With the token, the whole loop works: submit, done, the video (fetched with the token).
    await page.setInputFiles("#image", frame);
    await page.click("#submit-form button[type=submit]");
    const done = page.locator("#recent article.job[data-status=done] video");
    await done.waitFor({ timeout: 40_000 });
    await page.waitForFunction((v) => v.readyState >= 2, await done.elementHandle(), { timeout: 20_000 });
    // A reload keeps the token for this tab: no second question.
    await page.reload();
    await page.locator("#live.live").waitFor({ timeout: 15_000 });
    assert.ok(!(await dialog.isVisible()));
  } finally {
    await page.close();
    await pipe.stop();
  }
});
