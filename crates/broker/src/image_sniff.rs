//! Recognises PNG, JPEG and WebP by their bytes and reads their dimensions from the header alone.
//!
//! Whatever Content-Type a client claims, the broker trusts only these bytes. No pixel is decoded:
//! an image whose header claims absurd dimensions is refused before anything allocates for it.

/// A recognised image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// PNG.
    Png,
    /// JPEG (baseline or progressive).
    Jpeg,
    /// WebP (lossy, lossless or extended).
    Webp,
}

impl ImageFormat {
    /// The MIME type.
    pub fn mime(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }
}

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Format judged by magic bytes.
    pub format: ImageFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Why the bytes are not a usable image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SniffError {
    /// Not PNG, JPEG or WebP.
    #[error("not a PNG, JPEG or WebP image")]
    Unsupported,
    /// The right magic bytes, but the header is damaged or says 0×0.
    #[error("the image header is damaged")]
    Corrupt,
    /// The dimensions lie beyond the bytes given; retry with more of the file.
    #[error("the header lies beyond the bytes read")]
    NeedMore,
}

/// Reads the format and dimensions from the start of a file.
pub fn sniff(bytes: &[u8]) -> Result<ImageHeader, SniffError> {
    let header = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        png(bytes)?
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        jpeg(bytes)?
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        webp(bytes)?
    } else {
        return Err(SniffError::Unsupported);
    };
    if header.width == 0 || header.height == 0 {
        return Err(SniffError::Corrupt);
    }
    Ok(header)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le24(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 3)?;
    Some(u32::from(s[0]) | u32::from(s[1]) << 8 | u32::from(s[2]) << 16)
}

fn png(b: &[u8]) -> Result<ImageHeader, SniffError> {
    if b.get(12..16) != Some(b"IHDR") {
        return Err(if b.len() < 16 { SniffError::NeedMore } else { SniffError::Corrupt });
    }
    let width = be32(b, 16).ok_or(SniffError::NeedMore)?;
    let height = be32(b, 20).ok_or(SniffError::NeedMore)?;
    Ok(ImageHeader { format: ImageFormat::Png, width, height })
}

fn jpeg(b: &[u8]) -> Result<ImageHeader, SniffError> {
    let mut at = 2;
    loop {
        // Markers may be preceded by any number of 0xFF fill bytes.
        while b.get(at) == Some(&0xFF) && b.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let (Some(&ff), Some(&marker)) = (b.get(at), b.get(at + 1)) else {
            return Err(SniffError::NeedMore);
        };
        if ff != 0xFF {
            return Err(SniffError::Corrupt);
        }
        at += 2;
        match marker {
            // Markers without a length field.
            0x01 | 0xD0..=0xD7 => continue,
            0xD9 | 0xDA => return Err(SniffError::Corrupt),
            // Start-of-frame markers (not DHT C4, JPG C8, DAC CC) carry the dimensions.
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                let height = be16(b, at + 3).ok_or(SniffError::NeedMore)?;
                let width = be16(b, at + 5).ok_or(SniffError::NeedMore)?;
                return Ok(ImageHeader {
                    format: ImageFormat::Jpeg,
                    width: u32::from(width),
                    height: u32::from(height),
                });
            }
            _ => {
                let len = be16(b, at).ok_or(SniffError::NeedMore)?;
                if len < 2 {
                    return Err(SniffError::Corrupt);
                }
                at += usize::from(len);
            }
        }
    }
}

fn webp(b: &[u8]) -> Result<ImageHeader, SniffError> {
    let chunk = b.get(12..16).ok_or(SniffError::NeedMore)?;
    let (width, height) = match chunk {
        b"VP8 " => {
            // Frame tag (3 bytes) then the key-frame start code.
            if b.get(23..26).ok_or(SniffError::NeedMore)? != [0x9D, 0x01, 0x2A] {
                return Err(SniffError::Corrupt);
            }
            let w = le16(b, 26).ok_or(SniffError::NeedMore)? & 0x3FFF;
            let h = le16(b, 28).ok_or(SniffError::NeedMore)? & 0x3FFF;
            (u32::from(w), u32::from(h))
        }
        b"VP8L" => {
            if b.get(20) != Some(&0x2F) {
                return Err(if b.len() <= 20 { SniffError::NeedMore } else { SniffError::Corrupt });
            }
            let bits = u32::from_le_bytes(
                b.get(21..25).ok_or(SniffError::NeedMore)?.try_into().map_err(|_| SniffError::Corrupt)?,
            );
            ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        }
        b"VP8X" => (le24(b, 24).ok_or(SniffError::NeedMore)? + 1, le24(b, 27).ok_or(SniffError::NeedMore)? + 1),
        _ => return Err(SniffError::Corrupt),
    };
    Ok(ImageHeader { format: ImageFormat::Webp, width, height })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&[8, 2, 0, 0, 0]);
        v
    }

    #[test]
    fn png_dimensions() {
        let h = sniff(&png_header(512, 320)).unwrap();
        assert_eq!((h.format, h.width, h.height), (ImageFormat::Png, 512, 320));
        assert_eq!(sniff(&png_header(0, 10)), Err(SniffError::Corrupt));
    }

    #[test]
    fn jpeg_skips_segments_to_sof() {
        let mut v = vec![0xFF, 0xD8];
        v.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x10]);
        v.extend_from_slice(&[0u8; 14]);
        v.extend_from_slice(&[0xFF, 0xC2, 0x00, 0x11, 0x08, 0x01, 0x40, 0x02, 0x00]);
        let h = sniff(&v).unwrap();
        assert_eq!((h.format, h.width, h.height), (ImageFormat::Jpeg, 512, 320));
        assert_eq!(sniff(&v[..10]), Err(SniffError::NeedMore));
    }

    #[test]
    fn webp_variants() {
        let mut lossy = b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0".to_vec();
        lossy.extend_from_slice(&[0, 0, 0, 0x9D, 0x01, 0x2A]);
        lossy.extend_from_slice(&640u16.to_le_bytes());
        lossy.extend_from_slice(&480u16.to_le_bytes());
        assert_eq!(sniff(&lossy).unwrap().width, 640);
        let mut ext = b"RIFF\0\0\0\0WEBPVP8X\0\0\0\0".to_vec();
        ext.extend_from_slice(&[0, 0, 0, 0]);
        ext.extend_from_slice(&[0xFF, 0x1F, 0x00, 0x0F, 0x00, 0x00]);
        let h = sniff(&ext).unwrap();
        assert_eq!((h.width, h.height), (8192, 16));
    }

    #[test]
    fn other_bytes_are_unsupported() {
        assert_eq!(sniff(b"GIF89a...."), Err(SniffError::Unsupported));
        assert_eq!(sniff(b""), Err(SniffError::Unsupported));
    }
}
