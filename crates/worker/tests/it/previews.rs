//! Previews end to end: the simulator's binary preview frames → the worker → the broker → a
//! client's event stream and `GET /jobs/{id}/preview`; and a slow broker costs the job nothing.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use crate::harness::{ComfyVersion, Pipeline, Setup, frame_png, on_both_profiles};

/// Submits the preview test workflow, with previews on or off.
async fn submit(p: &Pipeline, prompt: &str, previews: bool) -> String {
    let fields = [("previews", if previews { "true" } else { "false" })];
    p.submit_with(frame_png(), prompt, Some("slow_preview"), None, &fields).await
}

/// The events of one job's SSE stream, `(name, data)`, until it ends (after a terminal state).
struct Events {
    stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Vec<u8>>> + Send>>,
    buf: String,
}

impl Events {
    async fn open(p: &Pipeline, id: &str) -> Events {
        let resp = p.http.get(p.url(&format!("/jobs/{id}/events"))).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        Events { stream: Box::pin(resp.bytes_stream().map(|c| c.map(|b| b.to_vec()))), buf: String::new() }
    }

    async fn next(&mut self) -> Option<(String, Value)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some((name, serde_json::from_str(&data).unwrap()));
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }
}

/// What a client following one job saw.
#[derive(Default)]
struct Seen {
    previews: usize,
    progress: usize,
    /// The first preview's image, fetched as soon as its event came (status, type, bytes).
    first_image: Option<(u16, String, Vec<u8>)>,
    /// `extra_data.preview_method` of the prompt in ComfyUI's queue while it ran.
    preview_method: Option<String>,
    done: Option<Value>,
}

async fn follow(p: &Pipeline, id: &str) -> Seen {
    let mut events = Events::open(p, id).await;
    let mut seen = Seen::default();
    while let Some((name, data)) = events.next().await {
        if seen.preview_method.is_none() && matches!(name.as_str(), "progress" | "preview") {
            let q: Value = p.http.get(p.sim_url("/queue")).send().await.unwrap().json().await.unwrap();
            if let Some(method) = q["queue_running"][0][3]["preview_method"].as_str() {
                seen.preview_method = Some(method.to_owned());
            }
        }
        match name.as_str() {
            "preview" => {
                seen.previews += 1;
                if seen.first_image.is_none() {
                    let resp = p.http.get(p.url(data["url"].as_str().unwrap())).send().await.unwrap();
                    let status = resp.status().as_u16();
                    let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
                    seen.first_image = Some((status, ct.unwrap_or_default(), resp.bytes().await.unwrap().to_vec()));
                }
            }
            "progress" => seen.progress += 1,
            "done" | "error" | "cancelled" => {
                seen.done = Some(data);
                break;
            }
            _ => {}
        }
    }
    seen
}

/// On 0.38 the previews come as type-4 frames with their prompt id, and only because the prompt
/// asks for a preview method (newer ComfyUI resets it per prompt).
async fn a_job_with_previews_streams_preview_events_and_a_fetchable_image_before_done(version: ComfyVersion) {
    let p = Pipeline::start(Setup::on(version)).await;
    let id = submit(&p, "watch it render", true).await;
    let seen = follow(&p, &id).await;
    let done = seen.done.expect("the job ended");
    assert_eq!(done["job"]["status"], "done", "{done}");
    assert!(seen.previews >= 1, "no preview event before done");
    assert_eq!(seen.preview_method.as_deref(), Some("auto"), "a job with previews asks ComfyUI for them");
    let (status, ct, bytes) = seen.first_image.expect("a preview was fetched");
    assert_eq!((status, ct.as_str()), (200, "image/jpeg"), "the announced preview is there while the job runs");
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).expect("a complete JPEG");
    assert!(img.width() > 0 && img.height() > 0);
    // The simulator sends a preview every 0.1 s step (10 in all) and PREVIEW_FPS is 10: never more
    // than it sent.
    assert!(seen.previews <= 10, "{} previews for 10 frames", seen.previews);
    let status = p.http.get(p.url(&format!("/jobs/{id}/preview"))).send().await.unwrap().status();
    assert_eq!(status, 404, "the preview goes with the run");
}

async fn a_job_submitted_without_previews_gets_none(version: ComfyVersion) {
    let p = Pipeline::start(Setup::on(version)).await;
    // The same workflow, whose sampler sends a preview every step, without `previews=true`.
    let id = p.submit("no previews", Some("slow_preview"), None).await;
    let seen = follow(&p, &id).await;
    assert_eq!(seen.done.expect("ended")["job"]["status"], "done");
    assert!(seen.progress >= 1);
    assert_eq!(seen.previews, 0, "a job without previews=true gets no preview events");
    assert_eq!(seen.preview_method.as_deref(), Some("none"), "nor does ComfyUI spend GPU time rendering them");
    let id = submit(&p, "explicitly off", false).await;
    let seen = follow(&p, &id).await;
    assert_eq!((seen.previews, seen.done.is_some()), (0, true));
}

#[tokio::test]
async fn preview_fps_limits_how_many_previews_reach_the_broker() {
    let p = Pipeline::start(Setup { preview_fps: 2.0, ..Setup::default() }).await;
    let id = submit(&p, "few previews", true).await;
    let seen = follow(&p, &id).await;
    assert_eq!(seen.done.expect("ended")["job"]["status"], "done");
    // 10 frames over about a second at 2 per second: the first at once, then one per 0.5 s.
    assert!((1..=4).contains(&seen.previews), "{} previews at PREVIEW_FPS=2", seen.previews);
}

#[tokio::test]
async fn a_broker_whose_preview_route_hangs_does_not_delay_the_job() {
    // The same job twice: once with previews off, once with every preview upload hanging.
    let off = Pipeline::start(Setup { preview_fps: 0.0, ..Setup::default() }).await;
    let id = submit(&off, "previews off", true).await;
    let plain = follow(&off, &id).await;
    let plain_done = plain.done.expect("ended");
    assert_eq!(plain_done["job"]["status"], "done");
    assert_eq!(plain.previews, 0, "PREVIEW_FPS=0 sends none");

    let hung = Pipeline::start(Setup { preview_stall: Some(Duration::from_secs(3600)), ..Setup::default() }).await;
    let id = submit(&hung, "previews hang", true).await;
    let slow = follow(&hung, &id).await;
    let slow_done = slow.done.expect("ended");
    assert_eq!(slow_done["job"]["status"], "done", "{slow_done}");
    assert_eq!(slow.previews, 0, "no preview got through the hung route");
    assert!(slow.progress >= 1, "progress kept flowing while previews hung");
    let secs = |j: &Value| j["job"]["processing_time"].as_f64().unwrap();
    // Each hung upload holds the uploader for 2 s and the run sends 10 previews: awaited on the
    // job's path they would add seconds. Off it, the job takes what it takes without them.
    assert!(
        secs(&slow_done) < secs(&plain_done) + 1.5,
        "with previews hanging the job took {} s, without previews {} s",
        secs(&slow_done),
        secs(&plain_done)
    );
    assert_eq!(slow_done["job"]["attempts"], 1, "the lease held throughout");
}

on_both_profiles!(
    a_job_with_previews_streams_preview_events_and_a_fetchable_image_before_done,
    a_job_submitted_without_previews_gets_none,
);
