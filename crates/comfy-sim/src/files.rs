//! The data directory (`input/`, `output/`, `temp/`) and ComfyUI's file naming rules.
//!
//! Owns: path normalisation with the same escape checks as ComfyUI (`os.path.normpath` +
//! `commonpath`), the save-file counter of `folder_paths.get_save_image_path`, the upload rename
//! rule (`name (1).png`), `/view` path resolution and content types. All checks are lexical, like
//! ComfyUI's, but a path is never allowed to leave the data directory.

use std::io;
use std::path::{Path, PathBuf};

/// The three directories ComfyUI serves files from.
#[derive(Debug, Clone)]
pub struct DataDirs {
    /// the base directory itself, absolute (what `/system_stats` reports as `--base-directory`)
    pub root: PathBuf,
    /// `<data_dir>/input`: uploads, LoadImage sources
    pub input: PathBuf,
    /// `<data_dir>/output`: saved results
    pub output: PathBuf,
    /// `<data_dir>/temp`: previews, wiped at start-up like ComfyUI does
    pub temp: PathBuf,
}

impl DataDirs {
    /// Creates the layout under `root` and empties `temp/`.
    pub fn create(root: &Path) -> io::Result<Self> {
        let root = if root.is_absolute() { root.to_path_buf() } else { std::env::current_dir()?.join(root) };
        let root = PathBuf::from(normpath(&root.to_string_lossy()));
        let dirs = Self {
            input: root.join("input"),
            root: root.clone(),
            output: root.join("output"),
            temp: root.join("temp"),
        };
        if dirs.temp.exists() {
            std::fs::remove_dir_all(&dirs.temp)?;
        }
        for dir in [&dirs.input, &dirs.output, &dirs.temp] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(dirs)
    }

    /// The directory for a `type` value (`input`, `output`, `temp`).
    pub fn by_type(&self, dir_type: &str) -> Option<&Path> {
        match dir_type {
            "input" => Some(&self.input),
            "output" => Some(&self.output),
            "temp" => Some(&self.temp),
            _ => None,
        }
    }
}

/// Python's `os.path.normpath` for POSIX paths.
pub fn normpath(path: &str) -> String {
    if path.is_empty() {
        return ".".to_string();
    }
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// Python's `os.path.dirname` / `basename` split.
pub fn split_dir_base(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(idx) => {
            let dir = &path[..idx];
            let dir = if dir.is_empty() { "/" } else { dir.trim_end_matches('/') };
            (if dir.is_empty() { "/" } else { dir }, &path[idx + 1..])
        }
        None => ("", path),
    }
}

/// `os.path.join(base, rel)` followed by `abspath`, or `None` when the result leaves `base`
/// (ComfyUI's `commonpath` check).
pub fn join_within(base: &Path, rel: &str) -> Option<PathBuf> {
    let joined =
        if rel.starts_with('/') { normpath(rel) } else { normpath(&format!("{}/{}", base.to_string_lossy(), rel)) };
    let joined = PathBuf::from(joined);
    joined.starts_with(base).then_some(joined)
}

/// Where and under which name a save node writes (`folder_paths.get_save_image_path`).
#[derive(Debug, Clone)]
pub struct SavePath {
    /// absolute folder
    pub folder: PathBuf,
    /// `basename(prefix)`
    pub filename: String,
    /// the first free counter
    pub counter: u64,
    /// `dirname(prefix)`, as reported in output items
    pub subfolder: String,
}

/// Substitutes the `%width%`-style variables ComfyUI expands on the server.
fn compute_vars(prefix: &str, width: u32, height: u32) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (year, month, day, hour, minute, second) = civil_from_unix(secs);
    prefix
        .replace("%width%", &width.to_string())
        .replace("%height%", &height.to_string())
        .replace("%year%", &year.to_string())
        .replace("%month%", &format!("{month:02}"))
        .replace("%day%", &format!("{day:02}"))
        .replace("%hour%", &format!("{hour:02}"))
        .replace("%minute%", &format!("{minute:02}"))
        .replace("%second%", &format!("{second:02}"))
}

/// UTC calendar fields of a Unix time (days-from-civil inverse; the simulator has no tz database).
fn civil_from_unix(secs: u64) -> (i64, u32, u32, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// Resolves a `filename_prefix` the way ComfyUI's core save nodes do. The error text is the
/// exception message ComfyUI raises for a prefix that escapes the output folder.
pub fn save_image_path(output_dir: &Path, prefix: &str, width: u32, height: u32) -> Result<SavePath, String> {
    let prefix = if prefix.contains('%') { compute_vars(prefix, width, height) } else { prefix.to_string() };
    let norm = normpath(&prefix);
    let (subfolder, filename) = split_dir_base(&norm);
    let full = join_within(output_dir, subfolder);
    let Some(folder) = full else {
        let abs = normpath(&format!("{}/{}", output_dir.to_string_lossy(), subfolder));
        return Err(format!(
            "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {abs}\n         output_dir: {}\n         commonpath: {}",
            output_dir.display(),
            common_path(output_dir, Path::new(&abs)).display()
        ));
    };
    let prefix_len = split_dir_base(&prefix).1.chars().count();
    let mut best: Option<(i64, String)> = None;
    if let Ok(entries) = std::fs::read_dir(&folder) {
        for entry in entries.filter_map(Result::ok) {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let head: String = name.chars().take(prefix_len + 1).collect();
            let tail: String = name.chars().skip(prefix_len + 1).collect();
            let digits = tail.split('_').next().unwrap_or("").trim().parse::<i64>().unwrap_or(0);
            let Some(stem) = head.strip_suffix('_') else {
                continue;
            };
            if stem != filename {
                continue;
            }
            if best.as_ref().is_none_or(|b| (digits, &head) > (b.0, &b.1)) {
                best = Some((digits, head));
            }
        }
    } else {
        std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
    }
    let counter = best.map_or(1, |(d, _)| (d + 1).max(1) as u64);
    Ok(SavePath { folder, filename: filename.to_string(), counter, subfolder: subfolder.to_string() })
}

fn common_path(a: &Path, b: &Path) -> PathBuf {
    a.components().zip(b.components()).take_while(|(x, y)| x == y).map(|(x, _)| x).collect()
}

/// The counter VHS_VideoCombine uses: 1 + the highest `<name>_<digits>…` in the folder.
pub fn vhs_counter(folder: &Path, filename: &str) -> u64 {
    let mut max = 0u64;
    if let Ok(entries) = std::fs::read_dir(folder) {
        for entry in entries.filter_map(Result::ok) {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let lower = name.to_lowercase();
            let Some(rest) = lower.strip_prefix(&format!("{}_", filename.to_lowercase())) else {
                continue;
            };
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let after = &rest[digits.len()..];
            // `\D*\..+`: non-digits up to a dot, then an extension.
            let valid = !digits.is_empty()
                && after
                    .find('.')
                    .is_some_and(|dot| !after[..dot].chars().any(|c| c.is_ascii_digit()) && dot + 1 < after.len());
            if valid && let Ok(n) = digits.parse::<u64>() {
                max = max.max(n);
            }
        }
    }
    max + 1
}

/// Result of placing an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadTarget {
    /// the final file name reported back as `name`
    pub name: String,
    /// where it lives
    pub path: PathBuf,
    /// whether the bytes still need writing (false when an identical file already exists)
    pub write: bool,
}

/// Why an upload cannot be placed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// the subfolder or name escapes the directory
    #[error("upload path escapes the target directory")]
    Escapes,
    /// file system failure
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Picks the name for an upload: same name and same bytes reuse the file, different bytes get
/// `name (1).ext`, `name (2).ext`, …, unless `overwrite` is set.
pub fn place_upload(
    dir: &Path,
    subfolder: &str,
    filename: &str,
    bytes: &[u8],
    overwrite: bool,
) -> Result<UploadTarget, UploadError> {
    if filename.contains('/') || filename.contains('\\') {
        return Err(UploadError::Escapes);
    }
    let folder = join_within(dir, &normpath(subfolder)).ok_or(UploadError::Escapes)?;
    let mut path = join_within(&folder, filename).ok_or(UploadError::Escapes)?;
    if !path.starts_with(dir) || path == folder {
        return Err(UploadError::Escapes);
    }
    std::fs::create_dir_all(&folder)?;
    let mut name = filename.to_string();
    if overwrite {
        return Ok(UploadTarget { name, path, write: true });
    }
    let (stem, ext) = split_ext(filename);
    let mut i = 1u64;
    while path.exists() {
        if std::fs::read(&path).is_ok_and(|existing| existing == bytes) {
            return Ok(UploadTarget { name, path, write: false });
        }
        name = format!("{stem} ({i}){ext}");
        path = folder.join(&name);
        i += 1;
    }
    Ok(UploadTarget { name, path, write: true })
}

/// Python's `os.path.splitext`: leading dots do not start an extension.
pub fn split_ext(name: &str) -> (&str, &str) {
    let trimmed = name.trim_start_matches('.');
    let offset = name.len() - trimmed.len();
    match trimmed.rfind('.') {
        Some(idx) => name.split_at(offset + idx),
        None => (name, ""),
    }
}

/// Splits a ComfyUI annotated name (`"x.png [output]"`) into the bare name and the directory type.
pub fn annotated(name: &str) -> (&str, Option<&'static str>) {
    // ComfyUI strips a fixed number of characters (the tag plus the space before it).
    let strip = |tag_len: usize| name.get(..name.len().saturating_sub(tag_len)).unwrap_or("");
    if name.ends_with("[output]") {
        (strip(9), Some("output"))
    } else if name.ends_with("[input]") {
        (strip(8), Some("input"))
    } else if name.ends_with("[temp]") {
        (strip(7), Some("temp"))
    } else {
        (name, None)
    }
}

/// Resolves a LoadImage-style reference (`"td/frame.png"`, `"x.png [output]"`) to a path, or
/// `None` when it would leave the data directory.
pub fn resolve_annotated(dirs: &DataDirs, name: &str, default_type: &str) -> Option<PathBuf> {
    let (bare, dir_type) = annotated(name);
    let dir = dirs.by_type(dir_type.unwrap_or(default_type))?;
    join_within(dir, bare)
}

/// Why `/view` refuses a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewRefusal {
    /// 400: empty/absolute/`..` filename or unknown type
    BadRequest,
    /// 403: subfolder escapes the directory
    Forbidden,
    /// 404: no such file
    NotFound,
}

/// Applies ComfyUI's `/view` rules and returns the file and the name for `Content-Disposition`.
pub fn resolve_view(
    dirs: &DataDirs,
    filename: &str,
    dir_type: Option<&str>,
    subfolder: Option<&str>,
) -> Result<(PathBuf, String), ViewRefusal> {
    let (name, annotated_type) = annotated(filename);
    if name.is_empty() || name.starts_with('/') || name.contains("..") {
        return Err(ViewRefusal::BadRequest);
    }
    let dir_type = annotated_type.unwrap_or(dir_type.unwrap_or("output"));
    let mut dir = dirs.by_type(dir_type).ok_or(ViewRefusal::BadRequest)?.to_path_buf();
    if let Some(sub) = subfolder {
        dir = join_within(&dir, sub).ok_or(ViewRefusal::Forbidden)?;
    }
    let base = split_dir_base(name).1.to_string();
    let file = dir.join(&base);
    if base.is_empty() || !file.is_file() {
        return Err(ViewRefusal::NotFound);
    }
    Ok((file, base))
}

/// The content type Python's `mimetypes` guesses, with ComfyUI's override for active content.
pub fn content_type(name: &str) -> &'static str {
    let ext = split_ext(name).1.trim_start_matches('.').to_ascii_lowercase();
    match ext.as_str() {
        "png" | "apng" => "image/png",
        "jpg" | "jpeg" | "jpe" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        "ico" => "image/vnd.microsoft.icon",
        "svg" => "image/svg+xml",
        "avif" => "image/avif",
        "mp4" | "m4v" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mkv" => "video/x-matroska",
        "avi" => "video/x-msvideo",
        "mp3" => "audio/mpeg",
        "wav" => "audio/x-wav",
        "flac" => "audio/flac",
        "ogg" => "audio/ogg",
        "json" => "application/json",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
}

/// Whether `mimetypes` would call this file an image (LoadImage's dropdown filter).
pub fn is_image_name(name: &str) -> bool {
    content_type(name).starts_with("image/")
}

/// Writes a file atomically (temp name + rename), so `/view` never serves half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.{}.part",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normpath_matches_python() {
        assert_eq!(normpath("td/invert"), "td/invert");
        assert_eq!(normpath("td/../x"), "x");
        assert_eq!(normpath("../../etc"), "../../etc");
        assert_eq!(normpath("/a/./b/../c"), "/a/c");
        assert_eq!(normpath(""), ".");
        assert_eq!(split_dir_base("td/invert"), ("td", "invert"));
        assert_eq!(split_dir_base("invert"), ("", "invert"));
        assert_eq!(split_ext("frame.png"), ("frame", ".png"));
        assert_eq!(split_ext(".hidden"), (".hidden", ""));
    }

    #[test]
    fn save_counter_follows_highest_existing_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path();
        let p = save_image_path(out, "td/invert", 8, 8).expect("inside");
        assert_eq!((p.counter, p.subfolder.as_str(), p.filename.as_str()), (1, "td", "invert"));
        std::fs::write(out.join("td/invert_00001_.png"), b"x").expect("write");
        std::fs::write(out.join("td/invert_00007_.mp4"), b"x").expect("write");
        std::fs::write(out.join("td/invert_b_00009_.png"), b"x").expect("write");
        assert_eq!(save_image_path(out, "td/invert", 8, 8).expect("inside").counter, 8);
        assert_eq!(save_image_path(out, "td/invert_b", 8, 8).expect("inside").counter, 10);
        assert!(save_image_path(out, "../escape", 8, 8).is_err());
        std::fs::write(out.join("td/AnimateDiff_00003.mp4"), b"x").expect("write");
        assert_eq!(vhs_counter(&out.join("td"), "AnimateDiff"), 4);
    }

    #[test]
    fn upload_naming_dedupes_and_renames() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let a = place_upload(dir, "", "frame.png", b"aaa", false).expect("ok");
        assert_eq!(a.name, "frame.png");
        std::fs::write(&a.path, b"aaa").expect("write");
        assert!(!place_upload(dir, "", "frame.png", b"aaa", false).expect("ok").write);
        let b = place_upload(dir, "", "frame.png", b"bbb", false).expect("ok");
        assert_eq!(b.name, "frame (1).png");
        assert!(matches!(place_upload(dir, "../../etc", "evil.png", b"x", false), Err(UploadError::Escapes)));
    }
}
