//! What the worker leaves in ComfyUI's folders: every attempt reads its own frame, the input
//! folder holds a bounded set of names, and delivered outputs are removed.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tdcomfy_comfy::{ClientId, ComfyClient, ComfyEndpoint, ComfyTimeouts, ImageUpload, PromptId, collect_outputs};
use tdcomfy_worker::comfy_files::{
    ComfyFolders, FolderSettings, INPUT_SUBFOLDER, InputSlots, PromptFate, SLOTS_PER_SERVER, ServedCopy,
};

use crate::harness::{Pipeline, Proxy, Setup, files_under, frame_png, frame_png_seeded};

/// `png` is `frame` inverted, as the `image_invert` workflow should return it.
fn assert_is_inverted(png: &[u8], frame: &[u8]) {
    let out = image::load_from_memory(png).expect("a PNG").to_rgb8();
    let frame = image::load_from_memory(frame).unwrap().to_rgb8();
    assert_eq!(out.dimensions(), frame.dimensions(), "the result is not made from this job's frame");
    for (o, f) in out.pixels().zip(frame.pixels()) {
        assert_eq!(o.0, [255 - f[0], 255 - f[1], 255 - f[2]], "the result is not this job's frame inverted");
    }
}

/// Posts a prompt straight to the simulator, as another user of the same ComfyUI would: it holds
/// the simulator's single executor for `secs` seconds.
async fn occupy_comfyui(p: &Pipeline, secs: f64) {
    let upload = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(frame_png()).file_name("other.png"))
        .text("subfolder", "someone-else");
    let r = p.http.post(p.sim_url("/upload/image")).multipart(upload).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let steps = (secs / 0.25).ceil() as u64;
    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "someone-else/other.png"}},
        "2": {"class_type": "SlowPassthrough", "inputs": {"images": ["1", 0], "steps": steps, "step_seconds": 0.25, "send_preview": false}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "someone-else/slow"}},
    });
    let r = p.http.post(p.sim_url("/prompt")).json(&json!({"prompt": graph})).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

async fn wait_for_sim_queue(p: &Pipeline, want: (usize, usize), secs: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
    loop {
        let q = p.sim_queue().await;
        if q == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "ComfyUI's queue is {q:?}, expected {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two attempts of one job on one ComfyUI at once: the first worker loses the broker (and so its
/// lease) while its prompt waits in ComfyUI's queue; a second worker takes the job again and
/// queues its own prompt; then the first comes back, learns its lease is gone and stops its
/// prompt. Whatever the first attempt does while cleaning up, the second attempt's prompt must
/// read the second attempt's frame.
#[tokio::test]
async fn a_re_attempt_on_the_same_comfyui_computes_its_result_from_its_own_frame() {
    let mut p = Pipeline::start(Setup { lease_ttl: 4.0, ..Setup::default() }).await;
    let mut default_worker = p.workers.remove(0);
    default_worker.stop().await;
    let proxy = Proxy::start(p.broker.addr).await;
    let stale = p.start_worker_with("stale", None, format!("http://{}", proxy.addr)).await;

    // Someone else's long prompt keeps ComfyUI busy, so our prompts wait in its queue.
    occupy_comfyui(&p, 16.0).await;
    wait_for_sim_queue(&p, (1, 0), 10.0).await;
    let id = p.submit("attempt isolation", Some("image_invert"), None).await;
    wait_for_sim_queue(&p, (1, 1), 10.0).await;

    // The first worker loses the broker; its lease expires and the job goes to a second worker.
    proxy.cut();
    let fresh = p.start_worker("fresh").await;
    p.wait_for(&id, 20.0, |j| j["attempts"] == 2 && j["status"] == "running").await;
    wait_for_sim_queue(&p, (1, 2), 10.0).await;
    // The first worker is back: its next heartbeat says the lease is gone, and it stops its prompt.
    proxy.restore();
    wait_for_sim_queue(&p, (1, 1), 10.0).await;

    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
    let (content_type, png) = p.result(&id).await;
    assert_eq!(content_type, "image/png");
    assert_is_inverted(&png, &frame_png());
    drop((stale, fresh));
}

/// Many jobs through one worker and one ComfyUI leave at most the worker's fixed upload names in
/// ComfyUI's input folder and none of their outputs in its output folder, and each result is
/// still made from its own frame although the names are reused.
#[tokio::test]
async fn many_jobs_leave_a_bounded_input_folder_and_no_outputs() {
    const JOBS: usize = 200;
    let p = Pipeline::start(Setup::default()).await;
    let sim_dir = p.sim.dir.clone().unwrap();
    let started = tokio::time::Instant::now();
    let mut ids = Vec::new();
    // Runs of the same frame, then a new one: the loader cache must see each change.
    let seed = |i: usize| (i / 3 % 256) as u8;
    for i in 0..JOBS {
        ids.push(p.submit_frame(frame_png_seeded(seed(i)), &format!("job {i}"), Some("image_invert"), None).await);
    }
    for id in &ids {
        let job = p.wait_terminal(id).await;
        assert_eq!(job["status"], "done", "{job}");
    }
    let ran = started.elapsed();
    for (i, id) in ids.iter().enumerate() {
        let (content_type, png) = p.result(id).await;
        assert_eq!(content_type, "image/png");
        assert_is_inverted(&png, &frame_png_seeded(seed(i)));
    }

    // Outputs go after delivery, off the frame's path: give the last removals a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let spool = p.dir.path().join("spool-worker-1");
    let (mut outputs, mut spooled) = (files_under(&sim_dir.join("output")), files_under(&spool));
    while !(outputs.is_empty() && spooled.is_empty()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        (outputs, spooled) = (files_under(&sim_dir.join("output")), files_under(&spool));
    }
    assert!(spooled.is_empty(), "left in the worker's spool: {spooled:?}");
    let inputs = files_under(&sim_dir.join("input"));
    eprintln!("{JOBS} jobs in {ran:?}: {} input files, {} output files", inputs.len(), outputs.len());
    assert!(
        inputs.len() <= SLOTS_PER_SERVER,
        "{} input files, e.g. {:?}",
        inputs.len(),
        &inputs[..inputs.len().min(5)]
    );
    assert!(outputs.is_empty(), "{} output files left, e.g. {:?}", outputs.len(), outputs.first());
    let leftover_dirs: Vec<Value> = std::fs::read_dir(sim_dir.join("output/tdcomfy"))
        .map(|d| d.flatten().map(|e| Value::String(e.file_name().to_string_lossy().into_owned())).collect())
        .unwrap_or_default();
    assert!(leftover_dirs.is_empty(), "job folders left: {leftover_dirs:?}");
}

/// `COMFYUI_DIR` names a folder that is not the simulator's, holding a file at the path of the
/// job's output but with other bytes: the worker must see that it is not the file `/view` served
/// and delete nothing.
#[tokio::test]
async fn a_file_that_is_not_the_one_comfyui_served_is_never_deleted() {
    let decoy = tempfile::tempdir().unwrap();
    let p = Pipeline::start(Setup { comfyui_dir: Some(decoy.path().to_path_buf()), ..Setup::default() }).await;
    // Hold ComfyUI so the job waits while the decoy is put in place.
    occupy_comfyui(&p, 2.0).await;
    let id = p.submit("decoy", Some("image_invert"), None).await;
    let decoy_file = decoy.path().join(format!("output/tdcomfy/{id}/3_00001_.png"));
    std::fs::create_dir_all(decoy_file.parent().unwrap()).unwrap();
    std::fs::write(&decoy_file, b"not the file ComfyUI served").unwrap();

    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    let real = p.sim.dir.clone().unwrap().join(format!("output/tdcomfy/{id}/3_00001_.png"));
    assert!(real.is_file(), "ComfyUI's own output is out of this worker's reach");
    // Deleting happens right after delivery; watch the decoy for a while.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        assert_eq!(
            std::fs::read(&decoy_file).ok().as_deref(),
            Some(&b"not the file ComfyUI served"[..]),
            "the worker deleted a file that was not the one ComfyUI served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every upload name is held by a prompt still waiting in ComfyUI's queue (attempts that ended
/// without confirming their prompt left): a new attempt gets a one-off name, never one of those,
/// and the names are free again once ComfyUI's queue no longer has their prompts.
#[tokio::test]
async fn upload_names_still_read_by_queued_prompts_are_not_reused() {
    let p = Pipeline::start(Setup::default()).await;
    let endpoint = ComfyEndpoint::from_host_port(&p.sim.addr.ip().to_string(), p.sim.addr.port()).unwrap();
    let client = ComfyClient::new(endpoint, ClientId::new(), ComfyTimeouts::default()).unwrap();
    occupy_comfyui(&p, 2.0).await;
    let slots = InputSlots::new("probe");
    let mut held = Vec::new();
    for _ in 0..SLOTS_PER_SERVER {
        let name = slots.take(&client, "png").await;
        let prompt_id = PromptId::new();
        let graph = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "someone-else/other.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "someone-else/held"}},
        });
        let r = p.http.post(p.sim_url("/prompt")).json(&json!({"prompt": graph, "prompt_id": prompt_id.as_str()}));
        assert_eq!(r.send().await.unwrap().status(), 200);
        held.push(name.name.clone());
        slots.release(name, PromptFate::MaybeQueued(prompt_id));
    }
    let extra = slots.take(&client, "png").await;
    assert!(!held.contains(&extra.name), "{} is still read by a queued prompt", extra.name);
    assert!(extra.name.contains("-once-"), "{}", extra.name);
    slots.release(extra, PromptFate::Gone);

    wait_for_sim_queue(&p, (0, 0), 30.0).await;
    let again = slots.take(&client, "png").await;
    assert!(held.contains(&again.name), "{} should be a freed slot name", again.name);
}

/// After delivery the job's output folder goes, with files a save node wrote without listing
/// them; a symlink found there is not followed (its target outside the folder stays).
#[tokio::test]
async fn a_delivered_job_s_output_folder_is_removed_and_links_out_of_it_are_not_followed() {
    let p = Pipeline::start(Setup::default()).await;
    let output = p.sim.dir.clone().unwrap().join("output");
    let outside = p.dir.path().join("precious.txt");
    std::fs::write(&outside, b"keep me").unwrap();
    // Hold ComfyUI so the job waits while its folder is prepared.
    occupy_comfyui(&p, 2.0).await;
    let id = p.submit("cleanup", Some("image_invert"), None).await;
    let job_dir = output.join(format!("tdcomfy/{id}"));
    std::fs::create_dir_all(&job_dir).unwrap();
    std::fs::write(job_dir.join("3_00001_.png.workflow.png"), b"unlisted metadata").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&outside, job_dir.join("link.txt")).unwrap();

    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let expected_left: Vec<std::path::PathBuf> =
        if cfg!(unix) { vec![format!("tdcomfy/{id}/link.txt").into()] } else { Vec::new() };
    loop {
        let left: Vec<std::path::PathBuf> =
            std::fs::read_dir(&job_dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        let left: Vec<std::path::PathBuf> =
            left.iter().map(|p| p.strip_prefix(&output).unwrap().to_path_buf()).collect();
        if left == expected_left {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "left in the job's folder: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
}

/// A worker that stops takes its upload names with it, so workers whose id changes with every
/// start (the default host-pid) do not add names to ComfyUI's input folder each time.
#[tokio::test]
async fn a_stopped_worker_leaves_no_upload_behind() {
    let mut p = Pipeline::start(Setup::default()).await;
    let input = p.sim.dir.clone().unwrap().join("input");
    for i in 0..3 {
        let id = p.submit_frame(frame_png_seeded(i), "before a stop", Some("image_invert"), None).await;
        assert_eq!(p.wait_terminal(&id).await["status"], "done");
    }
    assert!(!files_under(&input).is_empty(), "the frames went through ComfyUI's input folder");
    let mut worker = p.workers.remove(0);
    worker.stop().await;
    assert_eq!(files_under(&input), Vec::<std::path::PathBuf>::new());
}

/// One-off upload names (used while every slot was held) are deleted once their prompt is gone,
/// but only after ComfyUI's folders were found (here from `/system_stats` `argv`) and verified
/// against a file `/view` served.
#[tokio::test]
async fn one_off_uploads_are_deleted_once_their_prompt_is_gone_and_the_folders_are_verified() {
    let p = Pipeline::start(Setup::default()).await;
    let sim_dir = p.sim.dir.clone().unwrap();
    let endpoint = ComfyEndpoint::from_host_port(&p.sim.addr.ip().to_string(), p.sim.addr.port()).unwrap();
    let client = ComfyClient::new(endpoint, ClientId::new(), ComfyTimeouts::default()).unwrap();
    let folders = ComfyFolders::new(FolderSettings::default(), "sim");
    let slots = InputSlots::new("probe");

    // Every slot held by a prompt waiting in ComfyUI's queue: the next name is a one-off.
    occupy_comfyui(&p, 2.0).await;
    for _ in 0..SLOTS_PER_SERVER {
        let name = slots.take(&client, "png").await;
        let prompt_id = PromptId::new();
        let graph = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "someone-else/other.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "someone-else/held"}},
        });
        let r = p.http.post(p.sim_url("/prompt")).json(&json!({"prompt": graph, "prompt_id": prompt_id.as_str()}));
        assert_eq!(r.send().await.unwrap().status(), 200);
        slots.release(name, PromptFate::MaybeQueued(prompt_id));
    }
    let one_off = slots.take(&client, "png").await;
    let upload = ImageUpload::from_bytes(one_off.name.clone(), frame_png()).in_subfolder(INPUT_SUBFOLDER);
    client.upload_image(upload.overwrite(true)).await.unwrap();
    let one_off_file = sim_dir.join("input").join(INPUT_SUBFOLDER).join(&one_off.name);
    assert!(one_off_file.is_file());
    slots.release(one_off, PromptFate::Gone);

    // Not verified yet: nothing is deleted.
    folders.remove_one_offs(&client, &slots).await;
    assert!(one_off_file.is_file(), "deleted before the folders were verified");

    // A job's output, downloaded through /view, verifies the folders and is removed.
    wait_for_sim_queue(&p, (0, 0), 30.0).await;
    let prompt_id = PromptId::new();
    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "someone-else/other.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "tdcomfy/probe-job/2"}},
    });
    let r = p.http.post(p.sim_url("/prompt")).json(&json!({"prompt": graph, "prompt_id": prompt_id.as_str()}));
    assert_eq!(r.send().await.unwrap().status(), 200);
    let entry = loop {
        if let Some(entry) = client.history(&prompt_id).await.unwrap() {
            break entry;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let outputs = collect_outputs(entry.outputs.iter().map(|(k, v)| (k.as_str(), v)));
    let mut download = client.download(&outputs[0]).await.unwrap();
    let mut served = Vec::new();
    while let Some(chunk) = download.next().await {
        served.extend_from_slice(&chunk.unwrap());
    }
    let served_path = p.dir.path().join("served.png");
    std::fs::write(&served_path, &served).unwrap();
    let served = ServedCopy::new(served_path.clone());
    let removed = folders.remove_outputs(&client, &outputs, &outputs[0], served, "tdcomfy/probe-job").await;
    assert_eq!(removed, 1);
    assert!(!sim_dir.join("output/tdcomfy/probe-job").exists());
    assert!(!served_path.exists(), "the served copy is dropped once compared");

    // Verified, and the one-off's prompt is gone: its file goes.
    folders.remove_one_offs(&client, &slots).await;
    assert!(!one_off_file.exists(), "the one-off upload was left behind");
}
