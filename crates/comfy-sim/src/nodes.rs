//! What each simulated node computes, and what it writes.
//!
//! Owns: the value types flowing along links (IMAGE as a lazy [`ImageBatch`], LATENT, VIDEO, …),
//! the per-class evaluation, the files save nodes write (names per ComfyUI's rules) and the UI
//! dicts they report (`images` + `animated`, VHS `gifs`, the sim-only `videos`), and the Python
//! exceptions a real node would raise for bad input at run time. Timing, progress events and fault
//! injection are the executor's job; evaluation here is synchronous and runs on a blocking thread.

use std::sync::Arc;

use image::{AnimationDecoder, RgbImage};

use crate::anim;
use crate::files::{self, DataDirs};
use crate::frames::{self, FrameOp, ImageBatch, Motion, ResizeFilter};
use crate::h264;
use crate::json::{OMap, OValue};
use crate::mp4;

/// Largest frame the simulator agrees to hold (4096×4096); bigger requests fail like a GPU OOM.
const MAX_FRAME_PIXELS: u64 = 4096 * 4096;

/// Largest batch (frames) one IMAGE value may describe; beyond it nodes fail like a GPU OOM.
const MAX_BATCH_FRAMES: usize = 20_000;

/// A LATENT value. Only what decoding needs is kept.
#[derive(Debug, Clone)]
pub struct Latent {
    /// decoded frame width
    pub width: u32,
    /// decoded frame height
    pub height: u32,
    /// decoded frames per batch item
    pub frames: usize,
    /// batch size
    pub batch: usize,
    /// the conditioning picture (LTXVImgToVideo), already at the decoded size
    pub source: Option<Arc<RgbImage>>,
    /// the seed once a sampler has run
    pub sampled: Option<u64>,
}

/// A VIDEO value (CreateVideo).
#[derive(Debug, Clone)]
pub struct VideoValue {
    /// the frames
    pub frames: ImageBatch,
    /// frames per second
    pub fps: f64,
}

/// A value on a link.
#[derive(Debug, Clone)]
pub enum Value {
    /// IMAGE
    Image(ImageBatch),
    /// MASK (only its shape matters here)
    Mask {
        /// width
        width: u32,
        /// height
        height: u32,
        /// batch size
        count: usize,
    },
    /// LATENT
    Latent(Arc<Latent>),
    /// CONDITIONING (the prompt text)
    Conditioning(Arc<str>),
    /// MODEL, CLIP or VAE: the file they came from
    Model(Arc<str>),
    /// SAMPLER
    Sampler(Arc<str>),
    /// SIGMAS (number of steps)
    Sigmas(u32),
    /// VIDEO
    Video(Arc<VideoValue>),
    /// VHS_FILENAMES
    Filenames(Arc<Vec<String>>),
}

impl Value {
    /// What ComfyUI's `format_value` would print for this value in `current_inputs`.
    pub fn describe(&self) -> String {
        match self {
            Value::Image(b) => {
                let (w, h) = b.size();
                format!("tensor(shape=[{}, {h}, {w}, 3], dtype=torch.float32)", b.len())
            }
            Value::Mask { width, height, count } => {
                format!("tensor(shape=[{count}, {height}, {width}], dtype=torch.float32)")
            }
            Value::Latent(l) => format!(
                "{{'samples': tensor(shape=[{}, 128, {}, {}, {}])}}",
                l.batch,
                (l.frames.saturating_sub(1)) / 8 + 1,
                l.height / 32,
                l.width / 32
            ),
            Value::Conditioning(t) => format!("[[tensor(...), {{'pooled_output': None, 'text': {:?}}}]]", t),
            Value::Model(name) => format!("<comfy.model_patcher.ModelPatcher object ({name})>"),
            Value::Sampler(name) => format!("<comfy.samplers.KSAMPLER object ({name})>"),
            Value::Sigmas(steps) => format!("tensor(shape=[{}])", steps + 1),
            Value::Video(v) => {
                format!("<comfy_api.latest._input_impl.video_types.VideoFromComponents ({} frames)>", v.frames.len())
            }
            Value::Filenames(f) => format!("(True, {:?})", f),
        }
    }
}

/// A Python exception raised by a node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFailure {
    /// fully qualified exception type, e.g. `RuntimeError`
    pub exception_type: String,
    /// `str(exception)`
    pub message: String,
    /// the node-specific traceback frames (the executor adds ComfyUI's own frames)
    pub frames: Vec<String>,
}

impl NodeFailure {
    /// An exception raised at `file:line` in `function`.
    pub fn new(
        exception_type: &str,
        message: impl Into<String>,
        file: &str,
        line: u32,
        function: &str,
        source: &str,
    ) -> Self {
        Self {
            exception_type: exception_type.to_string(),
            message: message.into(),
            frames: vec![format!("  File \"/opt/ComfyUI/{file}\", line {line}, in {function}\n    {source}\n")],
        }
    }

    fn type_error(msg: impl Into<String>) -> Self {
        Self::new("TypeError", msg, "execution.py", 277, "process_inputs", "result = f(**inputs)")
    }
}

/// The full traceback ComfyUI reports: its executor frames, then the node's own.
pub fn full_traceback(node_frames: &[String]) -> Vec<String> {
    let mut tb = vec![
        "  File \"/opt/ComfyUI/execution.py\", line 496, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n".to_string(),
        "  File \"/opt/ComfyUI/execution.py\", line 315, in get_output_data\n    return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n".to_string(),
        "  File \"/opt/ComfyUI/execution.py\", line 289, in _async_map_node_over_list\n    await process_inputs(input_dict, i)\n".to_string(),
        "  File \"/opt/ComfyUI/execution.py\", line 277, in process_inputs\n    result = f(**inputs)\n".to_string(),
    ];
    tb.extend(node_frames.iter().cloned());
    tb
}

/// An input as the node receives it.
#[derive(Debug, Clone)]
pub enum Input {
    /// a literal from the prompt (already converted by validation)
    Literal(OValue),
    /// a value produced by another node
    Link(Value),
}

/// Everything one node evaluation needs; owned so it can move to a blocking thread.
#[derive(Debug, Clone)]
pub struct EvalJob {
    /// data directories
    pub dirs: DataDirs,
    /// the class
    pub class_type: String,
    /// the inputs by name
    pub inputs: Vec<(String, Input)>,
    /// the whole graph (embedded in saved PNGs as `prompt`)
    pub graph: Arc<OMap>,
    /// `extra_data` (its `extra_pnginfo` is embedded in saved PNGs)
    pub extra_data: Arc<OMap>,
}

/// What a node produced.
#[derive(Debug, Clone, Default)]
pub struct NodeOutput {
    /// output slots
    pub values: Vec<Value>,
    /// the UI dict for `executed` and the history
    pub ui: Option<OValue>,
    /// PNG frames SaveImageWebsocket streams over the socket
    pub ws_images: Vec<Vec<u8>>,
}

impl EvalJob {
    fn input(&self, name: &str) -> Option<&Input> {
        self.inputs.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    fn literal(&self, name: &str) -> Option<&OValue> {
        match self.input(name) {
            Some(Input::Literal(v)) => Some(v),
            _ => None,
        }
    }

    fn int(&self, name: &str, default: i64) -> i64 {
        match self.literal(name) {
            Some(OValue::Number(n)) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)).unwrap_or(default),
            Some(OValue::Bool(b)) => i64::from(*b),
            _ => default,
        }
    }

    fn uint(&self, name: &str, default: u64) -> u64 {
        match self.literal(name) {
            Some(OValue::Number(n)) => n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64)).unwrap_or(default),
            _ => default,
        }
    }

    fn float(&self, name: &str, default: f64) -> f64 {
        match self.literal(name) {
            Some(OValue::Number(n)) => n.as_f64().unwrap_or(default),
            Some(OValue::Bool(b)) => f64::from(u8::from(*b)),
            _ => default,
        }
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.literal(name).map_or_else(|| default.to_string(), OValue::py_str)
    }

    fn boolean(&self, name: &str, default: bool) -> bool {
        self.literal(name).map_or(default, OValue::truthy)
    }

    fn link(&self, name: &str) -> Result<&Value, NodeFailure> {
        match self.input(name) {
            Some(Input::Link(v)) => Ok(v),
            _ => Err(NodeFailure::type_error(format!("missing required input: '{name}'"))),
        }
    }

    fn image(&self, name: &str) -> Result<ImageBatch, NodeFailure> {
        match self.link(name)? {
            Value::Image(b) => Ok(b.clone()),
            other => Err(NodeFailure::type_error(format!("expected IMAGE for '{name}', got {}", other.describe()))),
        }
    }

    fn latent(&self, name: &str) -> Result<Arc<Latent>, NodeFailure> {
        match self.link(name)? {
            Value::Latent(l) => Ok(l.clone()),
            other => Err(NodeFailure::type_error(format!("expected LATENT for '{name}', got {}", other.describe()))),
        }
    }

    fn passthrough(&self, name: &str) -> Result<Value, NodeFailure> {
        self.link(name).cloned()
    }
}

fn oom(width: u32, height: u32) -> NodeFailure {
    NodeFailure::new(
        "torch.OutOfMemoryError",
        format!(
            "Allocation on device would exceed allowed memory. (out of memory)\nRequested frame size: {width}x{height}\nThis error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
        ),
        "comfy/model_management.py",
        1161,
        "cast_to",
        "r = torch.empty_like(weight, dtype=dtype, device=device)",
    )
}

fn check_frames(frames: usize, width: u32, height: u32) -> Result<(), NodeFailure> {
    if frames > MAX_BATCH_FRAMES { Err(oom(width, height)) } else { Ok(()) }
}

fn check_size(width: u32, height: u32) -> Result<(), NodeFailure> {
    if u64::from(width) * u64::from(height) > MAX_FRAME_PIXELS { Err(oom(width, height)) } else { Ok(()) }
}

fn obj(pairs: Vec<(&str, OValue)>) -> OValue {
    let mut m = OMap::new();
    for (k, v) in pairs {
        m.insert(k, v);
    }
    OValue::Object(m)
}

fn num_f(f: f64) -> OValue {
    serde_json::Number::from_f64(f).map_or(OValue::Null, OValue::Number)
}

/// A file reference `{filename, subfolder, type}`.
fn file_ref(filename: &str, subfolder: &str, dir_type: &str) -> OValue {
    obj(vec![
        ("filename", OValue::str(filename)),
        ("subfolder", OValue::str(subfolder)),
        ("type", OValue::str(dir_type)),
    ])
}

fn io_failure(e: std::io::Error, path: &std::path::Path) -> NodeFailure {
    let (kind, errno) = match e.kind() {
        std::io::ErrorKind::NotFound => ("FileNotFoundError", 2),
        std::io::ErrorKind::PermissionDenied => ("PermissionError", 13),
        _ => ("OSError", 5),
    };
    NodeFailure::new(
        kind,
        format!("[Errno {errno}] {e}: '{}'", path.display()),
        "nodes.py",
        1647,
        "load_image",
        "img = node_helpers.pillow(Image.open, image_path)",
    )
}

fn save_failure(message: String) -> NodeFailure {
    NodeFailure::new("Exception", message, "folder_paths.py", 402, "get_save_image_path", "raise Exception(err)")
}

fn write_failure(e: impl std::fmt::Display, file: &str, function: &str) -> NodeFailure {
    NodeFailure::new("OSError", e.to_string(), file, 1, function, "file.write(data)")
}

/// Decodes an uploaded file into frames (all frames of an animated PNG/WebP).
fn decode_frames(bytes: &[u8]) -> Option<Vec<RgbImage>> {
    use std::io::Cursor;
    if let Ok(decoder) = image::codecs::png::PngDecoder::new(Cursor::new(bytes))
        && decoder.is_apng().unwrap_or(false)
        && let Ok(apng) = decoder.apng()
        && let Ok(frames) = apng.into_frames().collect_frames()
        && !frames.is_empty()
    {
        return Some(frames.into_iter().map(|f| image::DynamicImage::ImageRgba8(f.into_buffer()).to_rgb8()).collect());
    }
    if let Ok(decoder) = image::codecs::webp::WebPDecoder::new(Cursor::new(bytes))
        && decoder.has_animation()
        && let Ok(frames) = decoder.into_frames().collect_frames()
        && !frames.is_empty()
    {
        return Some(frames.into_iter().map(|f| image::DynamicImage::ImageRgba8(f.into_buffer()).to_rgb8()).collect());
    }
    image::load_from_memory(bytes).ok().map(|img| vec![img.to_rgb8()])
}

fn load_image(job: &EvalJob, default_dir: &str) -> Result<NodeOutput, NodeFailure> {
    let name = job.string("image", "");
    let path = files::resolve_annotated(&job.dirs, &name, default_dir)
        .ok_or_else(|| io_failure(std::io::Error::from(std::io::ErrorKind::NotFound), std::path::Path::new(&name)))?;
    let bytes = std::fs::read(&path).map_err(|e| io_failure(e, &path))?;
    let frames = decode_frames(&bytes).ok_or_else(|| {
        NodeFailure::new(
            "PIL.UnidentifiedImageError",
            format!("cannot identify image file '{}'\n", path.display()).trim_end().to_string(),
            "node_helpers.py",
            31,
            "pillow",
            "x = fn(arg)",
        )
    })?;
    let (w, h) = frames[0].dimensions();
    check_size(w, h)?;
    // ComfyUI skips frames whose size differs from the first one.
    let frames: Vec<frames::Frame> = frames
        .into_iter()
        .filter(|f| f.dimensions() == (w, h))
        .map(|f| frames::Frame::from_image(Arc::new(f)))
        .collect();
    let count = frames.len();
    Ok(NodeOutput {
        values: vec![Value::Image(ImageBatch::new(frames)), Value::Mask { width: w, height: h, count }],
        ..Default::default()
    })
}

fn scale_image(job: &EvalJob, by: bool) -> Result<NodeOutput, NodeFailure> {
    let image = job.image("image")?;
    let (w, h) = image.size();
    let filter = ResizeFilter::from_method(&job.string("upscale_method", "bilinear"));
    let (width, height, crop) = if by {
        let s = job.float("scale_by", 1.0);
        ((f64::from(w) * s).round() as u32, (f64::from(h) * s).round() as u32, false)
    } else {
        let mut width = job.int("width", 512).max(0) as u32;
        let mut height = job.int("height", 512).max(0) as u32;
        if width == 0 && height == 0 {
            return Ok(NodeOutput { values: vec![Value::Image(image)], ..Default::default() });
        }
        if width == 0 {
            width = ((f64::from(w) * f64::from(height) / f64::from(h.max(1))).round() as u32).max(1);
        } else if height == 0 {
            height = ((f64::from(h) * f64::from(width) / f64::from(w.max(1))).round() as u32).max(1);
        }
        (width, height, job.string("crop", "disabled") == "center")
    };
    let (width, height) = (width.max(1), height.max(1));
    check_size(width, height)?;
    let out = image.map(FrameOp::Resize { width, height, filter, crop_center: crop });
    Ok(NodeOutput { values: vec![Value::Image(out)], ..Default::default() })
}

fn ltxv_img_to_video(job: &EvalJob) -> Result<NodeOutput, NodeFailure> {
    let positive = job.passthrough("positive")?;
    let negative = job.passthrough("negative")?;
    let image = job.image("image")?;
    let width = (job.int("width", 768).max(32) as u32 / 32) * 32;
    let height = (job.int("height", 512).max(32) as u32 / 32) * 32;
    check_size(width, height)?;
    let length = job.int("length", 97).max(1) as usize;
    let batch = job.int("batch_size", 1).max(1) as usize;
    let first = image.render(0).ok_or_else(|| NodeFailure::type_error("empty image batch"))?;
    let source = frames::resize(&first, width, height, ResizeFilter::Bilinear, true);
    let latent = Latent {
        width,
        height,
        frames: 8 * ((length - 1) / 8) + 1,
        batch,
        source: Some(Arc::new(source)),
        sampled: None,
    };
    Ok(NodeOutput { values: vec![positive, negative, Value::Latent(Arc::new(latent))], ..Default::default() })
}

fn empty_latent_video(job: &EvalJob) -> Result<NodeOutput, NodeFailure> {
    let width = (job.int("width", 768).max(32) as u32 / 32) * 32;
    let height = (job.int("height", 512).max(32) as u32 / 32) * 32;
    check_size(width, height)?;
    let length = job.int("length", 97).max(1) as usize;
    let latent = Latent {
        width,
        height,
        frames: 8 * ((length - 1) / 8) + 1,
        batch: job.int("batch_size", 1).max(1) as usize,
        source: None,
        sampled: None,
    };
    Ok(NodeOutput { values: vec![Value::Latent(Arc::new(latent))], ..Default::default() })
}

fn sample(job: &EvalJob, seed_input: &str, outputs: usize) -> Result<NodeOutput, NodeFailure> {
    let latent = job.latent("latent_image")?;
    let seed = job.uint(seed_input, 0);
    let mut sampled = (*latent).clone();
    sampled.sampled = Some(seed);
    let value = Value::Latent(Arc::new(sampled));
    Ok(NodeOutput { values: vec![value; outputs], ..Default::default() })
}

fn vae_decode(job: &EvalJob) -> Result<NodeOutput, NodeFailure> {
    let latent = job.latent("samples")?;
    let seed = latent.sampled.unwrap_or(0);
    let base = latent.source.clone().unwrap_or_else(|| Arc::new(frames::procedural(latent.width, latent.height, seed)));
    let per_item = latent.frames.max(1);
    check_frames(per_item.saturating_mul(latent.batch), latent.width, latent.height)?;
    let mut parts = Vec::with_capacity(latent.batch);
    for item in 0..latent.batch {
        let one = ImageBatch::new(vec![frames::Frame::from_image(base.clone())]).repeat(per_item);
        let part = match latent.sampled {
            Some(seed) => one.map_indexed(|i| {
                let t = if per_item > 1 { i as f32 / (per_item - 1) as f32 } else { 0.0 };
                FrameOp::Motion(Motion { t, seed: seed.wrapping_add(item as u64) })
            }),
            None => one,
        };
        parts.push(part);
    }
    Ok(NodeOutput { values: vec![Value::Image(ImageBatch::concat(parts))], ..Default::default() })
}

fn png_texts(job: &EvalJob) -> Vec<(String, String)> {
    let mut texts = vec![("prompt".to_string(), serde_json::to_string(&*job.graph).unwrap_or_default())];
    if let Some(OValue::Object(pnginfo)) = job.extra_data.get("extra_pnginfo") {
        for (k, v) in pnginfo.iter() {
            texts.push((k.clone(), serde_json::to_string(v).unwrap_or_default()));
        }
    }
    texts
}

fn save_images(job: &EvalJob, temp: bool) -> Result<NodeOutput, NodeFailure> {
    let images = job.image("images")?;
    let (w, h) = images.size();
    let (dir, dir_type, prefix) = if temp {
        let suffix: String = {
            const ALPHABET: &[u8] = b"abcdefghijklmnopqrstupvxyz";
            uuid::Uuid::new_v4().as_bytes()[..5]
                .iter()
                .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
                .collect()
        };
        (&job.dirs.temp, "temp", format!("ComfyUI_temp_{suffix}"))
    } else {
        (&job.dirs.output, "output", job.string("filename_prefix", "ComfyUI"))
    };
    let target = files::save_image_path(dir, &prefix, w, h).map_err(save_failure)?;
    let texts = png_texts(job);
    let text_refs: Vec<(&str, String)> = texts.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let mut results = Vec::new();
    for (counter, (batch_number, frame)) in (target.counter..).zip(images.frames().iter().enumerate()) {
        let img = frame.render();
        let bytes = if temp { anim::png(&img, true) } else { anim::png_with_text(&img, &text_refs) }
            .map_err(|e| write_failure(e, "nodes.py", "save_images"))?;
        let stem = target.filename.replace("%batch_num%", &batch_number.to_string());
        let file = format!("{stem}_{counter:05}_.png");
        files::write_atomic(&target.folder.join(&file), &bytes)
            .map_err(|e| write_failure(e, "nodes.py", "save_images"))?;
        results.push(file_ref(&file, &target.subfolder, dir_type));
    }
    Ok(NodeOutput { ui: Some(obj(vec![("images", OValue::Array(results))])), ..Default::default() })
}

fn render(images: &ImageBatch, i: usize) -> RgbImage {
    let (w, h) = images.size();
    images.render(i).unwrap_or_else(|| RgbImage::new(w.max(1), h.max(1)))
}

fn save_animated(job: &EvalJob, webp: bool) -> Result<NodeOutput, NodeFailure> {
    let images = job.image("images")?;
    let (w, h) = images.size();
    let fps = job.float("fps", 6.0);
    let target = files::save_image_path(&job.dirs.output, &job.string("filename_prefix", "ComfyUI"), w, h)
        .map_err(save_failure)?;
    let count = images.len();
    let (bytes, ext) = if webp {
        (anim::animated_webp(count, |i| render(&images, i), fps), "webp")
    } else {
        (anim::apng(count, |i| render(&images, i), fps), "png")
    };
    let bytes = bytes.map_err(|e| write_failure(e, "comfy_extras/nodes_images.py", "save_images"))?;
    let file = format!("{}_{:05}_.{ext}", target.filename, target.counter);
    files::write_atomic(&target.folder.join(&file), &bytes)
        .map_err(|e| write_failure(e, "comfy_extras/nodes_images.py", "save_images"))?;
    let animated = if webp { count > 1 } else { true };
    Ok(NodeOutput {
        ui: Some(obj(vec![
            ("images", OValue::Array(vec![file_ref(&file, &target.subfolder, "output")])),
            ("animated", OValue::Array(vec![OValue::Bool(animated)])),
        ])),
        ..Default::default()
    })
}

/// Encodes a batch into MP4 bytes.
pub fn encode_mp4(images: &ImageBatch, fps: f64) -> Result<Vec<u8>, NodeFailure> {
    if images.is_empty() {
        return Err(NodeFailure::type_error("cannot encode an empty image batch"));
    }
    let (w, h) = images.size();
    let count = images.len();
    let video =
        h264::encode(w, h, fps, count, |i| images.render(i).unwrap_or_else(|| RgbImage::new(w, h))).map_err(|e| {
            NodeFailure::new(
                "av.error.ValueError",
                format!("[Errno 22] Invalid argument; libx264: {e}"),
                "comfy_api/latest/_input_impl/video_types.py",
                322,
                "save_to",
                "output.mux(video_stream.encode(frame))",
            )
        })?;
    mp4::mux(&video, fps).map_err(|e| write_failure(e, "comfy_api/latest/_input_impl/video_types.py", "save_to"))
}

/// The synthetic moving clip behind [`crate::write_test_clip`], as MP4 bytes.
pub fn test_clip_mp4(width: u32, height: u32, frames: u32, fps: f64) -> Result<Vec<u8>, NodeFailure> {
    check_size(width, height)?;
    let count = frames.max(1) as usize;
    let base = Arc::new(frames::procedural(width, height, 42));
    let batch = ImageBatch::new(vec![frames::Frame::from_image(base)]).repeat(count).map_indexed(|i| {
        let t = if count > 1 { i as f32 / (count - 1) as f32 } else { 0.0 };
        FrameOp::Motion(Motion { t, seed: 42 })
    });
    encode_mp4(&batch, fps)
}

fn save_video(job: &EvalJob) -> Result<NodeOutput, NodeFailure> {
    let video = match job.link("video")? {
        Value::Video(v) => v.clone(),
        other => {
            return Err(NodeFailure::type_error(format!("expected VIDEO, got {}", other.describe())));
        }
    };
    let format = job.string("format", "auto");
    let codec = job.string("codec", "auto");
    let enum_error = |value: &str, enum_name: &str| {
        NodeFailure::new(
            "ValueError",
            format!("'{value}' is not a valid {enum_name}"),
            "comfy_extras/nodes_video.py",
            92,
            "execute",
            "format=Types.VideoContainer(format), codec=Types.VideoCodec(codec)",
        )
    };
    if !matches!(format.as_str(), "auto" | "mp4") {
        return Err(enum_error(&format, "VideoContainer"));
    }
    if !matches!(codec.as_str(), "auto" | "h264") {
        return Err(enum_error(&codec, "VideoCodec"));
    }
    let (w, h) = video.frames.size();
    let target = files::save_image_path(&job.dirs.output, &job.string("filename_prefix", "video/ComfyUI"), w, h)
        .map_err(save_failure)?;
    let bytes = encode_mp4(&video.frames, video.fps)?;
    let file = format!("{}_{:05}_.mp4", target.filename, target.counter);
    files::write_atomic(&target.folder.join(&file), &bytes)
        .map_err(|e| write_failure(e, "comfy_extras/nodes_video.py", "execute"))?;
    Ok(NodeOutput {
        ui: Some(obj(vec![
            ("images", OValue::Array(vec![file_ref(&file, &target.subfolder, "output")])),
            ("animated", OValue::Array(vec![OValue::Bool(true)])),
        ])),
        ..Default::default()
    })
}

fn save_webm(job: &EvalJob) -> Result<NodeOutput, NodeFailure> {
    let codec = job.string("codec", "vp9");
    if !matches!(codec.as_str(), "vp9" | "av1") {
        // The captured 0.3.64 behaviour for an unknown codec.
        return Err(NodeFailure::new(
            "KeyError",
            format!("'{codec}'"),
            "comfy_extras/nodes_video.py",
            59,
            "execute",
            "codec_map = {\"vp9\": \"libvpx-vp9\", \"av1\": \"libsvtav1\"}[codec]",
        ));
    }
    let encoder = if codec == "vp9" { "libvpx-vp9" } else { "libsvtav1" };
    Err(NodeFailure::new(
        "av.codec.codec.UnknownCodecError",
        format!("{encoder} (the tdcomfy simulator has no VP9/AV1 encoder; use SaveVideo for an H.264 mp4)"),
        "comfy_extras/nodes_video.py",
        63,
        "execute",
        "stream = container.add_stream(codec_map[codec], rate=Fraction(round(fps * 1000), 1000))",
    ))
}

fn vhs_video_combine(job: &EvalJob) -> Result<NodeOutput, NodeFailure> {
    let images = job.image("images")?;
    let (w, h) = images.size();
    let frame_rate = job.float("frame_rate", 8.0);
    let format = job.string("format", "image/webp");
    let save_output = job.boolean("save_output", true);
    let (dir, dir_type) = if save_output { (&job.dirs.output, "output") } else { (&job.dirs.temp, "temp") };
    let target =
        files::save_image_path(dir, &job.string("filename_prefix", "AnimateDiff"), w, h).map_err(save_failure)?;
    let counter = files::vhs_counter(&target.folder, &target.filename);
    let mut frames_batch = images.clone();
    if job.boolean("pingpong", false) && images.len() > 2 {
        let back: Vec<frames::Frame> = images.frames()[1..images.len() - 1].iter().rev().cloned().collect();
        frames_batch = ImageBatch::concat(vec![images.clone(), ImageBatch::new(back)]);
    }
    let first = frames_batch.render(0).ok_or_else(|| NodeFailure::type_error("empty image batch"))?;
    let texts = png_texts(job);
    let text_refs: Vec<(&str, String)> = texts.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let workflow_file = format!("{}_{counter:05}.png", target.filename);
    let first_png = anim::png_with_text(&first, &text_refs)
        .map_err(|e| write_failure(e, "videohelpersuite/nodes.py", "combine_video"))?;
    files::write_atomic(&target.folder.join(&workflow_file), &first_png)
        .map_err(|e| write_failure(e, "videohelpersuite/nodes.py", "combine_video"))?;
    let (bytes, ext) = match format.as_str() {
        "video/h264-mp4" => (encode_mp4(&frames_batch, frame_rate)?, "mp4"),
        "image/webp" => (
            anim::animated_webp(frames_batch.len(), |i| render(&frames_batch, i), frame_rate)
                .map_err(|e| write_failure(e, "videohelpersuite/nodes.py", "combine_video"))?,
            "webp",
        ),
        other => {
            return Err(NodeFailure::new(
                "ValueError",
                format!("Unsupported format in the tdcomfy simulator: {other}"),
                "custom_nodes/ComfyUI-VideoHelperSuite/videohelpersuite/nodes.py",
                520,
                "combine_video",
                "video_format = apply_format_widgets(format_ext, kwargs)",
            ));
        }
    };
    let file = format!("{}_{counter:05}.{ext}", target.filename);
    let full = target.folder.join(&file);
    files::write_atomic(&full, &bytes).map_err(|e| write_failure(e, "videohelpersuite/nodes.py", "combine_video"))?;
    let fullpath = full.to_string_lossy().into_owned();
    let preview = obj(vec![
        ("filename", OValue::str(file.clone())),
        ("subfolder", OValue::str(target.subfolder.clone())),
        ("type", OValue::str(dir_type)),
        ("format", OValue::str(format)),
        ("frame_rate", num_f(frame_rate)),
        ("workflow", OValue::str(workflow_file.clone())),
        ("fullpath", OValue::str(fullpath.clone())),
    ]);
    let written = vec![target.folder.join(&workflow_file).to_string_lossy().into_owned(), fullpath];
    Ok(NodeOutput {
        values: vec![Value::Filenames(Arc::new(written))],
        ui: Some(obj(vec![("gifs", OValue::Array(vec![preview]))])),
        ..Default::default()
    })
}

fn sim_save_video_list(job: &EvalJob) -> Result<NodeOutput, NodeFailure> {
    let images = job.image("images")?;
    let (w, h) = images.size();
    let fps = job.float("fps", 24.0);
    let target = files::save_image_path(&job.dirs.output, &job.string("filename_prefix", "sim/video"), w, h)
        .map_err(save_failure)?;
    let bytes = encode_mp4(&images, fps)?;
    let file = format!("{}_{:05}_.mp4", target.filename, target.counter);
    files::write_atomic(&target.folder.join(&file), &bytes)
        .map_err(|e| write_failure(e, "custom_nodes/tdcomfy_sim/__init__.py", "save"))?;
    let item = obj(vec![
        ("filename", OValue::str(file)),
        ("subfolder", OValue::str(target.subfolder)),
        ("type", OValue::str("output")),
        ("format", OValue::str("video/h264-mp4")),
        ("frame_rate", num_f(fps)),
    ]);
    Ok(NodeOutput { ui: Some(obj(vec![("videos", OValue::Array(vec![item]))])), ..Default::default() })
}

fn save_image_websocket(job: &EvalJob) -> Result<NodeOutput, NodeFailure> {
    let images = job.image("images")?;
    let mut ws_images = Vec::with_capacity(images.len());
    for frame in images.frames() {
        ws_images.push(
            anim::png(&frame.render(), true)
                .map_err(|e| write_failure(e, "custom_nodes/websocket_image_save.py", "save_images"))?,
        );
    }
    Ok(NodeOutput { ws_images, ..Default::default() })
}

/// Evaluates one node.
pub fn evaluate(job: &EvalJob) -> Result<NodeOutput, NodeFailure> {
    let single = |v: Value| Ok(NodeOutput { values: vec![v], ..Default::default() });
    match job.class_type.as_str() {
        "LoadImage" => load_image(job, "input"),
        "LoadImageOutput" => load_image(job, "output"),
        "ImageInvert" => single(Value::Image(job.image("image")?.map(FrameOp::Invert))),
        "ImageScale" => scale_image(job, false),
        "ImageScaleBy" => scale_image(job, true),
        "RepeatImageBatch" => {
            let image = job.image("image")?;
            let amount = job.int("amount", 1).clamp(1, 4096) as usize;
            let (w, h) = image.size();
            check_frames(image.len().saturating_mul(amount), w, h)?;
            single(Value::Image(image.repeat(amount)))
        }
        "LTXVPreprocess" => single(Value::Image(job.image("image")?)),
        "SlowPassthrough" => single(Value::Image(job.image("images")?)),
        "FailAlways" => Err(NodeFailure::new(
            "RuntimeError",
            job.string("message", "synthetic failure"),
            "custom_nodes/td_test_nodes/__init__.py",
            48,
            "run",
            "raise RuntimeError(message)",
        )),
        "SaveImage" => save_images(job, false),
        "PreviewImage" => save_images(job, true),
        "SaveAnimatedWEBP" => save_animated(job, true),
        "SaveAnimatedPNG" => save_animated(job, false),
        "SaveWEBM" => save_webm(job),
        "CreateVideo" => {
            let frames = job.image("images")?;
            single(Value::Video(Arc::new(VideoValue { frames, fps: job.float("fps", 30.0) })))
        }
        "SaveVideo" => save_video(job),
        "VHS_VideoCombine" => vhs_video_combine(job),
        "TDComfySimSaveVideoList" => sim_save_video_list(job),
        "SaveImageWebsocket" => save_image_websocket(job),
        "CheckpointLoaderSimple" => {
            let name: Arc<str> = job.string("ckpt_name", "").into();
            Ok(NodeOutput { values: vec![Value::Model(name.clone()); 3], ..Default::default() })
        }
        "CLIPLoader" => single(Value::Model(job.string("clip_name", "").into())),
        "CLIPTextEncode" => single(Value::Conditioning(job.string("text", "").into())),
        "LTXVImgToVideo" => ltxv_img_to_video(job),
        "LTXVConditioning" => Ok(NodeOutput {
            values: vec![job.passthrough("positive")?, job.passthrough("negative")?],
            ..Default::default()
        }),
        "LTXVScheduler" => single(Value::Sigmas(job.int("steps", 20).clamp(1, 10_000) as u32)),
        "ModelSamplingLTXV" => single(job.passthrough("model")?),
        "EmptyLTXVLatentVideo" => empty_latent_video(job),
        "KSamplerSelect" => single(Value::Sampler(job.string("sampler_name", "euler").into())),
        "SamplerCustom" => sample(job, "noise_seed", 2),
        "KSampler" => sample(job, "seed", 1),
        "VAEDecode" => vae_decode(job),
        other => Err(NodeFailure::type_error(format!("node class {other} has no simulation"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(dirs: &DataDirs, class_type: &str, inputs: Vec<(&str, Input)>) -> EvalJob {
        EvalJob {
            dirs: dirs.clone(),
            class_type: class_type.into(),
            inputs: inputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            graph: Arc::new(OMap::new()),
            extra_data: Arc::new(OMap::new()),
        }
    }

    #[test]
    fn ltxv_chain_produces_moving_frames_of_the_requested_size() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = DataDirs::create(tmp.path()).expect("dirs");
        let image = Value::Image(ImageBatch::single(frames::procedural(100, 80, 3)));
        let cond = Value::Conditioning("a cat".into());
        let latent = evaluate(&job(
            &dirs,
            "LTXVImgToVideo",
            vec![
                ("positive", Input::Link(cond.clone())),
                ("negative", Input::Link(cond)),
                ("vae", Input::Link(Value::Model("vae".into()))),
                ("image", Input::Link(image)),
                ("width", Input::Literal(OValue::Number(200.into()))),
                ("height", Input::Literal(OValue::Number(128.into()))),
                ("length", Input::Literal(OValue::Number(20.into()))),
            ],
        ))
        .expect("img2video");
        let sampled = evaluate(&job(
            &dirs,
            "KSampler",
            vec![
                ("latent_image", Input::Link(latent.values[2].clone())),
                ("seed", Input::Literal(OValue::Number(5.into()))),
            ],
        ))
        .expect("sample");
        let decoded = evaluate(&job(&dirs, "VAEDecode", vec![("samples", Input::Link(sampled.values[0].clone()))]))
            .expect("decode");
        let Value::Image(batch) = &decoded.values[0] else { panic!("decode must yield IMAGE") };
        assert_eq!(batch.len(), 17);
        assert_eq!(batch.size(), (192, 128));
        assert_ne!(batch.render(0).expect("frame").as_raw(), batch.render(16).expect("frame").as_raw());
    }
}
