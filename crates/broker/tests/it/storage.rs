//! `STORAGE_URL=s3://…`: the job lifecycle on a real S3-compatible server (moto's, on loopback),
//! checked in the bucket itself, and `file://` shared directories.
//!
//! The S3 tests need `moto_server` (`pip install "moto[server]"`; `.ci/run` installs it). Without
//! it they say so and pass, so a laptop without Python still runs the rest; CI always has it.

use std::process::Stdio;
use std::time::Duration;

use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::helpers::{TestApp, error_of, png_bytes, png_form, spawn_with};

/// One moto server for the whole test binary, each test with a bucket of its own.
struct Moto {
    endpoint: String,
}

static MOTO: tokio::sync::OnceCell<Option<Moto>> = tokio::sync::OnceCell::const_new();

async fn moto() -> Option<&'static Moto> {
    MOTO.get_or_init(start_moto).await.as_ref()
}

async fn start_moto() -> Option<Moto> {
    let bin = std::env::var("MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
    let found = std::process::Command::new(&bin)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!(
            "SKIPPED: {bin} not found, so the S3 storage tests do not run here; `pip install \"moto[server]\"` \
             (.ci/run does)"
        );
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // The shell waits on its stdin, which is this process's pipe: when the test binary exits
    // (however it ends), the pipe closes and the server is stopped with it.
    let script = format!("{bin} -H 127.0.0.1 -p {port} >/dev/null 2>&1 & pid=$!; read _; kill $pid");
    let child = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .spawn()
        .expect("start moto_server");
    // Kept open for the life of the process (the OnceCell never drops it).
    std::mem::forget(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http.get(&endpoint).send().await.is_ok() {
            return Some(Moto { endpoint });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("moto_server did not answer on {endpoint} within 10 s");
}

/// A fresh bucket on the moto server and a broker storing in it under `prefix`.
struct S3App {
    app: TestApp,
    bucket_url: String,
    prefix: String,
}

async fn s3_app(tweak: impl FnOnce(&mut tdcomfy_broker::BrokerArgs)) -> Option<S3App> {
    let moto = moto().await?;
    let bucket = format!("tdc-{}", uuid::Uuid::new_v4().simple());
    let bucket_url = format!("{}/{bucket}", moto.endpoint);
    // moto takes unsigned requests: a plain PUT makes the bucket.
    let made = reqwest::Client::new().put(&bucket_url).send().await.unwrap();
    assert!(made.status().is_success(), "create bucket: {}", made.status());
    let prefix = "studio/frames".to_owned();
    let url = format!("s3://{bucket}/{prefix}");
    let endpoint = moto.endpoint.clone();
    let app = spawn_with(move |a| {
        a.storage.storage_url = Some(url);
        a.storage.aws_endpoint_url = Some(endpoint);
        a.storage.aws_access_key_id = Some("testing".into());
        a.storage.aws_secret_access_key = Some("testing".into());
        a.storage.aws_region = Some("us-east-1".into());
        tweak(a);
    })
    .await;
    Some(S3App { app, bucket_url, prefix })
}

impl S3App {
    /// Keys in the bucket under `prefix/<rest>`, as S3's own listing says.
    async fn keys(&self, rest: &str) -> Vec<String> {
        let url = format!("{}?list-type=2&prefix={}/{rest}", self.bucket_url, self.prefix);
        let xml = reqwest::get(url).await.unwrap().text().await.unwrap();
        xml.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_owned).collect()
    }

    /// Multipart uploads started and neither completed nor aborted.
    async fn open_uploads(&self) -> usize {
        let xml = reqwest::get(format!("{}?uploads", self.bucket_url)).await.unwrap().text().await.unwrap();
        xml.matches("<UploadId>").count()
    }

    /// S3's own client for the test bucket, to look at (or plant) objects behind the broker.
    fn store(&self) -> object_store::aws::AmazonS3 {
        let (endpoint, bucket) = self.bucket_url.rsplit_once('/').unwrap();
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_bucket_name(bucket)
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .with_region("us-east-1")
            .with_allow_http(true)
            .build()
            .unwrap()
    }

    /// The object's bytes, read from the store directly with S3's own client (`None`: no such
    /// object).
    async fn object(&self, rest: &str) -> Option<Vec<u8>> {
        use object_store::ObjectStore;
        let store = self.store();
        let key = object_store::path::Path::from(format!("{}/{rest}", self.prefix));
        match store.get(&key).await {
            Ok(got) => Some(got.bytes().await.unwrap().to_vec()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("reading {key}: {e}"),
        }
    }

    async fn eventually_no_keys(&self, rest: &str) -> Vec<String> {
        for _ in 0..100 {
            let keys = self.keys(rest).await;
            if keys.is_empty() {
                return keys;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.keys(rest).await
    }
}

/// A result larger than one part, so it goes up as a real multipart upload.
fn big_video() -> Vec<u8> {
    (0..(tdcomfy_broker::blobs::PART_SIZE as u32 + 3_000_000)).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn s3_job_lifecycle_keeps_frames_and_results_in_the_bucket() {
    let Some(s3) = s3_app(|_| {}).await else { return };
    let app = &s3.app;
    let frame = png_bytes(64, 40);
    let form = Form::new()
        .part("image", Part::bytes(frame.clone()).file_name("f.png").mime_str("image/png").unwrap())
        .text("prompt", "on s3");
    let resp = app.submit(form).await;
    assert_eq!(resp.status(), 200);
    let id = resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned();
    // Acknowledged means stored: the frame is in the bucket, whole, before the answer came.
    assert_eq!(s3.object(&format!("inputs/{id}")).await.as_deref(), Some(&frame[..]));
    assert!(app.files("inputs").is_empty(), "the frame is in the bucket, not the data directory");

    let lease = app.lease("w", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap().to_owned();
    let input = app.get(&format!("/worker/jobs/{id}/input")).header("lease-token", &token).send().await.unwrap();
    assert_eq!(input.status(), 200);
    assert_eq!(input.bytes().await.unwrap().to_vec(), frame);

    let video = big_video();
    assert_eq!(app.put_result(&id, &token, video.clone()).await.status(), 200);
    assert_eq!(app.job(&id).await["status"], "done");
    assert_eq!(s3.object(&format!("results/{id}")).await.map(|b| b.len()), Some(video.len()));
    assert!(s3.keys("tmp/").await.is_empty(), "the staged result was copied into place and removed");
    assert_eq!(s3.open_uploads().await, 0);

    let path = format!("/jobs/{id}/result");
    let full = app.get(&path).send().await.unwrap();
    assert_eq!(full.status(), 200);
    assert_eq!(full.headers()["content-length"], video.len().to_string().as_str());
    let etag = full.headers()["etag"].to_str().unwrap().to_owned();
    assert!(full.bytes().await.unwrap().to_vec() == video, "the whole result comes back");
    let not_modified = app.get(&path).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(not_modified.status(), 304);
    let part = app.get(&path).header("range", "bytes=8388000-8389999").send().await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], format!("bytes 8388000-8389999/{}", video.len()).as_str());
    assert_eq!(part.bytes().await.unwrap().to_vec(), video[8_388_000..8_390_000].to_vec());
    let tail = app.get(&path).header("range", "bytes=-10").send().await.unwrap();
    assert_eq!(tail.bytes().await.unwrap().to_vec(), video[video.len() - 10..].to_vec());

    // DELETE of a finished job removes its objects.
    assert_eq!(app.delete(&format!("/jobs/{id}")).send().await.unwrap().status(), 200);
    assert!(s3.keys(&format!("inputs/{id}")).await.is_empty());
    assert!(s3.keys(&format!("results/{id}")).await.is_empty());
    let (status, err) = error_of(app.get(&path).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (410, Some("result_gone")));
}

#[tokio::test]
async fn a_result_upload_cut_off_mid_body_leaves_no_object_and_the_job_running() {
    let Some(s3) = s3_app(|_| {}).await else { return };
    let app = &s3.app;
    let id = app.submit_png("cut off").await;
    let lease = app.lease("w", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap().to_owned();
    // More than a part, so a multipart upload has begun when the sender breaks off.
    let first = bytes::Bytes::from(vec![7u8; tdcomfy_broker::blobs::PART_SIZE + 1_000_000]);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
        vec![Ok(first), Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "worker died"))];
    let sent = app
        .put(&format!("/worker/jobs/{id}/result"))
        .header("lease-token", &token)
        .header("content-type", "video/mp4")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await;
    assert!(sent.is_err() || !sent.unwrap().status().is_success());

    let job = app.job(&id).await;
    assert_eq!(job["status"], "running", "a cut-off upload does not finish the job");
    let (status, err) = error_of(app.get(&format!("/jobs/{id}/result")).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("result_not_ready")));
    assert!(s3.keys("results/").await.is_empty(), "no result object");
    assert_eq!(s3.eventually_no_keys("tmp/").await, Vec::<String>::new(), "no staged object left");
    let mut open = s3.open_uploads().await;
    for _ in 0..50 {
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = s3.open_uploads().await;
    }
    assert_eq!(open, 0, "the multipart upload was aborted, its parts freed");

    // The worker's retry on the same lease goes through.
    assert_eq!(app.put_result(&id, &token, b"the real video".to_vec()).await.status(), 200);
    assert_eq!(app.get(&format!("/jobs/{id}/result")).send().await.unwrap().bytes().await.unwrap(), "the real video");
}

#[tokio::test]
async fn presigned_redirect_is_followed_with_range_and_without_the_broker_token() {
    let Some(s3) = s3_app(|a| {
        a.api_token = Some("client-secret".into());
        a.storage.result_redirect = "presigned".into();
        a.storage.result_redirect_ttl = 60;
    })
    .await
    else {
        return;
    };
    let app = &s3.app;
    let id = app.submit_png("presigned").await;
    let lease = app.lease("w", 1.0).await.unwrap();
    let video: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let token = lease["lease_token"].as_str().unwrap();
    assert_eq!(app.put_result(&id, token, video.clone()).await.status(), 200);
    let path = format!("/jobs/{id}/result");

    let no_follow = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let redirect = no_follow.get(app.url(&path)).bearer_auth("client-secret").send().await.unwrap();
    assert_eq!(redirect.status(), 307);
    let location = redirect.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&s3.bucket_url), "{location}");
    assert!(location.contains("X-Amz-Signature=") && location.contains("X-Amz-Expires=60"), "{location}");
    assert_eq!(redirect.headers()["cache-control"], "no-store");
    // The URL alone is the permission: no broker token, no AWS keys.
    let direct = reqwest::get(&location).await.unwrap();
    assert_eq!(direct.status(), 200);
    assert_eq!(direct.bytes().await.unwrap().to_vec(), video);
    // Without the token the broker itself refuses: the redirect is no way around API_TOKEN.
    assert_eq!(no_follow.get(app.url(&path)).send().await.unwrap().status(), 401);

    // A client that follows redirects (reqwest drops Authorization on a cross-origin hop) resumes
    // with Range on the store.
    let part = reqwest::Client::new()
        .get(app.url(&path))
        .bearer_auth("client-secret")
        .header("range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap().to_vec(), video[1000..].to_vec());
}

#[tokio::test]
async fn result_ttl_removes_the_objects() {
    let Some(s3) = s3_app(|a| a.result_ttl = 1).await else { return };
    let app = &s3.app;
    let id = app.submit_png("short-lived").await;
    let lease = app.lease("w", 1.0).await.unwrap();
    assert_eq!(app.put_result(&id, lease["lease_token"].as_str().unwrap(), b"video".to_vec()).await.status(), 200);
    assert!(s3.object(&format!("results/{id}")).await.is_some());
    let mut status = 0;
    for _ in 0..150 {
        status = app.get(&format!("/jobs/{id}/result")).send().await.unwrap().status().as_u16();
        if status == 410 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 410, "RESULT_TTL expired the result");
    // Files before the record: once the job says its result is gone, the objects are.
    assert!(s3.keys(&format!("results/{id}")).await.is_empty());
    assert!(s3.keys(&format!("inputs/{id}")).await.is_empty());
}

#[tokio::test]
async fn a_dedupe_hit_owns_a_server_side_copy_of_the_result() {
    let Some(s3) = s3_app(|_| {}).await else { return };
    let app = &s3.app;
    let form = || png_form("still").text("stream", "cam").text("dedupe", "true").text("seed", "7");
    let first = app.submit(form()).await.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned();
    let lease = app.lease("w", 1.0).await.unwrap();
    assert_eq!(app.put_result(&first, lease["lease_token"].as_str().unwrap(), b"clip".to_vec()).await.status(), 200);
    let second: Value = app.submit(form()).await.json().await.unwrap();
    assert_eq!(second["status"], "done", "{second}");
    let second = second["job_id"].as_str().unwrap().to_owned();
    assert_eq!(s3.object(&format!("results/{second}")).await.as_deref(), Some(&b"clip"[..]));
    // Deleting the first never breaks the second.
    assert_eq!(app.delete(&format!("/jobs/{first}")).send().await.unwrap().status(), 200);
    assert!(s3.object(&format!("results/{first}")).await.is_none());
    let got = app.get(&format!("/jobs/{second}/result")).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap(), "clip");
}

#[tokio::test]
async fn an_unreachable_store_stops_the_start_with_its_reason() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut args = crate::helpers::test_args(tempfile::tempdir().unwrap().path().join("data"));
    args.storage.storage_url = Some("s3://nowhere/x".into());
    args.storage.aws_endpoint_url = Some(format!("http://127.0.0.1:{port}"));
    args.storage.aws_access_key_id = Some("k".into());
    args.storage.aws_secret_access_key = Some("s".into());
    let config = args.into_config(crate::helpers::test_workflows()).unwrap();
    let opened = tokio::time::timeout(Duration::from_secs(60), tdcomfy_broker::Broker::open(config)).await;
    assert!(matches!(opened, Ok(Err(_))), "a store nobody answers on is refused at start");
}

#[test]
fn storage_settings_are_checked_by_name() {
    let workflows = crate::helpers::test_workflows();
    let check = |url: &str, redirect: &str| {
        let mut args = crate::helpers::test_args("unused".into());
        args.storage.storage_url = Some(url.into());
        args.storage.result_redirect = redirect.into();
        args.storage.result_redirect_ttl = 300;
        args.into_config(workflows.clone()).map(|_| ()).map_err(|e| e.to_string())
    };
    assert!(check("s3://bucket/prefix", "presigned").is_ok());
    assert!(check("file:///srv/tdcomfy", "stream").is_ok());
    assert!(check("ftp://x", "stream").unwrap_err().starts_with("STORAGE_URL:"));
    assert!(check("file://relative", "stream").unwrap_err().starts_with("STORAGE_URL:"));
    assert!(check("s3:///prefix", "stream").unwrap_err().starts_with("STORAGE_URL:"));
    assert!(check("file:///srv/tdcomfy", "presigned").unwrap_err().starts_with("RESULT_REDIRECT:"));
    assert!(check("s3://b", "sometimes").unwrap_err().starts_with("RESULT_REDIRECT:"));
}

#[tokio::test]
async fn file_storage_keeps_everything_in_the_shared_directory() {
    let shared = tempfile::tempdir().unwrap();
    let url = format!("file://{}", shared.path().display());
    let app = spawn_with(move |a| a.storage.storage_url = Some(url)).await;
    let id = app.submit_png("shared dir").await;
    assert!(shared.path().join("inputs").join(&id).exists());
    assert!(app.files("inputs").is_empty());
    let lease = app.lease("w", 1.0).await.unwrap();
    assert_eq!(app.put_result(&id, lease["lease_token"].as_str().unwrap(), b"v".to_vec()).await.status(), 200);
    assert_eq!(std::fs::read(shared.path().join("results").join(&id)).unwrap(), b"v");
    assert_eq!(app.get(&format!("/jobs/{id}/result")).send().await.unwrap().bytes().await.unwrap(), "v");
    app.delete(&format!("/jobs/{id}")).send().await.unwrap();
    assert!(!shared.path().join("results").join(&id).exists());
}

#[tokio::test]
async fn a_restart_on_shared_s3_keeps_young_orphans_and_every_job_whole() {
    let Some(s3) = s3_app(|_| {}).await else { return };
    let id = s3.app.submit_png("kept").await;
    // An object no job names, as another broker on the same database leaves it between its
    // upload and its row: young, so the start must not take it.
    let orphan = uuid::Uuid::new_v4().to_string();
    let key = format!("{}/{}/inputs/{orphan}", s3.bucket_url, s3.prefix);
    let store = s3.store();
    use object_store::ObjectStore;
    store
        .put(
            &object_store::path::Path::from(format!("{}/inputs/{orphan}", s3.prefix)),
            b"another broker's".to_vec().into(),
        )
        .await
        .unwrap();
    let S3App { app, bucket_url, prefix } = s3;
    let app = app.crash_and_restart().await;
    let s3 = S3App { app, bucket_url, prefix };
    assert!(s3.object(&format!("inputs/{orphan}")).await.is_some(), "{key} kept through the start");
    let lease = s3.app.lease("w", 1.0).await.unwrap();
    assert_eq!(lease["job_id"], id.as_str());
    let input = s3
        .app
        .get(&format!("/worker/jobs/{id}/input"))
        .header("lease-token", lease["lease_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(input.bytes().await.unwrap().to_vec(), png_bytes(64, 40));
}
