//! Output collection: turns ComfyUI's per-node UI dicts (from `/history` or `executed` events)
//! into typed [`OutputFile`]s, and picks the file a TouchDesigner user wants back.
//!
//! ComfyUI has no single output key: core video lands under `images` with `animated: [true]`,
//! VideoHelperSuite uses `gifs` (with a `format`), some nodes use `videos` or `audio`, and custom
//! nodes invent their own keys. So every key whose value is a list of `{filename, subfolder, type}`
//! objects counts, and the media type comes from the extension (or VHS `format`), never the key.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One node's UI output dict exactly as ComfyUI sent it (`{"images": [...], "animated": [true]}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeOutput(pub Map<String, Value>);

impl NodeOutput {
    /// The raw dict.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    /// The file references in this output, classified; `node_id` is recorded on each.
    pub fn files(&self, node_id: &str) -> Vec<OutputFile> {
        let mut files = Vec::new();
        push_node_files(node_id, self, &mut files);
        files
    }
}

/// Which ComfyUI directory a file lives in (the `type` field of a file reference).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum FolderType {
    /// `output`: files written by save nodes.
    Output,
    /// `temp`: previews, wiped when ComfyUI starts.
    Temp,
    /// `input`: uploads.
    Input,
    /// Anything newer ComfyUI versions may add; passed back verbatim.
    Other(String),
}

impl FolderType {
    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Output => "output",
            Self::Temp => "temp",
            Self::Input => "input",
            Self::Other(other) => other,
        }
    }
}

impl From<String> for FolderType {
    fn from(value: String) -> Self {
        match value.as_str() {
            "output" => Self::Output,
            "temp" => Self::Temp,
            "input" => Self::Input,
            _ => Self::Other(value),
        }
    }
}

impl From<FolderType> for String {
    fn from(value: FolderType) -> Self {
        value.as_str().to_owned()
    }
}

impl fmt::Display for FolderType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of media a file is, decided from its extension (and VHS `format` / `animated`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    /// A video container (mp4, webm, mov, mkv, …).
    Video,
    /// An animated image (gif, animated webp, APNG).
    AnimatedImage,
    /// A still image.
    Image,
    /// Audio.
    Audio,
    /// Anything else (text, latents, meshes, …).
    Other,
}

/// One file produced by a prompt, enough to download it with `GET /view`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// The node whose UI output listed the file.
    pub node_id: String,
    /// The key it was listed under (`images`, `gifs`, `videos`, `audio`, …).
    pub key: String,
    /// File name (no directory).
    pub filename: String,
    /// Sub-directory inside the folder (may be empty).
    pub subfolder: String,
    /// The folder (`type` on the wire).
    pub kind: FolderType,
    /// Media classification.
    pub media: MediaKind,
    /// Lowercase container/format name: `mp4`, `webm`, `webp`, `png`, `gif`, `jpeg`, `wav`, … or
    /// `unknown`.
    pub format: String,
}

impl OutputFile {
    /// The MIME type ComfyUI's `/view` will most likely answer with, from the format.
    pub fn content_type_guess(&self) -> &'static str {
        match self.format.as_str() {
            "mp4" => "video/mp4",
            "webm" => "video/webm",
            "mov" => "video/quicktime",
            "mkv" => "video/x-matroska",
            "avi" => "video/x-msvideo",
            "gif" => "image/gif",
            "webp" => "image/webp",
            "png" => "image/png",
            "jpeg" => "image/jpeg",
            "bmp" => "image/bmp",
            "tiff" => "image/tiff",
            "wav" => "audio/wav",
            "mp3" => "audio/mpeg",
            "flac" => "audio/flac",
            "ogg" => "audio/ogg",
            "opus" => "audio/opus",
            "m4a" => "audio/mp4",
            _ => "application/octet-stream",
        }
    }
}

/// Collects every file reference from a set of node outputs (history `outputs` or the outputs
/// of `executed` events), in natural node-id order, de-duplicated.
pub fn collect_outputs<'a, I>(outputs: I) -> Vec<OutputFile>
where
    I: IntoIterator<Item = (&'a str, &'a NodeOutput)>,
{
    let mut nodes: Vec<(&str, &NodeOutput)> = outputs.into_iter().collect();
    nodes.sort_by(|a, b| natural_cmp(a.0, b.0));
    let mut files = Vec::new();
    for (node_id, output) in nodes {
        push_node_files(node_id, output, &mut files);
    }
    let mut seen = HashSet::new();
    files.retain(|f| seen.insert((f.kind.clone(), f.subfolder.clone(), f.filename.clone())));
    files
}

/// Picks the file to hand back as "the result": a video first (mp4 > webm/mov/mkv > gif/animated
/// webp/APNG > still image > audio > other), saved outputs before temp previews, and files of
/// `hint_node` (the workflow's declared output node) before all others when it has any.
pub fn pick_primary<'a>(outputs: &'a [OutputFile], hint_node: Option<&str>) -> Option<&'a OutputFile> {
    outputs
        .iter()
        .enumerate()
        .min_by_key(|(index, file)| {
            let off_hint = hint_node.is_some_and(|hint| hint != file.node_id);
            let temp = file.kind != FolderType::Output;
            (off_hint, media_rank(file), temp, *index)
        })
        .map(|(_, file)| file)
}

fn media_rank(file: &OutputFile) -> u8 {
    match (file.media, file.format.as_str()) {
        (MediaKind::Video, "mp4") => 0,
        (MediaKind::Video, _) => 1,
        (MediaKind::AnimatedImage, _) => 2,
        (MediaKind::Image, _) => 3,
        (MediaKind::Audio, _) => 4,
        (MediaKind::Other, _) => 5,
    }
}

fn push_node_files(node_id: &str, output: &NodeOutput, files: &mut Vec<OutputFile>) {
    let animated = animated_flags(output.as_map().get("animated"));
    for (key, value) in output.as_map() {
        let Value::Array(items) = value else { continue };
        for (index, item) in items.iter().enumerate() {
            let Some(file) = item.as_object() else {
                continue;
            };
            let Some(filename) = file.get("filename").and_then(Value::as_str) else {
                continue;
            };
            if filename.is_empty() {
                continue;
            }
            let subfolder = file.get("subfolder").and_then(Value::as_str).unwrap_or_default();
            let kind =
                file.get("type").and_then(Value::as_str).map_or(FolderType::Output, |t| FolderType::from(t.to_owned()));
            let vhs_format = file.get("format").and_then(Value::as_str);
            let is_animated = match &animated {
                Animated::Each(flags) => flags.get(index).copied().unwrap_or(false),
                Animated::All(flag) => *flag,
            };
            let (media, format) = classify(filename, vhs_format, key, is_animated);
            files.push(OutputFile {
                node_id: node_id.to_owned(),
                key: key.clone(),
                filename: filename.to_owned(),
                subfolder: subfolder.to_owned(),
                kind,
                media,
                format,
            });
        }
    }
}

enum Animated {
    /// One flag per file, aligned by index.
    Each(Vec<bool>),
    /// One flag for the whole output (`animated: [true]` for a one-file list, or a bare bool).
    All(bool),
}

fn animated_flags(value: Option<&Value>) -> Animated {
    match value {
        Some(Value::Array(flags)) if flags.len() == 1 => Animated::All(flags[0].as_bool().unwrap_or(false)),
        Some(Value::Array(flags)) => Animated::Each(flags.iter().map(|f| f.as_bool().unwrap_or(false)).collect()),
        Some(Value::Bool(flag)) => Animated::All(*flag),
        _ => Animated::All(false),
    }
}

/// Classifies one file. The extension decides; VHS's `format` (`video/h264-mp4`, `image/gif`)
/// only fills in when the extension is unknown, and the key is the last resort.
fn classify(filename: &str, vhs_format: Option<&str>, key: &str, animated: bool) -> (MediaKind, String) {
    let ext = filename.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase()).unwrap_or_default();
    let by_ext = match ext.as_str() {
        "mp4" | "m4v" => Some((MediaKind::Video, "mp4")),
        "webm" => Some((MediaKind::Video, "webm")),
        "mov" => Some((MediaKind::Video, "mov")),
        "mkv" => Some((MediaKind::Video, "mkv")),
        "avi" => Some((MediaKind::Video, "avi")),
        "gif" => Some((MediaKind::AnimatedImage, "gif")),
        "webp" if animated => Some((MediaKind::AnimatedImage, "webp")),
        "png" | "apng" if animated || ext == "apng" => Some((MediaKind::AnimatedImage, "png")),
        "webp" => Some((MediaKind::Image, "webp")),
        "png" => Some((MediaKind::Image, "png")),
        "jpg" | "jpeg" => Some((MediaKind::Image, "jpeg")),
        "bmp" => Some((MediaKind::Image, "bmp")),
        "tif" | "tiff" => Some((MediaKind::Image, "tiff")),
        "wav" => Some((MediaKind::Audio, "wav")),
        "mp3" => Some((MediaKind::Audio, "mp3")),
        "flac" => Some((MediaKind::Audio, "flac")),
        "ogg" => Some((MediaKind::Audio, "ogg")),
        "opus" => Some((MediaKind::Audio, "opus")),
        "m4a" => Some((MediaKind::Audio, "m4a")),
        _ => None,
    };
    if let Some((media, format)) = by_ext {
        return (media, format.to_owned());
    }
    if let Some(format) = vhs_format {
        let format = format.to_ascii_lowercase();
        if let Some(sub) = format.strip_prefix("video/") {
            let container = if sub.contains("mp4") {
                "mp4"
            } else if sub.contains("webm") {
                "webm"
            } else if sub.contains("gif") {
                return (MediaKind::AnimatedImage, "gif".to_owned());
            } else if sub.contains("prores") || sub.contains("mov") {
                "mov"
            } else {
                "unknown"
            };
            return (MediaKind::Video, container.to_owned());
        }
        if let Some(sub) = format.strip_prefix("image/") {
            return (MediaKind::AnimatedImage, safe_format(sub));
        }
    }
    let media = match key {
        "videos" | "video" => MediaKind::Video,
        "gifs" => MediaKind::AnimatedImage,
        "audio" => MediaKind::Audio,
        "images" => MediaKind::Image,
        _ => MediaKind::Other,
    };
    let format = if ext.is_empty() { "unknown".to_owned() } else { safe_format(&ext) };
    (media, format)
}

/// A format named by ComfyUI (or a custom node) becomes a file extension on the worker's disk and
/// a media type at the broker: only `[a-z0-9]{1,8}` passes; anything else (`../x`, `mp4;rm`, a
/// 200-character name) is `bin`.
fn safe_format(raw: &str) -> String {
    let ok = (1..=8).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok { raw.to_owned() } else { "bin".to_owned() }
}

/// Orders node ids as numbers when both are numeric ("9" < "10"), else as text.
pub(crate) fn natural_cmp(a: &str, b: &str) -> Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}
