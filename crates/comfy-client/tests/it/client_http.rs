//! The HTTP client against the fake: uploads (bytes and streamed files), streamed downloads,
//! queue control that always names the prompt, and error classification.

use futures_util::StreamExt;
use serde_json::json;
use tdcomfy_comfy::{
    ComfyEndpoint, ComfyError, FolderType, ImageUpload, MediaKind, OutputFile, PromptId, QueuePosition,
};

use crate::fake::{Fake, client_for, success_entry};

#[tokio::test]
async fn upload_returns_the_name_comfyui_chose() {
    let fake = Fake::start().await;
    fake.with(|s| s.rename_uploads_to = Some("frame (1).png".into()));
    let client = fake.client();
    let uploaded = client
        .upload_image(ImageUpload::from_bytes("frame.png", vec![1u8, 2, 3]).in_subfolder("td/job-1"))
        .await
        .expect("upload");
    assert_eq!(uploaded.name, "frame (1).png");
    assert_eq!(uploaded.subfolder, "td/job-1");
    assert_eq!(uploaded.kind, FolderType::Input);
    assert_eq!(uploaded.load_image_ref(), "td/job-1/frame (1).png");
    fake.with(|s| {
        let upload = &s.uploads[0];
        assert_eq!(
            (upload.filename.as_str(), upload.subfolder.as_str(), upload.overwrite),
            ("frame.png", "td/job-1", false)
        );
        assert_eq!(upload.bytes, vec![1, 2, 3]);
    });
}

#[tokio::test]
async fn upload_streams_a_file_from_disk() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.png");
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &content).expect("write");
    let uploaded =
        fake.client().upload_image(ImageUpload::from_file("big.png", &path).overwrite(true)).await.expect("upload");
    assert_eq!(uploaded.name, "big.png");
    assert_eq!(uploaded.load_image_ref(), "big.png");
    fake.with(|s| {
        assert!(s.uploads[0].overwrite);
        assert!(s.uploads[0].bytes == content, "file arrived intact");
    });

    let missing = fake.client().upload_image(ImageUpload::from_file("x.png", dir.path().join("missing.png"))).await;
    assert!(matches!(missing, Err(ComfyError::UploadSource { .. })));
}

#[tokio::test]
async fn unsafe_upload_names_are_refused_before_sending() {
    let fake = Fake::start().await;
    let client = fake.client();
    for (name, subfolder) in
        [("../evil.png", ""), ("a/b.png", ""), ("", ""), ("ok.png", "../../etc"), ("ok.png", "/abs")]
    {
        let result = client.upload_image(ImageUpload::from_bytes(name, vec![0u8]).in_subfolder(subfolder)).await;
        // "/abs" is normalised to "abs"; everything else must be refused.
        if subfolder == "/abs" {
            assert_eq!(result.expect("normalised").subfolder, "abs");
        } else {
            assert!(matches!(result, Err(ComfyError::InvalidInput(_))), "{name:?} {subfolder:?}");
        }
    }
    assert_eq!(fake.requests("POST", "/upload/image").len(), 1);
}

fn video_file(name: &str) -> OutputFile {
    OutputFile {
        node_id: "81".into(),
        key: "images".into(),
        filename: name.into(),
        subfolder: "td".into(),
        kind: FolderType::Output,
        media: MediaKind::Video,
        format: "mp4".into(),
    }
}

#[tokio::test]
async fn download_streams_bytes_with_length_and_type() {
    let fake = Fake::start().await;
    let content: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
    fake.with(|s| s.files.insert("ltxv_00001_.mp4".into(), ("video/mp4".into(), content.clone())));
    let client = fake.client();
    let file = video_file("ltxv_00001_.mp4");
    let mut download = client.download(&file).await.expect("download");
    assert_eq!(download.content_length, Some(content.len() as u64));
    assert_eq!(download.content_type.as_deref(), Some("video/mp4"));
    let mut received = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = download.next().await {
        received.extend_from_slice(&chunk.expect("chunk"));
        chunks += 1;
    }
    assert!(received == content, "bytes arrive intact");
    assert!(chunks >= 1);
    let query = &fake.requests("GET", "/view")[0].body;
    assert_eq!(query, &json!({"filename": "ltxv_00001_.mp4", "subfolder": "td", "type": "output"}));

    let missing = client.download(&video_file("nope.mp4")).await;
    assert!(matches!(missing, Err(ComfyError::NotFound { .. })), "{missing:?}");
}

#[tokio::test]
async fn queue_control_always_names_the_prompt() {
    let fake = Fake::start().await;
    let client = fake.client();
    let id = PromptId::new();
    let key = id.to_string();
    fake.with(|s| {
        s.running.push("other".into());
        s.pending.push(key.clone());
    });
    assert_eq!(client.queue().await.expect("queue").position(&id), Some(QueuePosition::Pending { position: 0 }));
    client.delete_pending(&id).await.expect("delete");
    client.interrupt(&id).await.expect("interrupt");
    assert_eq!(client.queue().await.expect("queue").position(&id), None);
    assert_eq!(fake.requests("POST", "/queue")[0].body, json!({"delete": [key]}));
    assert_eq!(fake.requests("POST", "/interrupt")[0].body, json!({"prompt_id": key}));
    fake.with(|s| {
        assert_eq!(s.running, vec!["other".to_owned()], "a targeted interrupt of a non-running id is a no-op")
    });

    assert_eq!(client.history(&id).await.expect("history"), None);
    fake.complete(&key, success_entry(&key, json!({})));
    assert!(client.history(&id).await.expect("history").is_some());
    client.delete_history(&id).await.expect("delete history");
    assert_eq!(client.history(&id).await.expect("history"), None);

    let stats = client.system_stats().await.expect("stats");
    assert_eq!(stats.comfyui_version.as_deref(), Some("0.3.64"));
    assert_eq!(stats.devices[0].kind, "cuda");
    assert_eq!(stats.argv, ["/opt/ComfyUI/main.py", "--base-directory", "/data/comfy"]);
}

#[tokio::test]
async fn an_absent_server_is_reported_as_unreachable() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let client = client_for(ComfyEndpoint::parse(&format!("http://{addr}")).expect("endpoint"));
    let error = client.system_stats().await.expect_err("nobody listens");
    assert!(error.is_unreachable(), "{error:?}");
    assert!(error.is_transient());
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
}

#[tokio::test]
async fn a_graph_that_is_not_an_object_is_refused_locally() {
    let fake = Fake::start().await;
    let result = fake.client().queue_prompt(&json!([]), &PromptId::new()).await;
    assert!(matches!(result, Err(ComfyError::InvalidInput(_))));
    assert!(fake.requests("POST", "/prompt").is_empty());
}

#[tokio::test]
async fn active_prompts_use_the_jobs_api_where_it_exists_and_find_out_once() {
    for jobs_api in [false, true] {
        let fake = Fake::start().await;
        let client = fake.client();
        let id = PromptId::new();
        fake.with(|s| {
            s.jobs_api = jobs_api;
            s.running.push("other".into());
            s.pending.extend(["a".to_owned(), id.to_string()]);
        });
        assert_eq!(client.has_jobs_api(), None);
        for _ in 0..3 {
            let active = client.active_prompts().await.expect("active prompts");
            assert_eq!(active.position(&id), Some(QueuePosition::Pending { position: 1 }));
            assert_eq!(active.running.len(), 1);
        }
        assert_eq!(client.has_jobs_api(), Some(jobs_api));
        let (jobs_requests, queue_requests) =
            (fake.requests("GET", "/api/jobs").len(), fake.requests("GET", "/queue").len());
        if jobs_api {
            assert_eq!((jobs_requests, queue_requests), (3, 0), "the full queue is never asked for");
            let query = &fake.requests("GET", "/api/jobs")[0].body;
            assert_eq!(query, &json!({"status": "in_progress,pending", "limit": "1000"}), "no sort_by (C2)");
        } else {
            assert_eq!((jobs_requests, queue_requests), (1, 3), "a 404 is remembered");
        }
    }
}

#[tokio::test]
async fn a_prompt_beyond_the_jobs_api_s_first_page_is_not_taken_for_gone() {
    let fake = Fake::start().await;
    let client = fake.client();
    let id = PromptId::new();
    fake.with(|s| {
        s.jobs_api = true;
        s.pending.extend((0..1200).map(|n| format!("queued-{n}")));
        s.pending.push(id.to_string());
    });
    let active = client.active_prompts().await.expect("active prompts");
    assert_eq!(active.position(&id), Some(QueuePosition::Pending { position: 1200 }), "found past the first page");
    assert_eq!(client.has_jobs_api(), Some(true));
}

/// Newer ComfyUI lists every GPU in `devices` (C15), the primary first.
#[test]
fn every_gpu_in_system_stats_is_read() {
    let body = json!({
        "system": {"os": "linux", "comfyui_version": "0.38.1", "argv": ["main.py"], "comfy_package_versions": {}, "deploy_environment": "local"},
        "devices": [
            {"name": "cuda:0 NVIDIA RTX 4090 : cudaMallocAsync", "type": "cuda", "index": 0, "vram_total": 25_757_220_864u64, "vram_free": 20_000_000_000u64},
            {"name": "cuda:1 NVIDIA RTX 3090 : cudaMallocAsync", "type": "cuda", "index": 1, "vram_total": 25_438_126_080u64, "vram_free": 1_000_000}
        ]
    });
    let stats = tdcomfy_comfy::SystemStats::from_value(&body);
    assert_eq!(stats.devices.len(), 2);
    assert_eq!(stats.devices.iter().map(|d| d.index).collect::<Vec<_>>(), vec![Some(0), Some(1)]);
    assert_eq!(stats.devices[1].vram_free, Some(1_000_000));
    assert_eq!(stats.comfyui_version.as_deref(), Some("0.38.1"));
}
