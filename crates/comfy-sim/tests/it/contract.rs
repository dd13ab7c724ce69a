//! Contract tests: replay the captured ComfyUI 0.3.64 transcripts against the simulator and
//! compare event sequences and JSON shapes (ids, timestamps and file names aside).

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::support::*;

fn opts(ignore: &[&str]) -> TokenOpts {
    TokenOpts { ignore_nodes: ignore.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

/// The captured history entry and ours have the same structure.
fn assert_history_shape(ours: &Value, captured: &Value) {
    assert_eq!(keys(ours), keys(captured), "history entry keys");
    assert_eq!(ours["prompt"].as_array().map(Vec::len), Some(5), "prompt tuple");
    assert_eq!(keys(&ours["status"]), keys(&captured["status"]), "status keys");
    let events = |v: &Value| -> Vec<String> {
        v["status"]["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m[0].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(events(ours), events(captured), "status messages");
    for (o, c) in ours["status"]["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(captured["status"]["messages"].as_array().into_iter().flatten())
    {
        assert_eq!(keys(&o[1]), keys(&c[1]), "keys of {}", o[0]);
    }
    assert_eq!(ours["status"]["status_str"], captured["status"]["status_str"]);
    assert_eq!(ours["status"]["completed"], captured["status"]["completed"]);
    assert_eq!(shape(&ours["meta"]), shape(&captured["meta"]), "meta shape");
}

#[tokio::test]
async fn run_10_normal_run_matches_capture() {
    let cap = capture("run_10_invert_first.json");
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(64, 48, 1), &[]).await.0, 200);
    let mut ws = sim.ws("td-capture-da5c8e1f").await;
    let (status, body) = sim.post("/prompt", &cap["post_prompt"]["request"]["json"]).await;
    assert_eq!(status, 200);
    assert_eq!(keys(&body), keys(&cap["post_prompt"]["response"]["json"]));
    assert_eq!(body["number"], 0);
    assert_eq!(body["node_errors"], json!({}));
    let prompt_id = body["prompt_id"].as_str().expect("id").to_string();

    let frames = ws.until_done(&prompt_id).await;
    let expected = captured_frames(&cap["ws_sequence"]);
    let all = TokenOpts { status_values: true, ..Default::default() };
    assert_eq!(tokens(&frames, &all), tokens(&expected, &all));
    for kind in ["execution_start", "execution_cached", "executing", "executed", "progress_state", "execution_success"]
    {
        assert_eq!(data_keys(&frames, kind), data_keys(&expected, kind), "data keys of {kind}");
    }
    let executed = frames.iter().filter_map(Frame::json).find(|v| v["type"] == "executed").expect("executed");
    assert_eq!(executed["data"]["output"]["images"][0]["filename"], "invert_00001_.png");
    assert_eq!(executed["data"]["output"]["images"][0]["subfolder"], "td");
    let state = frames.iter().filter_map(Frame::json).find(|v| v["type"] == "progress_state").expect("progress_state");
    assert_eq!(shape(&state["data"]), shape(&expected[4].json().expect("json")["data"]));

    let history = sim.get_json(&format!("/history/{prompt_id}")).await;
    let cap_history =
        cap["history"]["response"]["json"].as_object().expect("obj").values().next().expect("entry").clone();
    assert_history_shape(&history[&prompt_id], &cap_history);
    assert_eq!(history[&prompt_id]["outputs"], cap_history["outputs"]);
    assert_eq!(history[&prompt_id]["prompt"][2], cap_history["prompt"][2]);
    assert_eq!(history[&prompt_id]["prompt"][3], cap_history["prompt"][3]);
    sim.stop().await;
}

#[tokio::test]
async fn run_20_video_outputs_match_capture() {
    let cap = capture("run_20_video_outputs.json");
    let views = capture("http_21_view_video_outputs.json");
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(64, 48, 1), &[]).await.0, 200);
    let mut ws = sim.ws("td-capture-da5c8e1f").await;
    // SaveWEBM (node 7) cannot encode in the simulator; everything else runs as captured.
    let mut request = cap["post_prompt"]["request"]["json"].clone();
    request["prompt"].as_object_mut().expect("prompt").remove("7");
    let (status, body) = sim.post_text("/prompt", numeric_order_json(&request)).await;
    assert_eq!(status, 200, "{body}");
    let prompt_id = body["prompt_id"].as_str().expect("id").to_string();
    let frames = ws.until_done(&prompt_id).await;

    // The capture had node 1 cached; the simulator never caches.
    let o = opts(&["1", "7"]);
    let expected = captured_frames(&cap["ws_sequence"]);
    assert_eq!(tokens(&frames, &o), tokens(&expected, &o));
    let outputs = |frames: &[Frame]| -> Vec<(String, Value)> {
        frames
            .iter()
            .filter_map(Frame::json)
            .filter(|v| v["type"] == "executed" && v["data"]["node"] != "7")
            .map(|v| (v["data"]["node"].as_str().unwrap_or("").to_string(), shape(&v["data"]["output"])))
            .collect()
    };
    assert_eq!(outputs(&frames), outputs(&expected));

    let history = sim.wait_history(&prompt_id).await;
    let out = &history["outputs"];
    assert_eq!(out["6"]["images"][0]["filename"], "video_00001_.mp4");
    assert_eq!(out["6"]["animated"], json!([true]));
    assert_eq!(out["4"]["images"][0]["filename"], "anim_00001_.webp");
    assert_eq!(out["8"]["images"][0]["filename"], "apng_00001_.png");
    assert_eq!(out["10"]["images"][0]["type"], "temp");
    let temp_name = out["10"]["images"][0]["filename"].as_str().expect("name");
    assert!(temp_name.starts_with("ComfyUI_temp_") && temp_name.ends_with("_00001_.png"), "{temp_name}");

    for case in views.as_array().expect("cases") {
        let node = case["node"].as_str().expect("node");
        if node == "7" {
            continue;
        }
        let item = &out[node]["images"][0];
        let url = format!(
            "/view?filename={}&subfolder={}&type={}",
            item["filename"].as_str().unwrap_or(""),
            item["subfolder"].as_str().unwrap_or(""),
            item["type"].as_str().unwrap_or("")
        );
        let resp = sim.http.get(sim.url(&url)).send().await.expect("view");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], case["response"]["headers"]["Content-Type"].as_str().expect("ct"));
        let bytes = resp.bytes().await.expect("body");
        let magic = case["response"]["body"]
            .as_str()
            .expect("body")
            .split("magic ")
            .nth(1)
            .expect("magic")
            .trim_end_matches('>');
        let head: String = bytes.iter().take(12).map(|b| format!("{b:02x}")).collect();
        // Same container signature (sizes inside the header differ).
        assert_eq!(&head[..8], &magic[..8], "magic of node {node}");
        if node == "6" {
            assert_eq!(&head[8..], &magic[8..], "ftyp isom header");
            let path = sim.data_dir().join("output/td/video_00001_.mp4");
            let info = tdcomfy_sim::video_info(&path).expect("mp4");
            assert_eq!((info.width, info.height, info.frames, info.fps), (128, 96, 8, 8.0));
        }
        if node == "4" {
            let decoder = image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(bytes.to_vec())).expect("webp");
            assert!(decoder.has_animation());
        }
    }
    sim.stop().await;
}

async fn run_error_case(file: &str, corrupt: bool) {
    let cap = capture(file);
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(64, 48, 1), &[]).await.0, 200);
    if corrupt {
        assert_eq!(sim.upload("corrupt.png", b"this is not a png".to_vec(), &[("overwrite", "true")]).await.0, 200);
    }
    let mut ws = sim.ws("td-capture-da5c8e1f").await;
    let (status, body) = sim.post("/prompt", &cap["post_prompt"]["request"]["json"]).await;
    assert_eq!(status, 200, "{body}");
    let prompt_id = body["prompt_id"].as_str().expect("id").to_string();
    let frames = ws.until_done(&prompt_id).await;
    let expected = captured_frames(&cap["ws_sequence"]);
    let all = TokenOpts { status_values: true, ..Default::default() };
    assert_eq!(tokens(&frames, &all), tokens(&expected, &all));
    assert_eq!(data_keys(&frames, "execution_error"), data_keys(&expected, "execution_error"));

    let ours = frames.iter().filter_map(Frame::json).find(|v| v["type"] == "execution_error").expect("error");
    let theirs = expected.iter().filter_map(Frame::json).find(|v| v["type"] == "execution_error").expect("error");
    for field in ["node_id", "node_type", "exception_type", "executed"] {
        assert_eq!(ours["data"][field], theirs["data"][field], "{field}");
    }
    let message = ours["data"]["exception_message"].as_str().expect("message");
    assert!(message.ends_with('\n'));
    let captured_message = theirs["data"]["exception_message"].as_str().expect("message");
    let stem = captured_message.split('<').next().unwrap_or(captured_message);
    assert!(message.starts_with(stem), "{message:?} vs {captured_message:?}");
    let tb = ours["data"]["traceback"].as_array().expect("traceback list");
    assert!(!tb.is_empty() && tb.iter().all(|l| l.as_str().is_some_and(|s| s.starts_with("  File \""))));
    assert_eq!(
        shape(&ours["data"]["current_inputs"]).as_object().map(|o| o.keys().cloned().collect::<BTreeSet<_>>()),
        shape(&theirs["data"]["current_inputs"]).as_object().map(|o| o.keys().cloned().collect::<BTreeSet<_>>())
    );

    let history = sim.get_json(&format!("/history/{prompt_id}")).await;
    let cap_history =
        cap["history"]["response"]["json"].as_object().expect("obj").values().next().expect("entry").clone();
    assert_history_shape(&history[&prompt_id], &cap_history);
    assert_eq!(history[&prompt_id]["outputs"], json!({}));
    sim.stop().await;
}

#[tokio::test]
async fn run_40_corrupt_upload_fails_at_run_time_like_capture() {
    run_error_case("run_40_execution_error_corrupt_image.json", true).await;
}

#[tokio::test]
async fn run_41_custom_node_error_matches_capture() {
    run_error_case("run_41_execution_error_custom_node.json", false).await;
}

#[tokio::test]
async fn run_60_interrupt_by_prompt_id_and_wrong_id_is_a_no_op() {
    let cap = capture("run_60_interrupt.json");
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(64, 48, 1), &[]).await.0, 200);
    let mut ws = sim.ws("td-capture-da5c8e1f").await;
    let (status, body) = sim.post("/prompt", &cap["post_prompt"]["request"]["json"]).await;
    assert_eq!(status, 200);
    let prompt_id = body["prompt_id"].as_str().expect("id").to_string();

    ws.until(|v| v["type"] == "progress" && v["data"]["value"] == 2).await;
    let queue = sim.get_json("/queue").await;
    let cap_queue = &cap["get_queue_while_running"]["response"]["json"];
    assert_eq!(shape(&queue), shape(cap_queue));
    assert_eq!(queue["queue_running"][0][1], prompt_id.as_str());

    let (status, body) = sim.post("/interrupt", &cap["post_interrupt_wrong_id"]["request"]["json"]).await;
    assert_eq!((status, body), (200, Value::Null));
    // The prompt keeps running after the no-op: two more steps arrive.
    ws.until(|v| v["type"] == "progress" && v["data"]["value"] == 4).await;
    let (status, body) = sim.post("/interrupt", &json!({"prompt_id": prompt_id})).await;
    assert_eq!((status, body), (200, Value::Null));
    ws.until_done(&prompt_id).await;

    let collapse = TokenOpts { ignore_nodes: vec!["1".into()], collapse: true, ..Default::default() };
    let expected = captured_frames(&cap["ws_sequence"]);
    assert_eq!(tokens(&ws.frames, &collapse), tokens(&expected, &collapse));
    let ours =
        ws.frames.iter().filter_map(Frame::json).find(|v| v["type"] == "execution_interrupted").expect("interrupted");
    let theirs =
        expected.iter().filter_map(Frame::json).find(|v| v["type"] == "execution_interrupted").expect("interrupted");
    assert_eq!(keys(&ours["data"]), keys(&theirs["data"]));
    assert_eq!(ours["data"]["node_id"], "2");
    assert_eq!(ours["data"]["node_type"], "SlowPassthrough");

    let history = sim.get_json(&format!("/history/{prompt_id}")).await;
    let cap_history =
        cap["history"]["response"]["json"].as_object().expect("obj").values().next().expect("entry").clone();
    assert_history_shape(&history[&prompt_id], &cap_history);
    sim.stop().await;
}

#[tokio::test]
async fn interrupt_wakes_a_sleeping_progress_tick() {
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(32, 32, 1), &[]).await.0, 200);
    let mut ws = sim.ws("interrupt-tick").await;
    let prompt = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
        "2": {"class_type": "SlowPassthrough", "inputs": {"images": ["1", 0], "steps": 2, "step_seconds": 60.0, "send_preview": false}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "slow"}}
    });
    let prompt_id = sim.queue_prompt(&prompt, "interrupt-tick").await;
    ws.until(|v| v["type"] == "executing" && v["data"]["node"] == "2").await;
    // A global interrupt (no body), as the capture's `interrupt_no_body` case.
    let resp = sim.http.post(sim.url("/interrupt")).send().await.expect("interrupt");
    assert_eq!(resp.status(), 200);
    // The tick is 60 s; the interrupt must not wait for it (EVENT_TIMEOUT guards the wait).
    let started = std::time::Instant::now();
    let frames = ws.until_done(&prompt_id).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(50));
    assert!(frames.iter().filter_map(Frame::json).all(|v| v["type"] != "progress"));
    assert!(frames.iter().filter_map(Frame::json).any(|v| v["type"] == "execution_interrupted"));
    sim.stop().await;
}

#[tokio::test]
async fn http_03_upload_rename_rules_match_capture() {
    let cap = capture("http_03_upload_image.json");
    let sim = Sim::start(|_| {}).await;
    let body_a = png(8, 8, 1);
    let body_b = png(8, 8, 2);
    for case in cap.as_array().expect("cases") {
        let name = case["case"].as_str().expect("case");
        let req = &case["request"];
        let fields: Vec<(String, String)> = req["form"]
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
            .unwrap_or_default();
        let field_refs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (status, body) = match req["files"]["image"].as_array() {
            Some(file) => {
                let filename = file[0].as_str().expect("name");
                let bytes = match (name, filename) {
                    (_, "corrupt.png") => b"not an image".to_vec(),
                    (_, "big.png") => png(320, 240, 3),
                    (n, _) if n.contains("different bytes") || n.contains("overwrite") => body_b.clone(),
                    _ => body_a.clone(),
                };
                sim.upload(filename, bytes, &field_refs).await
            }
            None => {
                let mut form = reqwest::multipart::Form::new();
                for (k, v) in &fields {
                    form = form.text(k.clone(), v.clone());
                }
                let resp = sim.http.post(sim.url("/upload/image")).multipart(form).send().await.expect("upload");
                let status = resp.status().as_u16();
                assert!(resp.bytes().await.expect("body").is_empty());
                (status, Value::Null)
            }
        };
        let expected = &case["response"];
        assert_eq!(status, expected["status"].as_u64().expect("status") as u16, "{name}");
        assert_eq!(body, expected.get("json").cloned().unwrap_or(Value::Null), "{name}");
    }
    assert!(sim.data_dir().join("input/frame (1).png").exists());
    assert!(sim.data_dir().join("input/td/frame.png").exists());
    assert!(sim.data_dir().join("temp/frame.png").exists());
    assert!(!sim.data_dir().join("etc").exists());
    sim.stop().await;
}

#[tokio::test]
async fn http_13_view_rules_match_capture() {
    let cap = capture("http_13_view.json");
    let run10 = capture("run_10_invert_first.json");
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(64, 48, 1), &[]).await.0, 200);
    assert_eq!(sim.upload("frame.png", png(64, 48, 2), &[("subfolder", "td")]).await.0, 200);
    let mut ws = sim.ws("td-capture-da5c8e1f").await;
    let (_, body) = sim.post("/prompt", &run10["post_prompt"]["request"]["json"]).await;
    ws.until_done(body["prompt_id"].as_str().expect("id")).await;

    for case in cap.as_array().expect("cases") {
        let path = case["request"]["path"].as_str().expect("path").replace(' ', "%20");
        let resp = sim.http.get(sim.url(&path)).send().await.expect("view");
        let expected = &case["response"];
        assert_eq!(resp.status().as_u16() as u64, expected["status"].as_u64().expect("status"), "{path}");
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        if expected["status"] != 200 {
            assert!(bytes.is_empty(), "{path} must have an empty body");
            continue;
        }
        assert_eq!(headers["content-type"], expected["headers"]["Content-Type"].as_str().expect("ct"), "{path}");
        assert_eq!(
            headers["content-disposition"],
            expected["headers"]["Content-Disposition"].as_str().expect("cd"),
            "{path}"
        );
        let magic = expected["body"].as_str().expect("body").split("magic ").nth(1).expect("magic");
        let head: String = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
        assert_eq!(head, &magic[..8], "{path}");
        image::load_from_memory(&bytes).expect("decodable image");
    }

    // HTTP Range on a result file.
    let resp = sim
        .http
        .get(sim.url("/view?filename=invert_00001_.png&subfolder=td&type=output"))
        .header("Range", "bytes=1-3")
        .send()
        .await
        .expect("range");
    assert_eq!(resp.status(), 206);
    assert!(resp.headers()["content-range"].to_str().expect("header").starts_with("bytes 1-3/"));
    assert_eq!(resp.bytes().await.expect("body").as_ref(), b"PNG");
    sim.stop().await;
}

#[tokio::test]
async fn http_30_validation_errors_match_capture() {
    let cap = capture("http_30_validation_errors.json");
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(64, 48, 1), &[]).await.0, 200);
    for (name, case) in cap.as_object().expect("cases") {
        let (status, mut body) = sim.post("/prompt", &case["request"]["json"]).await;
        let mut expected = case["response"]["json"].clone();
        assert_eq!(status as u64, case["response"]["status"].as_u64().expect("status"), "{name}: {body}");
        if status == 200 {
            for v in [&mut body, &mut expected] {
                let o = v.as_object_mut().expect("object");
                assert!(o.remove("prompt_id").is_some_and(|id| id.is_string()), "{name}");
                assert!(o.remove("number").is_some_and(|n| n.is_number()), "{name}");
            }
        }
        // dependent_outputs comes from a Python set: compare it as a set.
        for v in [&mut body, &mut expected] {
            if let Some(errors) = v["node_errors"].as_object_mut() {
                for entry in errors.values_mut() {
                    if let Some(list) = entry["dependent_outputs"].as_array_mut() {
                        list.sort_by_key(|a| a.to_string());
                    }
                }
            }
        }
        assert_eq!(body, expected, "{name}");
    }
    sim.stop().await;
}

#[tokio::test]
async fn http_70_queue_ops_match_capture() {
    let cap = capture("http_70_queue_ops.json");
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(32, 24, 1), &[]).await.0, 200);
    let mut ws = sim.ws("td-capture-da5c8e1f").await;
    let slow = |steps: u64| {
        json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
            "2": {"class_type": "SlowPassthrough", "inputs": {"images": ["1", 0], "steps": steps, "step_seconds": 0.1, "send_preview": false}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "td/slow"}}
        })
    };
    let running = sim.queue_prompt(&slow(30), "td-capture-da5c8e1f").await;
    ws.until(|v| v["type"] == "executing" && v["data"]["node"] == "2").await;
    let first = sim.queue_prompt(&slow(31), "td-capture-da5c8e1f").await;
    let second = sim.queue_prompt(&slow(32), "td-capture-da5c8e1f").await;
    let (status, front) = sim.post("/prompt", &cap["post_prompt_front"]["request"]["json"]).await;
    assert_eq!(status, 200);
    assert!(front["number"].as_i64().expect("int") < 0, "front jumps the queue: {front}");
    // 0.3.64 takes any string as prompt_id, as captured ("my-own-id-123").
    let numbered = cap["post_prompt_number_and_prompt_id"]["request"]["json"].clone();
    let (status, body) = sim.post("/prompt", &numbered).await;
    assert_eq!(status, 200);
    assert_eq!(body["number"], 1000.5);
    assert_eq!(body["prompt_id"], "my-own-id-123");

    let queue = sim.get_json("/queue").await;
    assert_eq!(shape(&queue), shape(&cap["queue_with_pending"]["response"]["json"]));
    assert_eq!(queue["queue_running"][0][1], running.as_str());
    let pending: Vec<(f64, String)> = queue["queue_pending"]
        .as_array()
        .expect("pending")
        .iter()
        .map(|i| (i[0].as_f64().expect("number"), i[1].as_str().unwrap_or("").to_string()))
        .collect();
    // Python heap order, as captured: [front, second, first, 1000.5].
    let ids: Vec<&str> = pending.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, [front["prompt_id"].as_str().expect("id"), second.as_str(), first.as_str(), "my-own-id-123"]);

    let (status, body) = sim.post("/queue", &json!({"delete": [second]})).await;
    assert_eq!((status, body), (200, Value::Null));
    let queue = sim.get_json("/queue").await;
    let ids: Vec<&str> =
        queue["queue_pending"].as_array().expect("pending").iter().map(|i| i[1].as_str().unwrap_or("")).collect();
    assert_eq!(ids, [front["prompt_id"].as_str().expect("id"), first.as_str(), "my-own-id-123"]);
    let (status, _) = sim.post("/queue", &json!({"clear": true})).await;
    assert_eq!(status, 200);
    let queue = sim.get_json("/queue").await;
    assert_eq!(queue["queue_pending"], json!([]));
    assert_eq!(queue["queue_running"].as_array().map(Vec::len), Some(1));
    let resp = sim.http.post(sim.url("/interrupt")).body("").send().await.expect("interrupt");
    assert_eq!(resp.status(), 200);
    ws.until_done(&running).await;

    let o =
        TokenOpts { ignore_nodes: vec!["1".into()], status_values: true, skip_progress: true, ..Default::default() };
    let expected = captured_frames(&cap["ws_sequence"]);
    assert_eq!(tokens(&ws.frames, &o), tokens(&expected, &o));
    assert_eq!(sim.get_json("/prompt").await, cap["get_prompt"]["response"]["json"]);
    let (status, body) = sim.post("/free", &cap["post_free"]["request"]["json"]).await;
    assert_eq!((status, body), (200, Value::Null));
    sim.stop().await;
}

#[tokio::test]
async fn http_90_history_listing_and_delete() {
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(8, 8, 1), &[]).await.0, 200);
    let prompt = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "h"}}
    });
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = sim.queue_prompt(&prompt, "hist").await;
        sim.wait_history(&id).await;
        ids.push(id);
    }
    let body = sim.http.get(sim.url("/history?max_items=2")).send().await.expect("history").text().await.expect("text");
    // Insertion order is kept in the JSON text: the last two, oldest first.
    let p1 = body.find(&ids[1]).expect("second present");
    let p2 = body.find(&ids[2]).expect("third present");
    assert!(p1 < p2 && !body.contains(&ids[0]));
    let all = sim.get_json("/history").await;
    assert_eq!(all.as_object().map(|o| o.len()), Some(3));
    assert_eq!(sim.get_json("/history/does-not-exist").await, json!({}));
    let (status, body) = sim.post("/history", &json!({"delete": [ids[0]]})).await;
    assert_eq!((status, body), (200, Value::Null));
    assert_eq!(sim.get_json(&format!("/history/{}", ids[0])).await, json!({}));
    sim.post("/history", &json!({"clear": true})).await;
    assert_eq!(sim.get_json("/history").await, json!({}));
    sim.stop().await;
}

#[tokio::test]
async fn run_80_other_sockets_see_only_broadcasts() {
    let cap = capture("run_80_no_client_id.json");
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(8, 8, 1), &[]).await.0, 200);
    let mut other = sim.ws("some-other-client").await;
    let (status, body) = sim.post("/prompt", &cap["post_prompt"]["request"]["json"]).await;
    assert_eq!(status, 200);
    let prompt_id = body["prompt_id"].as_str().expect("id").to_string();
    // The last broadcast of a prompt without client is `status` with an empty queue.
    other.until(|v| v["type"] == "status" && v["data"]["status"]["exec_info"]["queue_remaining"] == 0).await;
    let expected = captured_frames(&cap["ws_messages_seen_by_other_client"]);
    let all = TokenOpts { status_values: true, ..Default::default() };
    assert_eq!(tokens(&other.frames, &all), tokens(&expected, &all));
    let entry = sim.wait_history(&prompt_id).await;
    assert_eq!(entry["prompt"][3], json!({}));
    sim.stop().await;
}

#[tokio::test]
async fn ws_greeting_handshake_and_reconnect() {
    let sim = Sim::start(|_| {}).await;
    let cap = capture("ws_00_connect_initial.json");
    let mut ws = sim.ws_raw("/ws?clientId=td-capture-da5c8e1f").await;
    assert_eq!(ws.next_json().await, cap[0]["msg"]);

    let flags = capture("ws_51b_feature_flags_handshake.json");
    let mut ws2 = sim.ws_raw("/ws?clientId=td-flags-3f021706").await;
    assert_eq!(ws2.next_json().await, flags[0]["msg"]);
    ws2.send_text(r#"{"type":"feature_flags","data":{"supports_preview_metadata":true}}"#).await;
    assert_eq!(ws2.next_json().await, flags[1]["msg"]);

    let mut anon = sim.ws_raw("/ws").await;
    let first = anon.next_json().await;
    let sid = first["data"]["sid"].as_str().expect("sid");
    assert_eq!(sid.len(), 32);
    assert!(sid.chars().all(|c| c.is_ascii_hexdigit()));

    let misc = capture("http_99_misc.json");
    let resp = sim.http.get(sim.url("/prompt")).header("Origin", "http://evil.example").send().await.expect("get");
    assert_eq!(resp.status().as_u16() as u64, misc["origin_mismatch_status"].as_u64().expect("status"));
    let host = sim.base.trim_start_matches("http://").to_string();
    let resp = sim.http.get(sim.url("/prompt")).header("Origin", format!("http://{host}")).send().await.expect("get");
    assert_eq!(resp.status().as_u16() as u64, misc["origin_match_status"].as_u64().expect("status"));
    drop((ws, ws2, anon));
    sim.stop().await;
}

#[tokio::test]
async fn run_51_feature_flag_clients_get_type_4_previews() {
    let cap = capture("run_51_progress_preview_feature_flags_client.json");
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(64, 48, 1), &[]).await.0, 200);
    let mut ws = sim.ws_raw("/ws?clientId=td-flags-3f021706").await;
    ws.next_json().await;
    ws.send_text(r#"{"type":"feature_flags","data":{"supports_preview_metadata":true}}"#).await;
    assert_eq!(ws.next_json().await["type"], "feature_flags");
    let (status, body) = sim.post("/prompt", &cap["post_prompt"]["request"]["json"]).await;
    assert_eq!(status, 200);
    let prompt_id = body["prompt_id"].as_str().expect("id").to_string();
    let frames = ws.until_done(&prompt_id).await;
    let o = opts(&["1"]);
    assert_eq!(tokens(&frames, &o), tokens(&captured_frames(&cap["ws_sequence"]), &o));
    let preview = frames
        .iter()
        .find_map(|f| match f {
            Frame::Binary(b) => Some(b.clone()),
            Frame::Json(_) => None,
        })
        .expect("a preview frame");
    assert_eq!(&preview[..4], &[0, 0, 0, 4]);
    let meta_len = u32::from_be_bytes([preview[4], preview[5], preview[6], preview[7]]) as usize;
    let meta: Value = serde_json::from_slice(&preview[8..8 + meta_len]).expect("metadata json");
    let captured_meta =
        cap["ws_sequence"].as_array().expect("seq").iter().find(|m| m["frame"] == "binary").expect("bin")["metadata"]
            .clone();
    assert_eq!(keys(&meta), keys(&captured_meta));
    assert_eq!(meta["image_type"], "image/jpeg");
    assert_eq!(&preview[8 + meta_len..8 + meta_len + 2], &[0xff, 0xd8]);
    sim.stop().await;
}

#[tokio::test]
async fn object_info_has_captured_shapes_and_dynamic_lists() {
    let cap = capture("http_02_object_info_subset.json");
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(8, 8, 1), &[]).await.0, 200);
    let all = sim.get_json("/object_info").await;
    for (class, info) in cap.as_object().expect("classes") {
        let ours = &all[class];
        assert_eq!(keys(ours), keys(info), "{class}");
        assert_eq!(ours["input_order"], info["input_order"], "{class}");
        assert_eq!(ours["output"], info["output"], "{class}");
    }
    for class in
        ["ImageScaleBy", "KSampler", "VHS_VideoCombine", "TDComfySimSaveVideoList", "SaveImageWebsocket", "FailAlways"]
    {
        assert!(all.get(class).is_some(), "{class} advertised");
    }
    let one = sim.get_json("/api/object_info/SaveVideo").await;
    assert_eq!(one["SaveVideo"], cap["SaveVideo"]);
    assert_eq!(sim.get_json("/object_info/NoSuchNode").await, json!({}));
    assert_eq!(all["LoadImage"]["input"]["required"]["image"][0], json!(["frame.png"]));
    assert_eq!(
        all["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0],
        json!(["ltx-video-2b-v0.9.5.safetensors", "t5xxl_fp16.safetensors"])
    );
    let features = sim.get_json("/features").await;
    assert_eq!(features, json!({"supports_preview_metadata": true, "max_upload_size": 104857600}));
    let stats = sim.get_json("/system_stats").await;
    assert_eq!(stats["system"]["comfyui_version"], "0.3.64");
    assert_eq!(shape(&stats["devices"][0]).as_object().map(|o| o.len()), Some(7));
    sim.stop().await;
}

#[tokio::test]
async fn absurdly_deep_graphs_fail_validation_instead_of_crashing() {
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(8, 8, 1), &[]).await.0, 200);
    let depth = 1500;
    let mut prompt = serde_json::Map::new();
    prompt.insert("0".into(), json!({"class_type": "LoadImage", "inputs": {"image": "frame.png"}}));
    for i in 1..depth {
        prompt
            .insert(i.to_string(), json!({"class_type": "ImageInvert", "inputs": {"image": [(i - 1).to_string(), 0]}}));
    }
    prompt.insert("out".into(), json!({"class_type": "SaveImage", "inputs": {"images": [(depth - 1).to_string(), 0], "filename_prefix": "deep"}}));
    let (status, body) = sim.post("/prompt", &json!({"prompt": prompt})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    let text = body.to_string();
    assert!(text.contains("RecursionError"), "{text:.300}");
    // A cycle is caught the same way.
    let cycle = json!({
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cycle"}}
    });
    let (status, body) = sim.post("/prompt", &json!({"prompt": cycle})).await;
    assert_eq!(status, 400, "{body}");
    // The server is still alive.
    assert_eq!(sim.get_json("/prompt").await["exec_info"]["queue_remaining"], 0);
    sim.stop().await;
}
