//! End to end: frames in through the broker, workflows run on the simulator by the worker, results
//! out — the normal paths and every failure a user of other bridges has met.

use std::time::Duration;

use serde_json::json;

use crate::harness::{ComfyVersion, Pipeline, Setup, on_both_profiles, video_info};

async fn the_default_ltxv_workflow_returns_a_real_mp4(version: ComfyVersion) {
    let p = Pipeline::start(Setup::on(version)).await;
    let id = p.submit("a lighthouse in a storm", None, Some(json!({"frames": 17}))).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["has_result"], true);
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["progress"]["value"], 1.0);
    // Where the time went: ComfyUI's own execution time is reported, and it is part of the total.
    let comfy = job["timings"]["comfy_execution"].as_f64().expect("ComfyUI execution time reported");
    let total = job["timings"]["total"].as_f64().unwrap();
    assert!(comfy >= 0.3 && comfy <= total, "{}", job["timings"]);
    let (ct, bytes) = p.result(&id).await;
    assert_eq!(ct, "video/mp4");
    let info = video_info(p.dir.path(), &bytes);
    // Generated 256×160 and upscaled to 512×320, as the workflow says; 17 frames at 24 fps.
    assert_eq!((info.width, info.height, info.frames), (512, 320, 17));
    assert!((info.fps - 24.0).abs() < 0.01, "{}", info.fps);
}

async fn progress_reaches_the_client_while_the_sampler_runs(version: ComfyVersion) {
    let p = Pipeline::start(Setup { sim_job_time: 2.0, ..Setup::on(version) }).await;
    let id = p.submit("slow", None, Some(json!({"frames": 9}))).await;
    let running = p
        .wait_for(&id, 60.0, |j| j["status"] == "running" && j["progress"]["step"].as_u64().is_some_and(|s| s >= 1))
        .await;
    assert_eq!(running["progress"]["node_type"], "SamplerCustom");
    assert_eq!(running["progress"]["max_steps"], 3);
    let v = running["progress"]["value"].as_f64().unwrap();
    assert!(v > 0.0 && v < 1.0, "{v}");
    assert_eq!(p.wait_terminal(&id).await["status"], "done");
}

#[tokio::test]
async fn an_image_workflow_returns_a_png() {
    let p = Pipeline::start(Setup::default()).await;
    let id = p.submit("", Some("image_invert"), None).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    let (ct, bytes) = p.result(&id).await;
    assert_eq!(ct, "image/png");
    let img = image::load_from_memory(&bytes).expect("a decodable PNG").to_rgb8();
    assert_eq!(img.dimensions(), (64, 40));
    // Inverted: the frame's (0,0) pixel was (0,0,120).
    assert_eq!(img.get_pixel(0, 0).0, [255, 255, 135]);
}

#[tokio::test]
async fn video_outputs_are_found_under_every_key_comfyui_uses() {
    let p = Pipeline::start(Setup::default()).await;
    // VHS writes under `gifs`, some custom nodes under `videos`, core animated WebP under `images`.
    for (workflow, expected_type) in
        [("gifs_vhs", "video/mp4"), ("videos_key", "video/mp4"), ("animated_webp", "image/webp")]
    {
        let id = p.submit("", Some(workflow), None).await;
        let job = p.wait_terminal(&id).await;
        assert_eq!(job["status"], "done", "{workflow}: {job}");
        let (ct, bytes) = p.result(&id).await;
        assert_eq!(ct, expected_type, "{workflow}");
        if ct == "video/mp4" {
            let info = video_info(p.dir.path(), &bytes);
            assert_eq!((info.width, info.height, info.frames), (64, 40, 8), "{workflow}");
        } else {
            assert_eq!(&bytes[8..12], b"WEBP", "{workflow}");
        }
    }
}

async fn node_errors_in_a_200_fail_the_job_instead_of_half_running_it(version: ComfyVersion) {
    let p = Pipeline::start(Setup::on(version)).await;
    let id = p.submit("", Some("partial_invalid"), None).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "error", "{job}");
    // What ComfyUI's validator says reaches the client: the node and the input. (A value that is
    // not among the options, such as a missing model file, never gets this far: see preflight.)
    let msg = job["error_message"].as_str().unwrap();
    assert!(msg.contains("ImageScale") && msg.contains("width"), "{msg}");
    assert_eq!(job["attempts"], 1, "a validation error is not retried");
    // The valid half that ComfyUI had queued was removed, not left running.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while p.sim_queue().await != (0, 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(p.sim_queue().await, (0, 0));
}

async fn an_execution_error_names_the_node_type_and_exception(version: ComfyVersion) {
    let p = Pipeline::start(Setup::on(version)).await;
    let id = p.submit("boom [sim:error]", None, Some(json!({"frames": 9}))).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "error", "{job}");
    let msg = job["error_message"].as_str().unwrap();
    assert!(msg.contains("SamplerCustom"), "{msg}");
    assert_eq!(job["attempts"], 1);
}

async fn a_silent_websocket_still_completes_through_history_polling(version: ComfyVersion) {
    let p = Pipeline::start(Setup::on(version)).await;
    let id = p.submit("hush [sim:silent]", None, Some(json!({"frames": 9}))).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(p.result(&id).await.0, "video/mp4");
}

async fn a_dropped_websocket_is_survived(version: ComfyVersion) {
    let p = Pipeline::start(Setup::on(version)).await;
    let id = p.submit("cut [sim:drop]", None, Some(json!({"frames": 9}))).await;
    assert_eq!(p.wait_terminal(&id).await["status"], "done");
}

async fn cancelling_a_queued_job_means_it_never_runs(version: ComfyVersion) {
    // Without prefetch the second job stays queued at the broker (a prefetched one is
    // `prefetch::a_cancelled_prefetched_job_leaves_comfyuis_queue_and_never_runs`).
    let p = Pipeline::start(Setup { sim_job_time: 3.0, prefetch: 0, ..Setup::on(version) }).await;
    let first = p.submit("occupies the worker", None, Some(json!({"frames": 9}))).await;
    let second = p.submit("never runs", None, Some(json!({"frames": 9}))).await;
    p.wait_for(&first, 30.0, |j| j["status"] == "running").await;
    let resp = p.http.delete(p.url(&format!("/jobs/{second}"))).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(p.wait_terminal(&first).await["status"], "done");
    let job = p.job(&second).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("cancelled"), Some(0)));
}

async fn cancelling_a_running_job_interrupts_only_that_prompt(version: ComfyVersion) {
    let p = Pipeline::start(Setup { sim_job_time: 30.0, ..Setup::on(version) }).await;
    let id = p.submit("long", None, Some(json!({"frames": 9}))).await;
    p.wait_for(&id, 30.0, |j| j["progress"]["node_type"] == "SamplerCustom").await;
    p.http.delete(p.url(&format!("/jobs/{id}"))).send().await.unwrap();
    // The worker hears it at its next heartbeat and stops the prompt in ComfyUI by its id.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while p.sim_queue().await != (0, 0) {
        assert!(tokio::time::Instant::now() < deadline, "the prompt kept running in ComfyUI");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let job = p.job(&id).await;
    assert_eq!((job["status"].as_str(), job["has_result"].as_bool()), (Some("cancelled"), Some(false)));
    // The worker is free again and the next job runs normally.
    let next = p.submit("after", Some("image_invert"), None).await;
    assert_eq!(p.wait_terminal(&next).await["status"], "done");
}

async fn a_job_over_job_timeout_fails_and_its_prompt_is_stopped(version: ComfyVersion) {
    let p = Pipeline::start(Setup { sim_job_time: 60.0, job_timeout: 2.0, ..Setup::on(version) }).await;
    let id = p.submit("too long", None, Some(json!({"frames": 9}))).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "error", "{job}");
    assert!(job["error_message"].as_str().unwrap().contains("JOB_TIMEOUT"), "{job}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while p.sim_queue().await != (0, 0) {
        assert!(tokio::time::Instant::now() < deadline, "the timed-out prompt kept running in ComfyUI");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_frame_over_comfyuis_upload_limit_fails_the_job_naming_size_and_limit(version: ComfyVersion) {
    let p = Pipeline::start(Setup { sim_max_upload: Some(256), ..Setup::on(version) }).await;
    let frame = crate::harness::frame_png();
    let size = frame.len();
    assert!(size > 256, "the test frame must be over the limit");
    let id = p.submit_frame(frame, "too big for this ComfyUI", None, None).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "error", "{job}");
    let msg = job["error_message"].as_str().unwrap();
    assert!(msg.contains(&format!("{size} bytes")) && msg.contains("max_upload_size 256 bytes"), "{msg}");
    assert_eq!(job["attempts"], 1, "no retry can make the frame smaller");
}

/// A ComfyUI behind a token-checking wrapper, reached without the token: every answer is 401.
async fn refusing_server() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = stream.read(&mut buf).await;
                let body = r#"{"error":{"type":"unauthorized","message":"Unauthorized"}}"#;
                let answer = format!(
                    "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_comfyui_that_wants_a_token_fails_the_job_once_with_a_clear_message() {
    let mut p = Pipeline::start(Setup::default()).await;
    p.workers.remove(0).stop().await;
    let guarded = refusing_server().await;
    let w = p.start_worker_on("tokenless", Some(format!("http://{guarded}"))).await;
    p.workers.push(w);
    let id = p.submit("needs a token", None, None).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "error", "{job}");
    let msg = job["error_message"].as_str().unwrap();
    assert!(msg.contains(&format!("ComfyUI at http://{guarded}/")) && msg.contains("COMFYUI_TOKEN"), "{msg}");
    assert_eq!(job["attempts"], 1, "a token does not fix itself: no retry");
}

async fn a_token_guarded_comfyui_runs_jobs_with_comfyui_token(version: ComfyVersion) {
    let token = Some("td-token-1".to_owned());
    let p = Pipeline::start(Setup { sim_token: token.clone(), comfyui_token: token, ..Setup::on(version) }).await;
    let id = p.submit("behind a token", Some("image_invert"), None).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    // Without the token the same simulator refuses everything.
    let status = p.http.get(p.sim_url("/system_stats")).send().await.unwrap().status();
    assert_eq!(status, 401);
}

on_both_profiles!(
    a_token_guarded_comfyui_runs_jobs_with_comfyui_token,
    a_frame_over_comfyuis_upload_limit_fails_the_job_naming_size_and_limit,
    the_default_ltxv_workflow_returns_a_real_mp4,
    progress_reaches_the_client_while_the_sampler_runs,
    node_errors_in_a_200_fail_the_job_instead_of_half_running_it,
    an_execution_error_names_the_node_type_and_exception,
    a_silent_websocket_still_completes_through_history_polling,
    a_dropped_websocket_is_survived,
    cancelling_a_queued_job_means_it_never_runs,
    cancelling_a_running_job_interrupts_only_that_prompt,
    a_job_over_job_timeout_fails_and_its_prompt_is_stopped,
);
