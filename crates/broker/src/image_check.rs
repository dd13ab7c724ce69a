//! Walks an image's container to its end without decoding a pixel: PNG chunks with their CRCs up
//! to `IEND`, JPEG segments and entropy-coded scans up to `EOI`, WebP's RIFF chunk sizes.
//!
//! A frame cut off mid-write (TouchDesigner saving while the script already sends it, a copy that
//! ran out of disk) has a perfect header, so [`crate::image_sniff`] accepts it; ComfyUI would fail
//! it minutes later inside `LoadImage`. This check refuses it at submit, where the client can
//! still send the frame again. It reads the staged file once, sequentially, through a buffer.

use std::io::{self, BufReader, Read};
use std::path::Path;

use crate::image_sniff::ImageFormat;

/// Why an image's container does not hold together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerError {
    /// The file ends before the container does.
    #[error("the {0} file is truncated (it ends before its last {1})")]
    Truncated(&'static str, &'static str),
    /// A structure inside is wrong.
    #[error("the {0} file is corrupt: {1}")]
    Corrupt(&'static str, String),
    /// The staged file could not be read (a broker fault, not the client's).
    #[error("could not read the staged image: {0}")]
    Io(String),
}

/// Checks the whole file at `path` as `format`. Blocking: run it on the blocking pool.
pub fn check_container(path: &Path, format: ImageFormat) -> Result<(), ContainerError> {
    let file = std::fs::File::open(path).map_err(|e| ContainerError::Io(e.to_string()))?;
    let mut r = Reader { inner: BufReader::with_capacity(256 * 1024, file) };
    match format {
        ImageFormat::Png => png(&mut r),
        ImageFormat::Jpeg => jpeg(&mut r),
        ImageFormat::Webp => webp(&mut r),
    }
}

struct Reader {
    inner: BufReader<std::fs::File>,
}

/// A read that ran out of bytes, or failed.
enum Short {
    Eof,
    Io(io::Error),
}

impl Reader {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), Short> {
        self.inner
            .read_exact(buf)
            .map_err(|e| if e.kind() == io::ErrorKind::UnexpectedEof { Short::Eof } else { Short::Io(e) })
    }

    fn byte(&mut self) -> Result<u8, Short> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }

    /// Reads `n` bytes, handing each piece to `f` (for a CRC), without holding them all.
    fn stream(&mut self, mut n: u64, mut f: impl FnMut(&[u8])) -> Result<(), Short> {
        let mut buf = [0u8; 64 * 1024];
        while n > 0 {
            let take = n.min(buf.len() as u64) as usize;
            self.exact(&mut buf[..take])?;
            f(&buf[..take]);
            n -= take as u64;
        }
        Ok(())
    }
}

fn short(kind: &'static str, what: &'static str) -> impl Fn(Short) -> ContainerError {
    move |s| match s {
        Short::Eof => ContainerError::Truncated(kind, what),
        Short::Io(e) => ContainerError::Io(e.to_string()),
    }
}

fn png(r: &mut Reader) -> Result<(), ContainerError> {
    let eof = short("PNG", "chunk (IEND)");
    let mut signature = [0u8; 8];
    r.exact(&mut signature).map_err(&eof)?;
    loop {
        let mut head = [0u8; 8];
        r.exact(&mut head).map_err(&eof)?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        // The PNG specification caps chunk lengths at 2^31 - 1.
        if len > 0x7FFF_FFFF {
            return Err(ContainerError::Corrupt("PNG", format!("a chunk claims {len} bytes")));
        }
        let kind = [head[4], head[5], head[6], head[7]];
        if !kind.iter().all(u8::is_ascii_alphabetic) {
            return Err(ContainerError::Corrupt("PNG", "a chunk type is not four letters".into()));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&kind);
        r.stream(u64::from(len), |piece| crc.update(piece)).map_err(&eof)?;
        let mut stored = [0u8; 4];
        r.exact(&mut stored).map_err(&eof)?;
        if crc.finalize() != u32::from_be_bytes(stored) {
            let name = String::from_utf8_lossy(&kind).into_owned();
            return Err(ContainerError::Corrupt("PNG", format!("the CRC of chunk {name} does not match its bytes")));
        }
        if &kind == b"IEND" {
            return Ok(());
        }
    }
}

fn jpeg(r: &mut Reader) -> Result<(), ContainerError> {
    let eof = short("JPEG", "marker (EOI)");
    let mut soi = [0u8; 2];
    r.exact(&mut soi).map_err(&eof)?;
    // The marker read next, when an entropy-coded scan already consumed its 0xFF.
    let mut pending: Option<u8> = None;
    loop {
        let marker = match pending.take() {
            Some(m) => m,
            None => {
                if r.byte().map_err(&eof)? != 0xFF {
                    return Err(ContainerError::Corrupt("JPEG", "a segment does not start with a marker".into()));
                }
                let mut m = r.byte().map_err(&eof)?;
                while m == 0xFF {
                    m = r.byte().map_err(&eof)?; // fill bytes before a marker
                }
                m
            }
        };
        match marker {
            0xD9 => return Ok(()),          // EOI
            0x01 | 0xD0..=0xD7 => continue, // TEM, RSTn: no length
            0x00 => return Err(ContainerError::Corrupt("JPEG", "a stray 0xFF00 outside a scan".into())),
            _ => {}
        }
        let mut len = [0u8; 2];
        r.exact(&mut len).map_err(&eof)?;
        let len = u16::from_be_bytes(len);
        if len < 2 {
            return Err(ContainerError::Corrupt("JPEG", format!("segment 0x{marker:02X} claims {len} bytes")));
        }
        r.stream(u64::from(len - 2), |_| {}).map_err(&eof)?;
        if marker == 0xDA {
            // SOS: entropy-coded data follows, up to the next marker that is not a stuffed byte
            // (0xFF00) or a restart marker.
            loop {
                if r.byte().map_err(&eof)? != 0xFF {
                    continue;
                }
                let mut next = r.byte().map_err(&eof)?;
                while next == 0xFF {
                    next = r.byte().map_err(&eof)?;
                }
                if next != 0x00 && !(0xD0..=0xD7).contains(&next) {
                    pending = Some(next);
                    break;
                }
            }
        }
    }
}

fn webp(r: &mut Reader) -> Result<(), ContainerError> {
    let eof = short("WebP", "RIFF chunk");
    let mut head = [0u8; 12];
    r.exact(&mut head).map_err(&eof)?;
    let riff = u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
    if riff < 4 + 8 {
        return Err(ContainerError::Corrupt("WebP", format!("the RIFF size {riff} is too small")));
    }
    // `riff` counts from byte 8: the "WEBP" tag, then chunks, each padded to an even size.
    let mut left = riff - 4;
    while left > 0 {
        if left < 8 {
            return Err(ContainerError::Corrupt("WebP", "a chunk header crosses the RIFF end".into()));
        }
        let mut chunk = [0u8; 8];
        r.exact(&mut chunk).map_err(&eof)?;
        let size = u64::from(u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]));
        let padded = size + (size & 1);
        if 8 + padded > left {
            return Err(ContainerError::Corrupt("WebP", format!("a chunk of {size} bytes crosses the RIFF end")));
        }
        r.stream(padded, |_| {}).map_err(&eof)?;
        left -= 8 + padded;
    }
    Ok(())
}
