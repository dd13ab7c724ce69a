//! Still and animated image files: PNG (with ComfyUI's `prompt` text chunk), APNG, animated WebP.
//!
//! The `image` crate encodes single PNG frames and lossless single WebP frames; this module
//! re-wraps those frames into the animated containers (`acTL`/`fcTL`/`fdAT` for APNG,
//! `VP8X`/`ANIM`/`ANMF` for WebP) so the files are real, decodable animations.

use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};

/// Why a file could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum AnimError {
    /// the image encoder failed
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// the encoder output did not have the expected structure
    #[error("unexpected encoder output: {0}")]
    Format(&'static str),
    /// no frames
    #[error("no frames to encode")]
    Empty,
}

fn crc_table() -> &'static [u32; 256] {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (n, slot) in table.iter_mut().enumerate() {
            let mut c = n as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *slot = c;
        }
        table
    })
}

/// CRC-32 (ISO-HDLC), as PNG chunks use it.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    let table = crc_table();
    let mut c = 0xffff_ffffu32;
    for part in parts {
        for &b in *part {
            c = table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
    }
    c ^ 0xffff_ffff
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
}

/// Splits a PNG file into `(type, data)` chunks.
/// A PNG chunk: type and data.
type Chunk<'a> = ([u8; 4], &'a [u8]);

fn png_chunks(png: &[u8]) -> Result<Vec<Chunk<'_>>, AnimError> {
    let mut rest = png.get(8..).ok_or(AnimError::Format("short png"))?;
    let mut out = Vec::new();
    while rest.len() >= 12 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = [rest[4], rest[5], rest[6], rest[7]];
        let data = rest.get(8..8 + len).ok_or(AnimError::Format("truncated chunk"))?;
        out.push((kind, data));
        rest = rest.get(12 + len..).ok_or(AnimError::Format("truncated chunk"))?;
    }
    Ok(out)
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// Encodes one RGB image as PNG.
pub fn png(image: &RgbImage, fast: bool) -> Result<Vec<u8>, AnimError> {
    let mut out = Vec::new();
    let compression = if fast { CompressionType::Fast } else { CompressionType::Default };
    PngEncoder::new_with_quality(&mut out, compression, PngFilter::Adaptive).write_image(
        image.as_raw(),
        image.width(),
        image.height(),
        ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

/// Encodes a PNG with `tEXt` chunks after the header, as ComfyUI stores `prompt`/`workflow`.
pub fn png_with_text(image: &RgbImage, texts: &[(&str, String)]) -> Result<Vec<u8>, AnimError> {
    let plain = png(image, false)?;
    let chunks = png_chunks(&plain)?;
    let mut out = PNG_SIGNATURE.to_vec();
    for (kind, data) in chunks {
        png_chunk(&mut out, &kind, data);
        if &kind == b"IHDR" {
            for (key, value) in texts {
                // tEXt is Latin-1; non-Latin-1 characters are escaped so the chunk stays valid.
                let mut body: Vec<u8> = key.bytes().filter(|b| *b != 0).take(79).collect();
                body.push(0);
                for ch in value.chars() {
                    if (ch as u32) < 256 {
                        body.push(ch as u32 as u8);
                    } else {
                        body.extend_from_slice(format!("\\u{:04x}", ch as u32).as_bytes());
                    }
                }
                png_chunk(&mut out, b"tEXt", &body);
            }
        }
    }
    Ok(out)
}

/// Builds an animated PNG from `count` frames of one size (rendered one at a time by
/// `frame_at`), `fps` frames per second, looping forever.
pub fn apng(count: usize, mut frame_at: impl FnMut(usize) -> RgbImage, fps: f64) -> Result<Vec<u8>, AnimError> {
    if count == 0 {
        return Err(AnimError::Empty);
    }
    let (num, den) = frame_delay(fps);
    let mut out = PNG_SIGNATURE.to_vec();
    let mut seq = 0u32;
    let mut size = None;
    for index in 0..count {
        let frame = frame_at(index);
        let (w, h) = *size.get_or_insert(frame.dimensions());
        if frame.dimensions() != (w, h) {
            return Err(AnimError::Format("frames differ in size"));
        }
        let encoded = png(&frame, true)?;
        let chunks = png_chunks(&encoded)?;
        if index == 0 {
            let ihdr = chunks.iter().find(|(k, _)| k == b"IHDR").ok_or(AnimError::Format("no IHDR"))?;
            png_chunk(&mut out, b"IHDR", ihdr.1);
            let mut actl = Vec::new();
            actl.extend_from_slice(&(count as u32).to_be_bytes());
            actl.extend_from_slice(&0u32.to_be_bytes());
            png_chunk(&mut out, b"acTL", &actl);
        }
        let mut fctl = Vec::with_capacity(26);
        fctl.extend_from_slice(&seq.to_be_bytes());
        seq += 1;
        for v in [w, h, 0, 0] {
            fctl.extend_from_slice(&v.to_be_bytes());
        }
        fctl.extend_from_slice(&num.to_be_bytes());
        fctl.extend_from_slice(&den.to_be_bytes());
        fctl.extend_from_slice(&[0, 0]); // dispose none, blend source
        png_chunk(&mut out, b"fcTL", &fctl);
        for (kind, data) in chunks.iter().filter(|(k, _)| k == b"IDAT") {
            if index == 0 {
                png_chunk(&mut out, kind, data);
            } else {
                let mut fdat = Vec::with_capacity(data.len() + 4);
                fdat.extend_from_slice(&seq.to_be_bytes());
                seq += 1;
                fdat.extend_from_slice(data);
                png_chunk(&mut out, b"fdAT", &fdat);
            }
        }
    }
    png_chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

/// Frame delay as a fraction of seconds (`delay_num / delay_den`).
fn frame_delay(fps: f64) -> (u16, u16) {
    let fps = if fps.is_finite() && fps > 0.0 { fps } else { 6.0 };
    let ms = (1000.0 / fps).round().clamp(1.0, 65_535.0) as u16;
    (ms, 1000)
}

fn riff_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(kind);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    if data.len() % 2 == 1 {
        out.push(0);
    }
}

fn le24(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes()[..3]);
}

/// Extracts the `VP8L` chunk payload from a simple lossless WebP file.
fn vp8l_payload(webp: &[u8]) -> Result<&[u8], AnimError> {
    if webp.get(0..4) != Some(b"RIFF") || webp.get(8..12) != Some(b"WEBP") {
        return Err(AnimError::Format("not a webp"));
    }
    let mut rest = &webp[12..];
    while rest.len() >= 8 {
        let kind = &rest[0..4];
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let data = rest.get(8..8 + len).ok_or(AnimError::Format("truncated webp chunk"))?;
        if kind == b"VP8L" {
            return Ok(data);
        }
        rest = rest.get(8 + len + (len % 2)..).unwrap_or(&[]);
    }
    Err(AnimError::Format("no VP8L chunk"))
}

/// Builds an animated (lossless) WebP from `count` frames of one size (rendered one at a time
/// by `frame_at`), looping forever.
pub fn animated_webp(
    count: usize,
    mut frame_at: impl FnMut(usize) -> RgbImage,
    fps: f64,
) -> Result<Vec<u8>, AnimError> {
    if count == 0 {
        return Err(AnimError::Empty);
    }
    let first = frame_at(0);
    let (w, h) = first.dimensions();
    let duration = u32::from(frame_delay(fps).0);
    let mut body = b"WEBP".to_vec();
    let mut vp8x = vec![0x02, 0, 0, 0]; // animation flag
    le24(&mut vp8x, w - 1);
    le24(&mut vp8x, h - 1);
    riff_chunk(&mut body, b"VP8X", &vp8x);
    riff_chunk(&mut body, b"ANIM", &[0, 0, 0, 0, 0, 0]); // background colour, loop forever
    let mut next = Some(first);
    for index in 0..count {
        let frame = next.take().unwrap_or_else(|| frame_at(index));
        if frame.dimensions() != (w, h) {
            return Err(AnimError::Format("frames differ in size"));
        }
        let mut encoded = Vec::new();
        WebPEncoder::new_lossless(&mut encoded).encode(frame.as_raw(), w, h, ExtendedColorType::Rgb8)?;
        let vp8l = vp8l_payload(&encoded)?;
        let mut anmf = Vec::with_capacity(vp8l.len() + 32);
        le24(&mut anmf, 0);
        le24(&mut anmf, 0);
        le24(&mut anmf, w - 1);
        le24(&mut anmf, h - 1);
        le24(&mut anmf, duration);
        anmf.push(0x02); // do not blend, no disposal
        riff_chunk(&mut anmf, b"VP8L", vp8l);
        riff_chunk(&mut body, b"ANMF", &anmf);
    }
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::AnimationDecoder;
    use std::io::Cursor;

    fn frames() -> Vec<RgbImage> {
        (0..3u8).map(|i| RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, i * 80]))).collect()
    }

    #[test]
    fn crc_matches_known_value() {
        assert_eq!(crc32(&[b"IEND"]), 0xae42_6082);
    }

    #[test]
    fn apng_decodes_as_animation() {
        let f = frames();
        let bytes = apng(f.len(), |i| f[i].clone(), 8.0).expect("apng");
        let decoder = image::codecs::png::PngDecoder::new(Cursor::new(&bytes)).expect("png");
        assert!(decoder.is_apng().expect("apng check"));
        let decoded = decoder.apng().expect("apng").into_frames().collect_frames().expect("frames");
        assert_eq!(decoded.len(), 3);
        assert_eq!(decoded[2].buffer().get_pixel(3, 2).0[2], 160);
    }

    #[test]
    fn animated_webp_decodes_as_animation() {
        let f = frames();
        let bytes = animated_webp(f.len(), |i| f[i].clone(), 8.0).expect("webp");
        let decoder = image::codecs::webp::WebPDecoder::new(Cursor::new(&bytes)).expect("webp");
        assert!(decoder.has_animation());
        let decoded = decoder.into_frames().collect_frames().expect("frames");
        assert_eq!(decoded.len(), 3);
        assert_eq!(decoded[1].buffer().get_pixel(3, 2).0[..3], [30, 40, 80]);
    }

    #[test]
    fn png_text_chunk_is_readable() {
        let bytes = png_with_text(&frames()[0], &[("prompt", "{\"1\": 2}".to_string())]).expect("png");
        let chunks = png_chunks(&bytes).expect("chunks");
        assert!(chunks.iter().any(|(k, d)| k == b"tEXt" && d.starts_with(b"prompt\0")));
        image::load_from_memory(&bytes).expect("still decodes");
    }
}
