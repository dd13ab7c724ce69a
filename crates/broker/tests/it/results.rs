//! `GET /jobs/{id}/result`: Content-Type, Content-Length, ETag, Range, and the 409/410 answers.

use serde_json::Value;

use crate::helpers::{TestApp, error_of, spawn_app, spawn_with};

async fn finished_job(app: &TestApp, bytes: Vec<u8>) -> String {
    let id = app.submit_png("finished").await;
    let lease = app.lease("w", 1.0).await.unwrap();
    let resp = app.put_result(&id, lease["lease_token"].as_str().unwrap(), bytes).await;
    assert_eq!(resp.status(), 200);
    id
}

#[tokio::test]
async fn result_download_supports_etag_and_ranges() {
    let app = spawn_app().await;
    let video: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let id = finished_job(&app, video.clone()).await;
    let path = format!("/jobs/{id}/result");

    let full = app.get(&path).send().await.unwrap();
    assert_eq!(full.status(), 200);
    let h = full.headers().clone();
    assert_eq!(h["content-type"], "video/mp4");
    assert_eq!(h["content-length"], video.len().to_string().as_str());
    assert_eq!(h["accept-ranges"], "bytes");
    assert!(h["content-disposition"].to_str().unwrap().contains(&format!("{id}.mp4")));
    let etag = h["etag"].to_str().unwrap().to_owned();
    assert_eq!(full.bytes().await.unwrap().to_vec(), video);

    let not_modified = app.get(&path).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(not_modified.status(), 304);

    let part = app.get(&path).header("range", "bytes=1000-1999").send().await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], format!("bytes 1000-1999/{}", video.len()).as_str());
    assert_eq!(part.headers()["content-length"], "1000");
    assert_eq!(part.bytes().await.unwrap().to_vec(), video[1000..2000].to_vec());

    let tail = app.get(&path).header("range", "bytes=-10").send().await.unwrap();
    assert_eq!(tail.bytes().await.unwrap().to_vec(), video[video.len() - 10..].to_vec());

    let (status, err) = error_of(app.get(&path).header("range", "bytes=999999-").send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (416, Some("range_not_satisfiable")));
}

#[tokio::test]
async fn results_not_ready_failed_cancelled_or_deleted_answer_clearly() {
    let app = spawn_app().await;
    let queued = app.submit_png("q").await;
    let (status, err) = error_of(app.get(&format!("/jobs/{queued}/result")).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("result_not_ready")));

    app.delete(&format!("/jobs/{queued}")).send().await.unwrap();
    let (status, err) = error_of(app.get(&format!("/jobs/{queued}/result")).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("job_cancelled")));

    let done = finished_job(&app, b"video bytes".to_vec()).await;
    let resp: Value = app.delete(&format!("/jobs/{done}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(resp["status"], "done");
    assert!(app.files("results").is_empty());
    let job = app.job(&done).await;
    assert_eq!((job["status"].as_str(), job["has_result"].as_bool()), (Some("done"), Some(false)));
    let (status, err) = error_of(app.get(&format!("/jobs/{done}/result")).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (410, Some("result_gone")));
}

#[tokio::test]
async fn result_ttl_deletes_old_files_but_keeps_the_record() {
    let app = spawn_with(|a| {
        a.result_ttl = 1;
        a.lease_ttl = 0.4;
    })
    .await;
    let id = finished_job(&app, b"short-lived".to_vec()).await;
    let job = app.wait_until(&id, 15.0, |j| j["has_result"] == false).await;
    assert_eq!((job["status"].as_str(), job["has_result"].as_bool()), (Some("done"), Some(false)));
    assert!(app.files("results").is_empty() && app.files("inputs").is_empty());
    let (status, _) = error_of(app.get(&format!("/jobs/{id}/result")).send().await.unwrap()).await;
    assert_eq!(status, 410);
}
