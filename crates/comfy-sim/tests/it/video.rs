//! Video outputs: the LTXV template yields a real, decodable, moving H.264 MP4, proven by an
//! independent demuxer (written here, not the crate's) and OpenH264's decoder.

use openh264::decoder::Decoder;
use openh264::formats::YUVSource;
use serde_json::{Value, json};

use crate::support::*;

/// One decoded frame.
pub struct DecodedFrame {
    /// width in pixels
    pub width: usize,
    /// height in pixels
    pub height: usize,
    /// the Y plane without stride padding
    pub luma: Vec<u8>,
}

fn be32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

/// Finds the payload of the first box of `kind` along a path of container boxes.
fn find<'a>(mut data: &'a [u8], path: &[&[u8; 4]]) -> Option<&'a [u8]> {
    for (depth, kind) in path.iter().enumerate() {
        let mut found = None;
        let mut rest = data;
        while rest.len() >= 8 {
            let size = be32(rest, 0);
            if size < 8 || size > rest.len() {
                return None;
            }
            if &rest[4..8] == *kind {
                found = Some(&rest[8..size]);
                break;
            }
            rest = &rest[size..];
        }
        data = found?;
        let _ = depth;
    }
    Some(data)
}

/// Demuxes the first video track and decodes every sample. Also checks the fast-start layout.
pub fn decode_mp4(bytes: &[u8]) -> Vec<DecodedFrame> {
    // Top-level order must be ftyp, moov, mdat (fast start).
    let mut order = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 8 {
        let size = be32(rest, 0);
        order.push(String::from_utf8_lossy(&rest[4..8]).to_string());
        rest = &rest[size.max(8).min(rest.len())..];
    }
    assert_eq!(order, ["ftyp", "moov", "mdat"], "fast-start layout");
    assert_eq!(&bytes[8..12], b"isom");

    let stbl = find(bytes, &[b"moov", b"trak", b"mdia", b"minf", b"stbl"]).expect("stbl");
    let stsd = find(stbl, &[b"stsd"]).expect("stsd");
    let avc1 = &stsd[8..];
    assert_eq!(&avc1[4..8], b"avc1");
    let avc1_payload = &avc1[8..be32(avc1, 0)];
    let avcc = find(&avc1_payload[78..], &[b"avcC"]).expect("avcC");
    assert_eq!(avcc[0], 1, "avcC version");
    assert_eq!(avcc[4] & 3, 3, "4-byte NAL lengths");
    let sps_len = u16::from_be_bytes([avcc[6], avcc[7]]) as usize;
    let sps = &avcc[8..8 + sps_len];
    let pps_len = u16::from_be_bytes([avcc[9 + sps_len], avcc[10 + sps_len]]) as usize;
    let pps = &avcc[11 + sps_len..11 + sps_len + pps_len];
    assert_eq!(sps[0] & 0x1f, 7);
    assert_eq!(pps[0] & 0x1f, 8);

    let stsz = find(stbl, &[b"stsz"]).expect("stsz");
    assert_eq!(be32(stsz, 4), 0, "per-sample sizes");
    let count = be32(stsz, 8);
    let sizes: Vec<usize> = (0..count).map(|i| be32(stsz, 12 + 4 * i)).collect();
    let stco = find(stbl, &[b"stco"]).expect("stco");
    let chunks: Vec<usize> = (0..be32(stco, 4)).map(|i| be32(stco, 8 + 4 * i)).collect();
    let stsc = find(stbl, &[b"stsc"]).expect("stsc");
    assert_eq!(be32(stsc, 4), 1, "one stsc run");
    let per_chunk = be32(stsc, 12);

    let mut decoder = Decoder::new().expect("decoder");
    let mut annex_b = Vec::new();
    for nal in [sps, pps] {
        annex_b.extend_from_slice(&[0, 0, 0, 1]);
        annex_b.extend_from_slice(nal);
    }
    decoder.decode(&annex_b).expect("parameter sets");
    let mut frames = Vec::new();
    let mut sample = 0;
    for chunk in chunks {
        let mut offset = chunk;
        for _ in 0..per_chunk {
            if sample >= count {
                break;
            }
            let data = &bytes[offset..offset + sizes[sample]];
            offset += sizes[sample];
            sample += 1;
            let mut packet = Vec::new();
            let mut i = 0;
            while i < data.len() {
                let len = be32(data, i);
                packet.extend_from_slice(&[0, 0, 0, 1]);
                packet.extend_from_slice(&data[i + 4..i + 4 + len]);
                i += 4 + len;
            }
            if let Some(yuv) = decoder.decode(&packet).expect("decodes") {
                frames.push(to_frame(&yuv));
            }
        }
    }
    for yuv in decoder.flush_remaining().expect("flush") {
        frames.push(to_frame(&yuv));
    }
    assert_eq!(sample, count, "all samples read");
    frames
}

fn to_frame(yuv: &impl YUVSource) -> DecodedFrame {
    let (width, height) = yuv.dimensions();
    let stride = yuv.strides().0;
    let mut luma = Vec::with_capacity(width * height);
    for row in 0..height {
        luma.extend_from_slice(&yuv.y()[row * stride..row * stride + width]);
    }
    DecodedFrame { width, height, luma }
}

/// Mean absolute luma difference between two frames.
pub fn mean_diff(a: &DecodedFrame, b: &DecodedFrame) -> f64 {
    let sum: u64 = a.luma.iter().zip(&b.luma).map(|(x, y)| u64::from(x.abs_diff(*y))).sum();
    sum as f64 / a.luma.len().max(1) as f64
}

#[test]
fn test_clip_decodes_frame_by_frame_and_moves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("clip.mp4");
    tdcomfy_sim::write_test_clip(&path, 512, 320, 97, 24.0).expect("clip");
    let info = tdcomfy_sim::video_info(&path).expect("info");
    assert_eq!((info.width, info.height, info.frames), (512, 320, 97));
    assert!((info.fps - 24.0).abs() < 1e-9);
    let frames = decode_mp4(&std::fs::read(&path).expect("read"));
    assert_eq!(frames.len(), 97);
    assert!(frames.iter().all(|f| (f.width, f.height) == (512, 320)));
    assert!(mean_diff(&frames[0], &frames[96]) > 8.0, "the clip moves");
    let changed = frames.windows(2).filter(|w| mean_diff(&w[0], &w[1]) > 0.05).count();
    assert!(changed >= 90, "consecutive frames differ ({changed} of 96)");
    assert!(tdcomfy_sim::write_test_clip(dir.path().join("odd.mp4"), 511, 320, 3, 24.0).is_err());
}

async fn upload_frame(sim: &Sim) {
    let (status, body) =
        sim.upload("frame_000001.png", png(320, 240, 9), &[("subfolder", "td"), ("overwrite", "true")]).await;
    assert_eq!((status, body), (200, json!({"name": "frame_000001.png", "subfolder": "td", "type": "input"})));
}

/// The captured LTXV template with LoadImage pointing at the uploaded frame.
pub fn ltxv_template() -> Value {
    let mut prompt = capture("ltxv_i2v_api_template.json");
    prompt["78"]["inputs"]["image"] = json!("td/frame_000001.png");
    prompt
}

#[tokio::test]
async fn ltxv_template_yields_decodable_moving_mp4() {
    let sim = Sim::start(|c| c.progress_steps = 5).await;
    upload_frame(&sim).await;
    let mut ws = sim.ws("td-ltxv").await;
    let prompt_id = sim.queue_prompt(&ltxv_template(), "td-ltxv").await;
    let frames = ws.until_done(&prompt_id).await;

    let json_frames: Vec<&Value> = frames.iter().filter_map(Frame::json).collect();
    let progress: Vec<&Value> = json_frames.iter().copied().filter(|v| v["type"] == "progress").collect();
    assert_eq!(progress.len(), 5);
    assert!(
        progress.iter().all(|p| p["data"]["node"] == "72"
            && p["data"]["max"] == 5
            && p["data"]["prompt_id"] == prompt_id.as_str())
    );
    let executing: Vec<&str> =
        json_frames.iter().filter(|v| v["type"] == "executing").filter_map(|v| v["data"]["node"].as_str()).collect();
    let mut sorted = executing.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["38", "44", "6", "69", "7", "71", "72", "73", "77", "78", "8", "80", "81", "82"]);
    let pos = |id: &str| executing.iter().position(|n| *n == id).expect("executed");
    for (before, after) in
        [("78", "82"), ("82", "77"), ("77", "72"), ("72", "8"), ("8", "80"), ("80", "81"), ("38", "6")]
    {
        assert!(pos(before) < pos(after), "{before} runs before {after}");
    }
    let executed = json_frames.iter().find(|v| v["type"] == "executed").expect("executed");
    assert_eq!(executed["data"]["node"], "81");
    let output = &executed["data"]["output"];
    assert_eq!(output["animated"], json!([true]));
    let item = &output["images"][0];
    assert_eq!(item["subfolder"], "td");
    assert_eq!(item["type"], "output");
    assert_eq!(item["filename"], "ltxv_00001_.mp4");

    let history = sim.get_json(&format!("/history/{prompt_id}")).await;
    assert_eq!(history[&prompt_id]["outputs"]["81"], *output);
    assert_eq!(history[&prompt_id]["status"]["status_str"], "success");

    let resp =
        sim.http.get(sim.url("/view?filename=ltxv_00001_.mp4&subfolder=td&type=output")).send().await.expect("view");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "video/mp4");
    let bytes = resp.bytes().await.expect("body");
    let decoded = decode_mp4(&bytes);
    assert_eq!(decoded.len(), 97);
    assert!(decoded.iter().all(|f| (f.width, f.height) == (768, 512)));
    assert!(mean_diff(&decoded[0], &decoded[96]) > 8.0, "the clip moves");
    let info = tdcomfy_sim::video_info(sim.data_dir().join("output/td/ltxv_00001_.mp4")).expect("info");
    assert_eq!((info.width, info.height, info.frames), (768, 512, 97));
    assert!((info.fps - 25.0).abs() < 1e-9);

    // The same prompt again: only the unchanged image loader comes from the cache; the sampler
    // runs and the save node writes a new file.
    let again = sim.queue_prompt(&ltxv_template(), "td-ltxv").await;
    let frames = ws.until_done(&again).await;
    let cached = frames.iter().filter_map(Frame::json).find(|v| v["type"] == "execution_cached").expect("cached");
    assert_eq!(cached["data"]["nodes"], json!(["78"]));
    let entry = sim.wait_history(&again).await;
    assert_eq!(entry["outputs"]["81"]["images"][0]["filename"], "ltxv_00002_.mp4");
    sim.stop().await;
}

#[tokio::test]
async fn ltxv_template_without_models_fails_validation_like_capture() {
    let cap = capture("run_95_ltxv_template_validation.json");
    let sim = Sim::start(|c| c.models.clear()).await;
    upload_frame(&sim).await;
    let (status, body) = sim.post("/prompt", &cap["validate_without_models"]["request"]["json"]).await;
    assert_eq!(status, 400);
    assert_eq!(body, cap["validate_without_models"]["response"]["json"]);
    sim.stop().await;
}

#[tokio::test]
async fn vhs_and_videos_key_outputs() {
    let sim = Sim::start(|_| {}).await;
    assert_eq!(sim.upload("frame.png", png(64, 48, 1), &[]).await.0, 200);
    let prompt = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bicubic", "scale_by": 2.0}},
        "3": {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 6}},
        "4": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["3", 0], "frame_rate": 12, "loop_count": 0,
            "filename_prefix": "td/vhs", "format": "video/h264-mp4", "pingpong": false, "save_output": true}},
        "5": {"class_type": "TDComfySimSaveVideoList", "inputs": {"images": ["3", 0], "fps": 10, "filename_prefix": "td/list"}},
        "6": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["3", 0], "frame_rate": 8, "loop_count": 0,
            "filename_prefix": "prev", "format": "image/webp", "pingpong": true, "save_output": false}}
    });
    let id = sim.queue_prompt(&prompt, "vhs").await;
    let entry = sim.wait_history(&id).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    let gif = &entry["outputs"]["4"]["gifs"][0];
    assert_eq!(gif["filename"], "vhs_00001.mp4");
    assert_eq!(gif["subfolder"], "td");
    assert_eq!(gif["type"], "output");
    assert_eq!(gif["format"], "video/h264-mp4");
    assert_eq!(gif["frame_rate"], 12.0);
    assert_eq!(gif["workflow"], "vhs_00001.png");
    let info = tdcomfy_sim::video_info(gif["fullpath"].as_str().expect("fullpath")).expect("mp4");
    assert_eq!((info.width, info.height, info.frames), (128, 96, 6));
    let video = &entry["outputs"]["5"]["videos"][0];
    assert_eq!(video["filename"], "list_00001_.mp4");
    assert_eq!(video["subfolder"], "td");
    let info = tdcomfy_sim::video_info(sim.data_dir().join("output/td/list_00001_.mp4")).expect("mp4");
    assert_eq!((info.frames, info.fps), (6, 10.0));
    let preview = &entry["outputs"]["6"]["gifs"][0];
    assert_eq!(preview["type"], "temp");
    assert_eq!(preview["filename"], "prev_00001.webp");
    let bytes = std::fs::read(sim.data_dir().join("temp/prev_00001.webp")).expect("webp");
    use image::AnimationDecoder;
    let frames = image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(bytes))
        .expect("webp")
        .into_frames()
        .collect_frames()
        .expect("frames");
    assert_eq!(frames.len(), 10, "pingpong adds the way back");
    sim.stop().await;
}

#[tokio::test]
async fn text_to_video_with_ksampler_via_api_prefix() {
    let sim = Sim::start(|_| {}).await;
    let prompt = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "ltx-video-2b-v0.9.5.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "waves"}},
        "3": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 100, "height": 64, "length": 12, "batch_size": 1}},
        "4": {"class_type": "ModelSamplingLTXV", "inputs": {"model": ["1", 0], "max_shift": 2.05, "base_shift": 0.95, "latent": ["3", 0]}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 7, "steps": 20, "cfg": 3.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0], "negative": ["2", 0],
            "latent_image": ["3", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["6", 0], "filename_prefix": "t2v/clip", "fps": 8,
            "lossless": false, "quality": 80, "method": "default"}},
        "8": {"class_type": "ImageScale", "inputs": {"image": ["6", 0], "upscale_method": "nearest-exact", "width": 50,
            "height": 0, "crop": "disabled"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "t2v/frame_%width%x%height%"}}
    });
    let (status, body) = sim.post("/api/prompt", &json!({"prompt": prompt, "client_id": "t2v"})).await;
    assert_eq!(status, 200, "{body}");
    let id = body["prompt_id"].as_str().expect("id").to_string();
    let entry = sim.wait_history(&id).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    // Latent sizes round down to multiples of 32; length 12 decodes to 8·((12-1)/8)+1 = 9 frames.
    let webp = &entry["outputs"]["7"];
    assert_eq!(webp["images"][0]["filename"], "clip_00001_.webp");
    assert_eq!(webp["animated"], json!([true]));
    let bytes = std::fs::read(sim.data_dir().join("output/t2v/clip_00001_.webp")).expect("webp");
    use image::AnimationDecoder;
    let frames = image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(bytes))
        .expect("webp")
        .into_frames()
        .collect_frames()
        .expect("frames");
    assert_eq!(frames.len(), 9);
    assert_eq!(frames[0].buffer().dimensions(), (96, 64));
    let images = entry["outputs"]["9"]["images"].as_array().expect("one PNG per frame");
    assert_eq!(images.len(), 9);
    assert_eq!(images[0]["filename"], "frame_50x33_00001_.png");
    assert_eq!(images[8]["filename"], "frame_50x33_00009_.png");
    let png_bytes = std::fs::read(sim.data_dir().join("output/t2v/frame_50x33_00009_.png")).expect("png");
    let decoded = image::load_from_memory(&png_bytes).expect("png");
    assert_eq!((decoded.width(), decoded.height()), (50, 33));
    sim.stop().await;
}

#[tokio::test]
async fn oversized_uploads_get_413() {
    let sim = Sim::start(|c| c.max_upload_bytes = 4096).await;
    let (status, body) = sim.upload("big.png", vec![7u8; 20_000], &[]).await;
    assert_eq!((status, body), (413, Value::Null));
    assert_eq!(sim.get_json("/features").await["max_upload_size"], 4096);
    sim.stop().await;
}
