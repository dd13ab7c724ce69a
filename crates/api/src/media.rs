//! The one table of media types the product handles: file extension ↔ MIME type.

const TABLE: &[(&str, &str)] = &[
    ("mp4", "video/mp4"),
    ("webm", "video/webm"),
    ("mov", "video/quicktime"),
    ("gif", "image/gif"),
    ("webp", "image/webp"),
    ("png", "image/png"),
    ("jpg", "image/jpeg"),
    ("jpeg", "image/jpeg"),
];

/// The MIME type for a file extension (case-insensitive, without the dot);
/// `application/octet-stream` when unknown.
pub fn mime_for_extension(ext: &str) -> &'static str {
    TABLE.iter().find(|(e, _)| e.eq_ignore_ascii_case(ext)).map_or("application/octet-stream", |(_, m)| m)
}

/// `mime` as the table spells it (case and parameters ignored), or `application/octet-stream` for
/// a type the table does not hold: a result served as `text/html` could run script in a browser.
pub fn known_mime(mime: &str) -> &'static str {
    let bare = mime.split(';').next().unwrap_or_default().trim();
    TABLE.iter().find(|(_, m)| m.eq_ignore_ascii_case(bare)).map_or("application/octet-stream", |(_, m)| m)
}

/// The file extension for a MIME type; `bin` when unknown.
pub fn extension_for_mime(mime: &str) -> &'static str {
    TABLE.iter().find(|(_, m)| *m == mime).map_or("bin", |(e, _)| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for ext in ["mp4", "webm", "gif", "webp", "png", "jpg"] {
            assert_eq!(extension_for_mime(mime_for_extension(ext)), ext);
        }
        assert_eq!(mime_for_extension("JPEG"), "image/jpeg");
        assert_eq!(mime_for_extension("xyz"), "application/octet-stream");
        assert_eq!(extension_for_mime("text/plain"), "bin");
        assert_eq!(known_mime("Video/MP4; codecs=avc1"), "video/mp4");
        assert_eq!(known_mime("text/html"), "application/octet-stream");
    }
}
