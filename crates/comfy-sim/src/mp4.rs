//! A minimal MP4 (ISO BMFF) writer and reader for one H.264 video track.
//!
//! Writes a "fast start" file — `ftyp`, `moov` (with the complete sample tables), then `mdat` — so
//! players and `/view` range requests can start before the whole file is read. All samples live in
//! one chunk. The reader understands exactly what the writer produces (and ordinary single-track
//! H.264 files): it is used by [`video_info`] and to check files in tests.

use std::io;
use std::path::Path;

use crate::h264::EncodedVideo;

/// Basic facts about an MP4 video track.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoInfo {
    /// frame width in pixels
    pub width: u32,
    /// frame height in pixels
    pub height: u32,
    /// number of samples (frames)
    pub frames: u32,
    /// frames per second (media timescale / sample duration)
    pub fps: f64,
}

fn bx(kind: &[u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&((payload.len() + 8) as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(payload);
    out
}

fn full_box(kind: &[u8; 4], version: u8, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + 4);
    body.extend_from_slice(&((u32::from(version) << 24) | (flags & 0x00ff_ffff)).to_be_bytes());
    body.extend_from_slice(payload);
    bx(kind, &body)
}

fn container(kind: &[u8; 4], children: &[Vec<u8>]) -> Vec<u8> {
    bx(kind, &children.concat())
}

struct W(Vec<u8>);

impl W {
    fn new() -> Self {
        W(Vec::new())
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    fn matrix(&mut self) -> &mut Self {
        for v in [0x0001_0000u32, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000] {
            self.u32(v);
        }
        self
    }
    fn done(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

fn avcc(video: &EncodedVideo) -> Vec<u8> {
    let sps = &video.sps;
    let mut w = W::new();
    w.u8(1).u8(sps[1]).u8(sps[2]).u8(sps[3]).u8(0xff); // lengthSizeMinusOne = 3
    w.u8(0xe1).u16(sps.len() as u16).bytes(sps);
    w.u8(1).u16(video.pps.len() as u16).bytes(&video.pps);
    if matches!(sps[1], 100 | 110 | 122 | 144) {
        // High profiles carry chroma format and bit depths (4:2:0, 8 bit) and no SPS extensions.
        w.u8(0xfc | 1).u8(0xf8).u8(0xf8).u8(0);
    }
    bx(b"avcC", &w.done())
}

/// Timescale and per-sample duration for a frame rate, exact for common rates (25, 23.976…).
fn timing(fps: f64) -> (u32, u32) {
    let fps = if fps.is_finite() && fps > 0.0 { fps } else { 24.0 };
    let timescale = (fps * 1000.0).round().clamp(1.0, f64::from(u32::MAX)) as u32;
    (timescale, 1000)
}

fn moov(video: &EncodedVideo, fps: f64, chunk_offset: u32) -> Vec<u8> {
    let count = video.samples.len() as u32;
    let (timescale, delta) = timing(fps);
    let media_duration = u64::from(count) * u64::from(delta);
    let movie_duration = (media_duration * 1000 / u64::from(timescale)) as u32;
    let (width, height) = (video.width, video.height);

    let mvhd = full_box(
        b"mvhd",
        0,
        0,
        &W::new()
            .u32(0)
            .u32(0)
            .u32(1000)
            .u32(movie_duration)
            .u32(0x0001_0000)
            .u16(0x0100)
            .zeros(10)
            .matrix()
            .zeros(24)
            .u32(2)
            .done(),
    );
    let tkhd = full_box(
        b"tkhd",
        0,
        3,
        &W::new()
            .u32(0)
            .u32(0)
            .u32(1)
            .u32(0)
            .u32(movie_duration)
            .zeros(8)
            .u16(0)
            .u16(0)
            .u16(0)
            .u16(0)
            .matrix()
            .u32(width << 16)
            .u32(height << 16)
            .done(),
    );
    let mdhd = full_box(
        b"mdhd",
        0,
        0,
        &W::new().u32(0).u32(0).u32(timescale).u32(media_duration as u32).u16(0x55c4).u16(0).done(),
    );
    let hdlr = full_box(b"hdlr", 0, 0, &W::new().u32(0).bytes(b"vide").zeros(12).bytes(b"VideoHandler\0").done());
    let vmhd = full_box(b"vmhd", 0, 1, &W::new().zeros(8).done());
    let dref = full_box(b"dref", 0, 0, &[&1u32.to_be_bytes()[..], &full_box(b"url ", 0, 1, &[])].concat());
    let dinf = container(b"dinf", &[dref]);

    let mut compressor = [0u8; 32];
    let name = b"tdcomfy-sim openh264";
    compressor[0] = name.len() as u8;
    compressor[1..=name.len()].copy_from_slice(name);
    let avc1 = bx(
        b"avc1",
        &W::new()
            .zeros(6)
            .u16(1)
            .u16(0)
            .u16(0)
            .zeros(12)
            .u16(width as u16)
            .u16(height as u16)
            .u32(0x0048_0000)
            .u32(0x0048_0000)
            .u32(0)
            .u16(1)
            .bytes(&compressor)
            .u16(0x0018)
            .u16(0xffff)
            .bytes(&avcc(video))
            .done(),
    );
    let stsd = full_box(b"stsd", 0, 0, &[&1u32.to_be_bytes()[..], &avc1].concat());
    let stts = full_box(b"stts", 0, 0, &W::new().u32(1).u32(count).u32(delta).done());
    let sync: Vec<u32> = video.samples.iter().enumerate().filter(|(_, s)| s.sync).map(|(i, _)| i as u32 + 1).collect();
    let mut stss_body = W::new();
    stss_body.u32(sync.len() as u32);
    for s in &sync {
        stss_body.u32(*s);
    }
    let stss = full_box(b"stss", 0, 0, &stss_body.done());
    let stsc = full_box(b"stsc", 0, 0, &W::new().u32(1).u32(1).u32(count).u32(1).done());
    let mut stsz_body = W::new();
    stsz_body.u32(0).u32(count);
    for s in &video.samples {
        stsz_body.u32(s.data.len() as u32);
    }
    let stsz = full_box(b"stsz", 0, 0, &stsz_body.done());
    let stco = full_box(b"stco", 0, 0, &W::new().u32(1).u32(chunk_offset).done());
    let stbl = container(b"stbl", &[stsd, stts, stss, stsc, stsz, stco]);
    let minf = container(b"minf", &[vmhd, dinf, stbl]);
    let mdia = container(b"mdia", &[mdhd, hdlr, minf]);
    let trak = container(b"trak", &[tkhd, mdia]);
    container(b"moov", &[mvhd, trak])
}

/// Builds a fast-start MP4 holding `video` at `fps` frames per second.
pub fn mux(video: &EncodedVideo, fps: f64) -> io::Result<Vec<u8>> {
    let ftyp = bx(b"ftyp", &W::new().bytes(b"isom").u32(0x200).bytes(b"isomiso2avc1mp41").done());
    // The moov size does not depend on the offset value, so measure it once with a placeholder.
    let moov_len = moov(video, fps, 0).len();
    let mdat_payload: usize = video.samples.iter().map(|s| s.data.len()).sum();
    let offset = ftyp.len() + moov_len + 8;
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "video larger than 4 GiB");
    let offset = u32::try_from(offset).map_err(|_| too_big())?;
    u32::try_from(mdat_payload + 8).map_err(|_| too_big())?;
    let moov = moov(video, fps, offset);
    let mut out = Vec::with_capacity(offset as usize + mdat_payload);
    out.extend_from_slice(&ftyp);
    out.extend_from_slice(&moov);
    out.extend_from_slice(&((mdat_payload + 8) as u32).to_be_bytes());
    out.extend_from_slice(b"mdat");
    for s in &video.samples {
        out.extend_from_slice(&s.data);
    }
    Ok(out)
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Iterates the boxes in `data`: `(type, payload)`.
pub(crate) fn boxes(mut data: &[u8]) -> impl Iterator<Item = io::Result<([u8; 4], &[u8])>> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        if data.len() < 8 {
            data = &[];
            return Some(Err(invalid("truncated box header")));
        }
        let size32 = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as u64;
        let kind = [data[4], data[5], data[6], data[7]];
        let (header, size) = match size32 {
            0 => (8u64, data.len() as u64),
            1 if data.len() >= 16 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[8..16]);
                (16, u64::from_be_bytes(b))
            }
            _ => (8, size32),
        };
        if size < header || size > data.len() as u64 {
            data = &[];
            return Some(Err(invalid("box size out of range")));
        }
        let payload = &data[header as usize..size as usize];
        data = &data[size as usize..];
        Some(Ok((kind, payload)))
    })
}

fn child<'a>(data: &'a [u8], kind: &[u8; 4]) -> io::Result<Option<&'a [u8]>> {
    for item in boxes(data) {
        let (k, payload) = item?;
        if &k == kind {
            return Ok(Some(payload));
        }
    }
    Ok(None)
}

fn be32(data: &[u8], at: usize) -> io::Result<u32> {
    data.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| invalid("field out of range"))
}

fn be16(data: &[u8], at: usize) -> io::Result<u16> {
    data.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]])).ok_or_else(|| invalid("field out of range"))
}

/// Reads width, height, frame count and frame rate of the first video track of an MP4 file.
pub fn parse_info(data: &[u8]) -> io::Result<VideoInfo> {
    let moov = child(data, b"moov")?.ok_or_else(|| invalid("no moov box"))?;
    for item in boxes(moov) {
        let (kind, trak) = item?;
        if &kind != b"trak" {
            continue;
        }
        let Some(mdia) = child(trak, b"mdia")? else {
            continue;
        };
        let Some(hdlr) = child(mdia, b"hdlr")? else {
            continue;
        };
        if hdlr.get(8..12) != Some(b"vide") {
            continue;
        }
        let mdhd = child(mdia, b"mdhd")?.ok_or_else(|| invalid("no mdhd"))?;
        let timescale = if mdhd.first() == Some(&1) { be32(mdhd, 20)? } else { be32(mdhd, 12)? };
        let stbl = child(mdia, b"minf")?
            .map(|minf| child(minf, b"stbl"))
            .transpose()?
            .flatten()
            .ok_or_else(|| invalid("no stbl"))?;
        let stsd = child(stbl, b"stsd")?.ok_or_else(|| invalid("no stsd"))?;
        // stsd: version/flags (4), entry count (4), then the first sample entry box.
        let entry = stsd.get(8..).ok_or_else(|| invalid("empty stsd"))?;
        let (_, sample_entry) = boxes(entry).next().ok_or_else(|| invalid("empty stsd"))??;
        let width = u32::from(be16(sample_entry, 24)?);
        let height = u32::from(be16(sample_entry, 26)?);
        let stsz = child(stbl, b"stsz")?.ok_or_else(|| invalid("no stsz"))?;
        let frames = be32(stsz, 8)?;
        let stts = child(stbl, b"stts")?.ok_or_else(|| invalid("no stts"))?;
        let entries = be32(stts, 4)?;
        let mut total_ticks = 0u64;
        let mut total_samples = 0u64;
        for i in 0..entries as usize {
            let n = be32(stts, 8 + i * 8)?;
            let delta = be32(stts, 12 + i * 8)?;
            total_samples += u64::from(n);
            total_ticks += u64::from(n) * u64::from(delta);
        }
        let fps = if total_ticks == 0 { 0.0 } else { total_samples as f64 * f64::from(timescale) / total_ticks as f64 };
        return Ok(VideoInfo { width, height, frames, fps });
    }
    Err(invalid("no video track"))
}

/// Reads width, height, frame count and frame rate of an MP4 file written by the simulator
/// (or any MP4 with one H.264 video track).
pub fn video_info(path: impl AsRef<Path>) -> io::Result<VideoInfo> {
    let data = std::fs::read(path)?;
    parse_info(&data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h264::EncodedSample;

    #[test]
    fn layout_is_fast_start_and_round_trips() {
        let video = EncodedVideo {
            width: 64,
            height: 32,
            sps: vec![0x67, 0x42, 0xc0, 0x1e, 1, 2],
            pps: vec![0x68, 0xce],
            samples: (0..5).map(|i| EncodedSample { data: vec![0, 0, 0, 2, 0x65, i], sync: i == 0 }).collect(),
        };
        let bytes = mux(&video, 25.0).expect("mux");
        let kinds: Vec<[u8; 4]> = boxes(&bytes).map(|b| b.expect("box").0).collect();
        assert_eq!(kinds, [*b"ftyp", *b"moov", *b"mdat"]);
        let info = parse_info(&bytes).expect("parse");
        assert_eq!(info, VideoInfo { width: 64, height: 32, frames: 5, fps: 25.0 });
    }
}
