//! ComfyUI's cache as far as the simulator keeps it: image loaders are reused while their file's
//! *content* is unchanged (LoadImage's `IS_CHANGED` is a SHA-256 of the file), so a name reused
//! with new bytes is loaded again and a reused name with the same bytes is served from the cache.

use serde_json::{Value, json};

use crate::support::*;

fn invert_graph(prefix: &str) -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "td/frame.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    })
}

/// Runs the invert graph; returns the `execution_cached` node list, the nodes that sent
/// `executing`, and the saved image.
async fn run(sim: &Sim, ws: &mut Ws, prefix: &str) -> (Value, Vec<String>, image::RgbImage) {
    let id = sim.queue_prompt(&invert_graph(prefix), "cache-test").await;
    let frames = ws.until_done(&id).await;
    let events: Vec<&Value> = frames.iter().filter_map(Frame::json).collect();
    let cached =
        events.iter().find(|v| v["type"] == "execution_cached").expect("execution_cached")["data"]["nodes"].clone();
    let executing: Vec<String> = events
        .iter()
        .filter(|v| v["type"] == "executing" && v["data"]["node"].is_string())
        .map(|v| v["data"]["node"].as_str().unwrap_or_default().to_owned())
        .collect();
    let history = sim.wait_history(&id).await;
    let out = &history["outputs"]["3"]["images"][0];
    let path = sim
        .data_dir()
        .join("output")
        .join(out["subfolder"].as_str().expect("subfolder"))
        .join(out["filename"].as_str().expect("filename"));
    (cached, executing, image::open(path).expect("saved image").to_rgb8())
}

fn inverted(png: &[u8]) -> image::RgbImage {
    let mut img = image::load_from_memory(png).expect("png").to_rgb8();
    img.pixels_mut().for_each(|p| p.0 = [255 - p[0], 255 - p[1], 255 - p[2]]);
    img
}

#[tokio::test]
async fn load_image_is_cached_by_the_file_s_content_not_its_name() {
    let sim = Sim::start(|_| {}).await;
    let mut ws = sim.ws("cache-test").await;
    let (a, b) = (png(32, 24, 1), png(32, 24, 2));
    assert_eq!(sim.upload("frame.png", a.clone(), &[("subfolder", "td")]).await.0, 200);

    let (cached, executing, out) = run(&sim, &mut ws, "t/first").await;
    assert_eq!(cached, json!([]), "nothing is cached on the first run");
    assert_eq!(executing, ["1", "2", "3"]);
    assert_eq!(out, inverted(&a));

    // Same name, same bytes: the loader comes from the cache (no `executing` for it).
    assert_eq!(sim.upload("frame.png", a.clone(), &[("subfolder", "td")]).await.1["name"], "frame.png");
    let (cached, executing, out) = run(&sim, &mut ws, "t/second").await;
    assert_eq!(cached, json!(["1"]));
    assert_eq!(executing, ["2", "3"]);
    assert_eq!(out, inverted(&a));

    // Same name, new bytes (overwritten): loaded again, and the result is the new frame's.
    let (status, body) = sim.upload("frame.png", b.clone(), &[("subfolder", "td"), ("overwrite", "true")]).await;
    assert_eq!((status, body["name"].clone()), (200, json!("frame.png")));
    let (cached, executing, out) = run(&sim, &mut ws, "t/third").await;
    assert_eq!(cached, json!([]), "new bytes under the same name are not served from the cache");
    assert_eq!(executing, ["1", "2", "3"]);
    assert_eq!(out, inverted(&b));
    sim.stop().await;
}
