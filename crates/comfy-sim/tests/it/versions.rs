//! One contract test per change C1–C19 of `comfyui-newer-versions.md`: each runs the 0.38 profile
//! over real HTTP / WebSocket and checks the 0.3.64 profile's absence or difference.

use serde_json::{Value, json};

use tdcomfy_sim::PreviewMethod;

use crate::support::{Sim, binary_types, invert_graph, keys, ksampler_graph, png, sim_038, slow_graph};

#[tokio::test]
async fn profiles_report_their_version_in_system_stats() {
    for (sim, version) in [(Sim::start(|_| {}).await, "0.3.64"), (sim_038(|_| {}).await, "0.38.1")] {
        let stats = sim.get_json("/system_stats").await;
        assert_eq!(stats["system"]["comfyui_version"], version);
        sim.stop().await;
    }
}

#[tokio::test]
async fn c4_prompt_id_must_be_a_canonical_uuid_on_0_38_and_any_string_on_0_3_64() {
    let bad_ids = [json!("my-own-id-123"), json!("ED1B3726-29DB-4308-A3E7-1B26E127D1F4"), json!(42)];
    let newer = sim_038(|_| {}).await;
    assert_eq!(newer.upload("frame.png", png(8, 8, 1), &[]).await.0, 200);
    for bad in &bad_ids {
        let (status, body) = newer.post("/prompt", &json!({"prompt": invert_graph("x"), "prompt_id": bad})).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["error"]["type"], "invalid_prompt_id");
        assert_eq!(body["node_errors"], json!({}));
        assert_eq!(keys(&body["error"]), keys(&json!({"type":1,"message":1,"details":1,"extra_info":1})));
    }
    let id = "0b8f3c1e-6d2a-4f5b-9c7e-1a2b3c4d5e6f";
    let (status, body) = newer.post("/prompt", &json!({"prompt": invert_graph("x"), "prompt_id": id})).await;
    assert_eq!((status, body["prompt_id"].clone()), (200, json!(id)));
    newer.wait_history(id).await;
    newer.stop().await;

    let old = Sim::start(|_| {}).await;
    assert_eq!(old.upload("frame.png", png(8, 8, 1), &[]).await.0, 200);
    for (bad, echoed) in bad_ids.iter().zip(["my-own-id-123", "ED1B3726-29DB-4308-A3E7-1B26E127D1F4", "42"]) {
        let (status, body) = old.post("/prompt", &json!({"prompt": invert_graph("x"), "prompt_id": bad})).await;
        assert_eq!((status, body["prompt_id"].clone()), (200, Value::from(echoed)), "{bad}");
        old.wait_history(echoed).await;
    }
    old.stop().await;
}

/// A 0.38 simulator with `frame.png` uploaded and a socket for `client`.
async fn ready_038(client: &str) -> (Sim, crate::support::Ws) {
    let sim = sim_038(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(16, 16, 3), &[]).await.0, 200);
    let ws = sim.ws(client).await;
    (sim, ws)
}

fn job_ids(body: &Value) -> Vec<String> {
    body["jobs"].as_array().expect("jobs").iter().map(|j| j["id"].as_str().expect("id").to_string()).collect()
}

#[tokio::test]
async fn c1_jobs_list_and_detail_on_0_38_and_absent_on_0_3_64() {
    let (sim, mut ws) = ready_038("c1").await;
    let done = sim.queue_prompt(&invert_graph("c1/done"), "c1").await;
    ws.until_done(&done).await;
    let running = sim.queue_prompt(&slow_graph(40, "c1/slow"), "c1").await;
    ws.until(|v| v["type"] == "executing" && v["data"]["node"] == "2").await;
    let pending = sim.queue_prompt(&invert_graph("c1/pending"), "c1").await;

    let (status, all) = sim.get("/api/jobs").await;
    assert_eq!(status, 200, "{all}");
    // Newest first by default (sort_by created_at, desc).
    assert_eq!(job_ids(&all), [pending.clone(), running.clone(), done.clone()]);
    assert_eq!(all["pagination"], json!({"offset": 0, "limit": null, "total": 3, "has_more": false}));
    let statuses: Vec<&str> =
        all["jobs"].as_array().expect("jobs").iter().map(|j| j["status"].as_str().expect("status")).collect();
    assert_eq!(statuses, ["pending", "in_progress", "completed"]);
    let finished = &all["jobs"][2];
    assert_eq!(finished["outputs_count"], 1);
    assert_eq!(finished["preview_output"]["nodeId"], "3");
    assert!(finished["execution_end_time"].as_i64() >= finished["execution_start_time"].as_i64());
    assert!(finished.get("outputs").is_none(), "the list has no outputs: {finished}");

    let (_, active) = sim.get("/api/jobs?status=in_progress,pending").await;
    assert_eq!(job_ids(&active), [pending.clone(), running.clone()]);
    let (_, page) = sim.get("/api/jobs?limit=1&offset=1&sort_order=asc").await;
    assert_eq!(job_ids(&page), [running.as_str()]);
    assert_eq!(page["pagination"], json!({"offset": 1, "limit": 1, "total": 3, "has_more": true}));
    let (status, body) = sim.get("/api/jobs?status=bogus").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().expect("error").contains("bogus"), "{body}");
    let (status, _) = sim.get("/api/jobs?limit=0").await;
    assert_eq!(status, 400);

    let (status, detail) = sim.get(&format!("/api/jobs/{done}")).await;
    assert_eq!(status, 200);
    assert_eq!(detail["status"], "completed");
    assert!(detail["outputs"]["3"]["images"][0]["filename"].is_string(), "{detail}");
    assert_eq!(detail["execution_status"]["status_str"], "success");
    assert_eq!(detail["workflow"]["prompt"]["2"]["class_type"], "ImageInvert");
    let (status, detail) = sim.get(&format!("/api/jobs/{running}")).await;
    assert_eq!((status, detail["status"].clone()), (200, json!("in_progress")));
    let (status, body) = sim.get("/api/jobs/0b8f3c1e-6d2a-4f5b-9c7e-1a2b3c4d5e6f").await;
    assert_eq!((status, body), (404, json!({"error": "Job not found"})));
    // Named workflows can be filtered.
    let tagged = json!({"prompt": invert_graph("c1/tagged"), "client_id": "c1",
        "extra_data": {"extra_pnginfo": {"workflow": {"id": "wf-1"}}}});
    let (_, queued) = sim.post("/prompt", &tagged).await;
    let (_, by_workflow) = sim.get("/api/jobs?workflow_id=wf-1").await;
    assert_eq!(job_ids(&by_workflow), [queued["prompt_id"].as_str().expect("id")]);
    assert_eq!(by_workflow["jobs"][0]["workflow_id"], "wf-1");
    sim.post("/interrupt", &json!({})).await;
    sim.stop().await;

    let old = Sim::start(|_| {}).await;
    for path in ["/api/jobs", "/api/jobs?limit=1", "/api/jobs/0b8f3c1e-6d2a-4f5b-9c7e-1a2b3c4d5e6f"] {
        assert_eq!(old.get(path).await.0, 404, "{path} on 0.3.64");
    }
    old.stop().await;
}

#[tokio::test]
async fn c2_jobs_sort_by_accepts_created_at_and_execution_duration_only() {
    let (sim, mut ws) = ready_038("c2").await;
    let short = sim.queue_prompt(&slow_graph(1, "c2/short"), "c2").await;
    ws.until_done(&short).await;
    let long = sim.queue_prompt(&slow_graph(6, "c2/long"), "c2").await;
    ws.until_done(&long).await;
    let (status, body) = sim.get("/api/jobs?sort_by=execution_duration&sort_order=desc").await;
    assert_eq!(status, 200);
    assert_eq!(job_ids(&body), [long.clone(), short.clone()]);
    let (status, body) = sim.get("/api/jobs?sort_by=created_at&sort_order=asc").await;
    assert_eq!(status, 200);
    assert_eq!(job_ids(&body), [short, long]);
    for bad in ["create_time", "execution_time"] {
        let (status, body) = sim.get(&format!("/api/jobs?sort_by={bad}")).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["error"], "sort_by must be 'created_at' or 'execution_duration'");
    }
    sim.stop().await;
    let old = Sim::start(|_| {}).await;
    assert_eq!(old.get("/api/jobs?sort_by=created_at").await.0, 404);
    old.stop().await;
}

#[tokio::test]
async fn c3_jobs_cancel_is_atomic_on_0_38_and_absent_on_0_3_64() {
    let (sim, mut ws) = ready_038("c3").await;
    // Cancelling right after queueing (the prompt may just be starting) always stops it: the
    // interrupt is aimed at the prompt and survives its start-of-prompt reset.
    for round in 0..5 {
        let id = sim.queue_prompt(&slow_graph(30, &format!("c3/race{round}")), "c3").await;
        let (status, body) = sim.post(&format!("/api/jobs/{id}/cancel"), &json!({})).await;
        assert_eq!((status, body), (200, json!({"cancelled": true})));
        let (_, detail) = loop {
            let (status, detail) = sim.get(&format!("/api/jobs/{id}")).await;
            if status == 404 || !matches!(detail["status"].as_str(), Some("pending" | "in_progress")) {
                break (status, detail);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        // Either taken out of the queue before it started (gone) or interrupted (cancelled).
        assert!(detail.is_null() || detail["status"] == "cancelled", "round {round}: {detail}");
    }
    let running = sim.queue_prompt(&slow_graph(40, "c3/run"), "c3").await;
    ws.until(|v| v["type"] == "executing" && v["data"]["node"] == "2" && v["data"]["prompt_id"] == running).await;
    let pending = sim.queue_prompt(&invert_graph("c3/pending"), "c3").await;
    let (status, body) =
        sim.post("/api/jobs/cancel", &json!({"job_ids": [pending, "0b8f3c1e-6d2a-4f5b-9c7e-1a2b3c4d5e6f"]})).await;
    assert_eq!(status, 200);
    assert_eq!(body["cancelled"], json!([pending]));
    assert_eq!(sim.get(&format!("/api/jobs/{pending}")).await.0, 404);
    let (status, body) = sim.post(&format!("/api/jobs/{running}/cancel"), &json!({})).await;
    assert_eq!((status, body), (200, json!({"cancelled": true})));
    ws.until_done(&running).await;
    assert_eq!(sim.get(&format!("/api/jobs/{running}")).await.1["status"], "cancelled");
    // Finished and unknown jobs: 200, nothing cancelled.
    for id in [running.as_str(), "0b8f3c1e-6d2a-4f5b-9c7e-1a2b3c4d5e6f"] {
        let (status, body) = sim.post(&format!("/api/jobs/{id}/cancel"), &json!({})).await;
        assert_eq!((status, body), (200, json!({"cancelled": false})), "{id}");
    }
    let (status, body) = sim.post("/api/jobs/cancel", &json!({"job_ids": ["not-a-uuid", running]})).await;
    assert_eq!(status, 400);
    assert_eq!(body["invalid_ids"], json!(["not-a-uuid"]));
    // The legacy interrupt is kept.
    let legacy = sim.queue_prompt(&slow_graph(40, "c3/legacy"), "c3").await;
    ws.until(|v| v["type"] == "executing" && v["data"]["node"] == "2" && v["data"]["prompt_id"] == legacy).await;
    assert_eq!(sim.post("/interrupt", &json!({"prompt_id": legacy})).await.0, 200);
    let frames = ws.until_done(&legacy).await;
    assert!(frames.iter().filter_map(|f| f.json()).any(|v| v["type"] == "execution_interrupted"));
    sim.stop().await;

    let old = Sim::start(|_| {}).await;
    assert_eq!(old.post("/api/jobs/0b8f3c1e-6d2a-4f5b-9c7e-1a2b3c4d5e6f/cancel", &json!({})).await.0, 404);
    assert_eq!(old.post("/api/jobs/cancel", &json!({"job_ids": []})).await.0, 404);
    assert_eq!(old.post("/interrupt", &json!({"prompt_id": "x"})).await.0, 200);
    old.stop().await;
}

#[tokio::test]
async fn c8_feature_flags_reply_and_features_route_per_version() {
    let expected_038 = json!({
        "supports_preview_metadata": true, "max_upload_size": 104857600,
        "supports_model_type_tags": true, "extension": {"manager": {"supports_v4": true}},
        "node_replacements": true, "assets": false,
    });
    let expected_0364 = json!({"supports_preview_metadata": true, "max_upload_size": 104857600});
    for (sim, expected) in [(sim_038(|_| {}).await, expected_038), (Sim::start(|_| {}).await, expected_0364)] {
        assert_eq!(sim.get_json("/features").await, expected);
        let mut ws = sim.ws("c8").await;
        ws.send_text(r#"{"type":"feature_flags","data":{"supports_preview_metadata":true}}"#).await;
        let reply = ws.next_json().await;
        assert_eq!(reply["type"], "feature_flags");
        assert_eq!(reply["data"], expected);
        sim.stop().await;
    }
    let with_assets = sim_038(|c| c.assets = true).await;
    assert_eq!(with_assets.get_json("/features").await["assets"], true);
    with_assets.stop().await;
}

#[tokio::test]
async fn c15_system_stats_lists_every_gpu_and_the_newer_fields_on_0_38() {
    let newer = sim_038(|c| c.gpus = 3).await;
    let stats = newer.get_json("/system_stats").await;
    let devices = stats["devices"].as_array().expect("devices");
    assert_eq!(devices.iter().map(|d| d["index"].as_u64().expect("index")).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(devices[0]["name"].as_str().expect("name").starts_with("cuda:0"), "primary first");
    assert_eq!(stats["system"]["os"], "linux");
    assert!(stats["system"]["comfy_package_versions"].is_object(), "{stats}");
    assert!(stats["system"]["deploy_environment"].is_string(), "{stats}");
    assert!(stats["system"]["argv"].is_array());
    newer.stop().await;
    let old = Sim::start(|c| c.gpus = 3).await;
    let stats = old.get_json("/system_stats").await;
    assert_eq!(stats["devices"].as_array().map(Vec::len), Some(1));
    assert_eq!(stats["system"]["os"], "posix");
    assert!(stats["system"].get("comfy_package_versions").is_none());
    assert!(stats["system"].get("deploy_environment").is_none());
    old.stop().await;
}

#[tokio::test]
async fn c18_loopback_host_with_a_foreign_origin_is_403_on_both_profiles() {
    for sim in [sim_038(|_| {}).await, Sim::start(|_| {}).await] {
        let port = sim.base.rsplit(':').next().expect("port").to_string();
        let foreign = sim.http.get(sim.url("/system_stats")).header("Origin", "http://evil.example").send().await;
        assert_eq!(foreign.expect("GET").status(), 403);
        let same = sim
            .http
            .get(sim.url("/system_stats"))
            .header("Origin", format!("http://127.0.0.1:{port}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(same.status(), 200);
        let none = sim.http.get(sim.url("/system_stats")).send().await.expect("GET");
        assert_eq!(none.status(), 200);
        sim.stop().await;
    }
}

#[tokio::test]
async fn c19_bearer_auth_guards_every_route_when_a_token_is_set() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    for sim in [
        sim_038(|c| c.auth_token = Some("s3cret/+".into())).await,
        Sim::start(|c| c.auth_token = Some("s3cret/+".into())).await,
    ] {
        for path in ["/system_stats", "/api/prompt", "/queue", "/object_info/LoadImage", "/view?filename=x.png"] {
            let resp = sim.http.get(sim.url(path)).send().await.expect("GET");
            assert_eq!(resp.status(), 401, "{path}");
            let body: Value = resp.json().await.expect("json");
            assert_eq!(body["error"]["type"], "unauthorized", "{path}");
            let wrong = sim.http.get(sim.url(path)).bearer_auth("nope").send().await.expect("GET");
            assert_eq!(wrong.status(), 401, "{path}");
        }
        let ok = sim.http.get(sim.url("/system_stats")).bearer_auth("s3cret/+").send().await.expect("GET");
        assert_eq!(ok.status(), 200);
        let (status, _) = {
            let resp = sim.http.post(sim.url("/prompt")).json(&json!({"prompt": {}})).send().await.expect("POST");
            (resp.status().as_u16(), ())
        };
        assert_eq!(status, 401);
        // The socket: refused without a token, accepted with ?token= or the header.
        match tokio_tungstenite::connect_async(format!("{}/ws?clientId=c19", sim.ws_base)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
            other => panic!("ws without a token: {:?}", other.map(|_| ())),
        }
        let mut ws = sim.ws_raw("/ws?clientId=c19&token=s3cret%2F%2B").await;
        assert_eq!(ws.next_json().await["type"], "status");
        let mut request = format!("{}/ws?clientId=c19b", sim.ws_base).into_client_request().expect("request");
        request.headers_mut().insert("Authorization", "Bearer s3cret/+".parse().expect("header"));
        assert!(tokio_tungstenite::connect_async(request).await.is_ok());
        sim.stop().await;
    }
    // No token configured: no auth, on either profile.
    for sim in [sim_038(|_| {}).await, Sim::start(|_| {}).await] {
        assert_eq!(sim.get("/system_stats").await.0, 200);
        sim.stop().await;
    }
}

/// Runs the `KSampler` graph for `client` with `extra_data`; returns the frames of the run.
async fn sample(sim: &Sim, ws: &mut crate::support::Ws, client: &str, extra_data: Value) -> Vec<crate::support::Frame> {
    let body = json!({"prompt": ksampler_graph("c5/s"), "client_id": client, "extra_data": extra_data});
    let (status, queued) = sim.post("/prompt", &body).await;
    assert_eq!(status, 200, "{queued}");
    ws.until_done(queued["prompt_id"].as_str().expect("id")).await
}

#[tokio::test]
async fn c5_preview_method_is_per_prompt_on_0_38_and_cli_only_on_0_3_64() {
    let steps = 4; // progress_steps of the test harness
    let newer = sim_038(|_| {}).await;
    let mut ws = newer.ws("c5").await;
    // CLI default none: previews only for a prompt that asks, and the next prompt is back to none.
    assert_eq!(binary_types(&sample(&newer, &mut ws, "c5", json!({})).await), Vec::<u32>::new());
    assert_eq!(binary_types(&sample(&newer, &mut ws, "c5", json!({"preview_method": "auto"})).await), vec![1; steps]);
    assert_eq!(binary_types(&sample(&newer, &mut ws, "c5", json!({})).await), Vec::<u32>::new());
    newer.stop().await;
    let newer = sim_038(|c| c.preview_method = PreviewMethod::Taesd).await;
    let mut ws = newer.ws("c5").await;
    assert_eq!(
        binary_types(&sample(&newer, &mut ws, "c5", json!({"preview_method": "none"})).await),
        Vec::<u32>::new()
    );
    assert_eq!(binary_types(&sample(&newer, &mut ws, "c5", json!({})).await), vec![1; steps]);
    newer.stop().await;

    // 0.3.64: extra_data.preview_method is ignored; only the CLI setting counts.
    let old = Sim::start(|_| {}).await;
    let mut ws = old.ws("c5").await;
    assert_eq!(binary_types(&sample(&old, &mut ws, "c5", json!({"preview_method": "auto"})).await), Vec::<u32>::new());
    old.stop().await;
    let old = Sim::start(|c| c.preview_method = PreviewMethod::Auto).await;
    let mut ws = old.ws("c5").await;
    let frames = sample(&old, &mut ws, "c5", json!({"preview_method": "none"})).await;
    assert_eq!(binary_types(&frames), vec![1; steps]);
    // A real JPEG after the 8-byte header.
    let jpeg = frames.iter().find_map(|f| match f {
        crate::support::Frame::Binary(b) => Some(b[8..].to_vec()),
        _ => None,
    });
    let jpeg = jpeg.expect("a preview");
    assert_eq!(image::guess_format(&jpeg).expect("format"), image::ImageFormat::Jpeg);
    old.stop().await;
}

#[tokio::test]
async fn c9_type_4_previews_only_for_clients_that_negotiated_them_on_both_profiles() {
    for sim in [
        sim_038(|c| c.preview_method = PreviewMethod::Auto).await,
        Sim::start(|c| c.preview_method = PreviewMethod::Auto).await,
    ] {
        let mut plain = sim.ws("c9-plain").await;
        assert_eq!(binary_types(&sample(&sim, &mut plain, "c9-plain", json!({})).await), vec![1; 4]);
        let mut meta = sim.ws("c9-meta").await;
        meta.send_text(r#"{"type":"feature_flags","data":{"supports_preview_metadata":true}}"#).await;
        assert_eq!(meta.next_json().await["type"], "feature_flags");
        let frames = sample(&sim, &mut meta, "c9-meta", json!({})).await;
        assert_eq!(binary_types(&frames), vec![4; 4]);
        let crate::support::Frame::Binary(first) =
            frames.iter().find(|f| matches!(f, crate::support::Frame::Binary(_))).expect("preview")
        else {
            unreachable!()
        };
        let len = u32::from_be_bytes([first[4], first[5], first[6], first[7]]) as usize;
        let info: Value = serde_json::from_slice(&first[8..8 + len]).expect("metadata");
        assert_eq!(info["node_id"], "5");
        assert_eq!(info["image_type"], "image/jpeg");
        assert!(info["prompt_id"].is_string());
        sim.stop().await;
    }
}

#[tokio::test]
async fn c7_loader_nodes_report_a_loading_activity_on_0_38_only() {
    for (sim, newer) in [(sim_038(|_| {}).await, true), (Sim::start(|_| {}).await, false)] {
        let mut ws = sim.ws("c7").await;
        let frames = sample(&sim, &mut ws, "c7", json!({})).await;
        let states: Vec<&Value> = frames
            .iter()
            .filter_map(|f| f.json())
            .filter(|v| v["type"] == "progress_state")
            .map(|v| &v["data"]["nodes"])
            .collect();
        let loading = states.iter().filter(|n| n["1"]["activity"] == "loading" && n["1"]["state"] == "running").count();
        let any_activity =
            states.iter().any(|n| n.as_object().expect("nodes").values().any(|e| e.get("activity").is_some()));
        if newer {
            assert!(loading > 0, "the loader shows loading while it runs: {states:?}");
            let last = states.last().expect("states");
            assert_eq!(last["1"]["state"], "finished");
            assert!(last["1"].get("activity").is_none(), "no activity once finished");
            assert!(states.iter().all(|n| n["5"].get("activity").is_none()), "the sampler is not loading");
        } else {
            assert!(!any_activity, "0.3.64 has no activity: {states:?}");
        }
        sim.stop().await;
    }
}

#[tokio::test]
async fn c12_expanded_nodes_carry_display_parent_and_real_ids_on_0_38() {
    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}, "_meta": {"title": "Invert [sim:subgraph]"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c12"}, "_meta": {"title": "Save [sim:subgraph]"}}
    });
    let (sim, mut ws) = ready_038("c12").await;
    let id = sim.queue_prompt(&graph, "c12").await;
    let frames = ws.until_done(&id).await;
    let json_frames: Vec<&Value> = frames.iter().filter_map(|f| f.json()).collect();
    let executing: Vec<(String, String)> = json_frames
        .iter()
        .filter(|v| v["type"] == "executing" && v["data"]["node"].is_string())
        .map(|v| {
            (v["data"]["node"].as_str().unwrap_or("").into(), v["data"]["display_node"].as_str().unwrap_or("").into())
        })
        .collect();
    assert!(executing.contains(&("2.0".into(), "2".into())), "{executing:?}");
    let state = json_frames.iter().rev().find(|v| v["type"] == "progress_state").expect("progress_state");
    let child = &state["data"]["nodes"]["2.0"];
    assert_eq!(
        (child["display_node_id"].clone(), child["parent_node_id"].clone(), child["real_node_id"].clone()),
        (json!("2"), json!("2"), json!("2.0"))
    );
    assert_eq!(state["data"]["nodes"]["2"]["parent_node_id"], Value::Null);
    let executed = json_frames.iter().find(|v| v["type"] == "executed").expect("executed");
    assert_eq!(
        (executed["data"]["node"].clone(), executed["data"]["display_node"].clone()),
        (json!("3.0"), json!("3"))
    );
    let entry = sim.wait_history(&id).await;
    assert!(entry["outputs"]["3.0"]["images"][0]["filename"].is_string(), "{entry}");
    assert_eq!(entry["meta"]["3.0"]["display_node"], "3");
    sim.stop().await;

    // 0.3.64: no expansion; every id is one of the submitted graph.
    let old = Sim::start(|_| {}).await;
    assert_eq!(old.upload("frame.png", png(16, 16, 3), &[]).await.0, 200);
    let mut ws = old.ws("c12").await;
    let id = old.queue_prompt(&graph, "c12").await;
    let frames = ws.until_done(&id).await;
    for v in frames.iter().filter_map(|f| f.json()) {
        if let Some(node) = v["data"]["node"].as_str() {
            assert!(["1", "2", "3"].contains(&node), "{v}");
        }
    }
    assert!(old.wait_history(&id).await["outputs"]["3"].is_object());
    old.stop().await;
}

#[tokio::test]
async fn c6_execution_events_only_to_the_client_and_reconnect_replaces_the_socket_on_0_38() {
    for (sim, newer) in [(sim_038(|_| {}).await, true), (Sim::start(|_| {}).await, false)] {
        assert_eq!(sim.upload("frame.png", png(16, 16, 3), &[]).await.0, 200);
        // Without a client_id, no socket gets the execution events (progress still broadcasts).
        let mut watcher = sim.ws("c6-watch").await;
        let (status, _) = sim.post("/prompt", &json!({"prompt": invert_graph("c6/anon")})).await;
        assert_eq!(status, 200);
        watcher.until(|v| v["type"] == "status" && v["data"]["status"]["exec_info"]["queue_remaining"] == 0).await;
        let kinds: Vec<&str> =
            watcher.frames.iter().filter_map(|f| f.json()).filter_map(|v| v["type"].as_str()).collect();
        assert!(kinds.contains(&"progress_state"), "{kinds:?}");
        for gated in ["execution_start", "execution_cached", "executed", "execution_success"] {
            assert!(!kinds.contains(&gated), "{gated} without a client_id: {kinds:?}");
        }

        let mut first = sim.ws("c6").await;
        let id = sim.queue_prompt(&slow_graph(40, "c6/slow"), "c6").await;
        first.until(|v| v["type"] == "executing" && v["data"]["node"] == "2").await;
        let mut second = sim.ws_raw("/ws?clientId=c6").await;
        assert_eq!(second.next_json().await["type"], "status");
        assert_eq!(second.next_json().await, json!({"type": "executing", "data": {"node": "2"}}));
        if newer {
            // The replaced socket is closed by the server.
            while first.next().await.is_some() {}
        }
        assert_eq!(sim.post("/interrupt", &json!({"prompt_id": id})).await.0, 200);
        let frames = second.until_done(&id).await;
        assert!(frames.iter().filter_map(|f| f.json()).any(|v| v["type"] == "execution_interrupted"));
        if !newer {
            // 0.3.64 leaves the replaced socket open and deaf: nothing arrives, it does not close.
            let quiet = tokio::time::timeout(std::time::Duration::from_millis(300), first.next()).await;
            assert!(quiet.is_err(), "0.3.64's replaced socket neither closes nor hears: {quiet:?}");
        }
        sim.stop().await;
    }
}

#[tokio::test]
async fn c10_deprecated_nodes_are_replaced_on_0_38_and_unknown_on_0_3_64() {
    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
        "2": {"class_type": "InvertImage", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c10"}}
    });
    let (sim, mut ws) = ready_038("c10").await;
    let listing = sim.get_json("/node_replacements").await;
    assert_eq!(listing["InvertImage"][0]["new_node_id"], "ImageInvert");
    assert_eq!(listing["InvertImage"][0]["input_mapping"], json!([{"new_id": "image", "old_id": "images"}]));
    assert_eq!(sim.get_json("/api/node_replacements").await, listing);
    let id = sim.queue_prompt(&graph, "c10").await;
    ws.until_done(&id).await;
    let entry = sim.wait_history(&id).await;
    assert_eq!(entry["status"]["status_str"], "success");
    // The stored prompt shows the new graph: same id, new class, renamed input.
    assert_eq!(entry["prompt"][2]["2"], json!({"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}));
    assert!(entry["outputs"]["3"]["images"][0]["filename"].is_string());
    sim.stop().await;

    let old = Sim::start(|_| {}).await;
    assert_eq!(old.upload("frame.png", png(16, 16, 3), &[]).await.0, 200);
    assert_eq!(old.get("/node_replacements").await.0, 404);
    let (status, body) = old.post("/prompt", &json!({"prompt": graph})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_prompt");
    assert_eq!(body["error"]["message"], "Cannot execute because node InvertImage does not exist.");
    old.stop().await;
}

#[tokio::test]
async fn c11_newer_validation_error_types_on_0_38_and_captured_shapes_on_0_3_64() {
    let newer = sim_038(|_| {}).await;
    let old = Sim::start(|_| {}).await;
    for sim in [&newer, &old] {
        assert_eq!(sim.upload("frame.png", png(16, 16, 3), &[]).await.0, 200);
    }

    // Unknown class.
    let unknown = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
        "2": {"class_type": "NoSuchNode", "inputs": {"image": ["1", 0]}, "_meta": {"title": "My node"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c11"}}
    });
    let (status, body) = submit(&newer, &unknown).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"],
        json!({"type": "missing_node_type", "message": "Node 'My node' not found. The custom node may not be installed.",
            "details": "Node ID '#2'", "extra_info": {"node_id": "2", "class_type": "NoSuchNode", "node_title": "My node"}})
    );
    let (status, body) = submit(&old, &unknown).await;
    assert_eq!((status, body["error"]["type"].clone()), (400, json!("invalid_prompt")));

    // No class_type at all.
    let classless = json!({"1": {"inputs": {}}, "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "c11"}}});
    let (status, body) = submit(&newer, &classless).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "missing_node_type");
    assert_eq!(body["error"]["extra_info"], json!({"node_id": "1", "class_type": null, "node_title": null}));
    assert!(body["error"]["message"].as_str().expect("message").contains("ID #1"), "{body}");
    let (_, body) = submit(&old, &classless).await;
    assert_eq!(body["error"]["message"], "Cannot execute because a node is missing the class_type property.");

    // No outputs: the same shape on both.
    let no_outputs = json!({"1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}}});
    for sim in [&newer, &old] {
        let (status, body) = submit(sim, &no_outputs).await;
        assert_eq!(status, 400);
        assert_eq!(
            body["error"],
            json!({"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}})
        );
    }

    // A cycle: named on 0.38; 0.3.64 only says the outputs failed.
    let cycle = json!({
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c11"}}
    });
    let (status, body) = submit(&newer, &cycle).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "dependency_cycle");
    let mut ids: Vec<&str> =
        body["error"]["extra_info"]["node_ids"].as_array().expect("ids").iter().filter_map(Value::as_str).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["1", "2"]);
    let (status, body) = submit(&old, &cycle).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation", "{body}");

    // A dynamic input no group declares.
    let dynamic = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0], "extra.value": 3}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c11"}}
    });
    let (status, body) = submit(&newer, &dynamic).await;
    assert_eq!(status, 400);
    assert_eq!(body["node_errors"]["2"]["errors"][0]["type"], "invalid_dynamic_input", "{body}");
    assert_eq!(body["node_errors"]["2"]["errors"][0]["extra_info"]["input_name"], "extra.value");
    let (status, _) = submit(&old, &dynamic).await;
    assert_eq!(status, 200, "0.3.64 ignores undeclared inputs");

    // custom_validation_failed (captured on 0.3.64) and wrapped `{"__value__": …}` widget values.
    for sim in [&newer, &old] {
        let missing_file = json!({"1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "c11"}}});
        let (status, body) = submit(sim, &missing_file).await;
        assert_eq!(status, 400);
        assert_eq!(body["node_errors"]["1"]["errors"][0]["type"], "custom_validation_failed");
        let wrapped = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
            "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": {"__value__": "bilinear"},
                "width": {"__value__": 32}, "height": 16, "crop": "disabled"}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c11"}}
        });
        let (status, body) = submit(sim, &wrapped).await;
        assert_eq!(status, 200, "{body}");
    }
    newer.stop().await;
    old.stop().await;
}

async fn submit(sim: &Sim, graph: &Value) -> (u16, Value) {
    sim.post("/prompt", &json!({"prompt": graph})).await
}

/// Every file entry of a prompt's history outputs.
fn file_entries(history: &Value) -> Vec<Value> {
    let mut entries = Vec::new();
    for ui in history["outputs"].as_object().expect("outputs").values() {
        for items in ui.as_object().expect("ui").values() {
            for item in items.as_array().into_iter().flatten() {
                if item.get("filename").is_some() {
                    entries.push(item.clone());
                }
            }
        }
    }
    entries
}

#[tokio::test]
async fn c13_assets_add_ids_to_outputs_and_an_asset_to_uploads_on_0_38_with_assets_on() {
    let frame = png(16, 16, 3);
    let with_assets = sim_038(|c| c.assets = true).await;
    let (status, uploaded) = with_assets.upload("frame.png", frame.clone(), &[]).await;
    assert_eq!(status, 200, "{uploaded}");
    assert_eq!((uploaded["name"].clone(), uploaded["type"].clone()), (json!("frame.png"), json!("input")));
    let asset = &uploaded["asset"];
    assert_eq!(asset["size"], json!(frame.len()), "{uploaded}");
    assert_eq!(asset["mime_type"], "image/png");
    let hash = asset["asset_hash"].as_str().expect("asset_hash");
    assert!(hash.starts_with("blake3:") && hash.len() == "blake3:".len() + 64, "{hash}");
    let id = with_assets.queue_prompt(&invert_graph("c13/a"), "c13").await;
    let entries = file_entries(&with_assets.wait_history(&id).await);
    assert!(!entries.is_empty());
    for entry in &entries {
        assert!(entry["id"].as_str().is_some_and(|v| v.len() == 36), "{entry}");
        assert!(entry["preview_id"].is_string(), "{entry}");
        assert_eq!(entry["type"], "output", "{entry}");
    }
    with_assets.stop().await;

    // Off by default on 0.38, and not a 0.3.64 feature at all: the captured shapes.
    for sim in [sim_038(|_| {}).await, Sim::start(|c| c.assets = true).await] {
        let (status, uploaded) = sim.upload("frame.png", frame.clone(), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(keys(&uploaded), keys(&json!({"name": 1, "subfolder": 1, "type": 1})), "{uploaded}");
        let id = sim.queue_prompt(&invert_graph("c13/b"), "c13").await;
        for entry in file_entries(&sim.wait_history(&id).await) {
            assert_eq!(keys(&entry), keys(&json!({"filename": 1, "subfolder": 1, "type": 1})), "{entry}");
        }
        sim.stop().await;
    }
}

#[tokio::test]
async fn c17_video_outputs_keep_their_keys_on_both_profiles_and_0_38_classifies_them_as_video() {
    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 24.0}},
        "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "c17/core",
            "format": "auto", "codec": "auto"}},
        "4": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "frame_rate": 24.0, "loop_count": 0,
            "filename_prefix": "c17/vhs", "format": "video/h264-mp4", "pingpong": false, "save_output": true}}
    });
    for newer in [false, true] {
        let sim = if newer { sim_038(|_| {}).await } else { Sim::start(|_| {}).await };
        assert_eq!(sim.upload("frame.png", png(16, 16, 3), &[]).await.0, 200);
        let id = sim.queue_prompt(&graph, "c17").await;
        let history = sim.wait_history(&id).await;
        let core = &history["outputs"]["3"];
        assert!(core["images"][0]["filename"].as_str().is_some_and(|f| f.ends_with(".mp4")), "{core}");
        assert_eq!(core["animated"], json!([true]), "{core}");
        let vhs = &history["outputs"]["4"];
        assert!(vhs["gifs"][0]["filename"].as_str().is_some_and(|f| f.ends_with(".mp4")), "{vhs}");
        let (status, job) = sim.get(&format!("/api/jobs/{id}")).await;
        if newer {
            assert_eq!(status, 200, "{job}");
            assert_eq!(job["preview_output"]["mediaType"], "video", "{job}");
        } else {
            assert_eq!(status, 404, "no jobs API on 0.3.64");
        }
        sim.stop().await;
    }
}
