//! H.264 encoding with OpenH264 (built from the bundled source, no system codec needed).
//!
//! Owns: RGB → YUV 4:2:0 (BT.601 limited range, signalled in the VUI), running the encoder with
//! frame skipping disabled so every input frame becomes exactly one sample, and turning the
//! Annex-B output into what an MP4 needs: SPS/PPS for `avcC` and 4-byte length-prefixed samples.

use image::RgbImage;
use openh264::encoder::{
    Complexity, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, RateControlMode, UsageType, VuiConfig,
};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::{OpenH264API, Timestamp};

/// Why encoding failed.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// yuv420p needs even dimensions (libx264 refuses odd ones too)
    #[error("width and height must be even for yuv420p, got {width}x{height}")]
    OddDimensions {
        /// frame width
        width: u32,
        /// frame height
        height: u32,
    },
    /// frames of a video must all have one size
    #[error("frame {index} is {got:?}, expected {expected:?}")]
    SizeMismatch {
        /// frame index
        index: usize,
        /// its size
        got: (u32, u32),
        /// the first frame's size
        expected: (u32, u32),
    },
    /// nothing to encode
    #[error("no frames to encode")]
    Empty,
    /// OpenH264 reported an error
    #[error("openh264: {0}")]
    Codec(String),
    /// the encoder produced no SPS/PPS or skipped a frame
    #[error("encoder output unusable: {0}")]
    Bitstream(&'static str),
}

/// One encoded frame.
#[derive(Debug, Clone)]
pub struct EncodedSample {
    /// NAL units, each prefixed with its 4-byte big-endian length (AVCC framing)
    pub data: Vec<u8>,
    /// whether the frame is an IDR (random access point)
    pub sync: bool,
}

/// An encoded H.264 elementary stream, ready for muxing.
#[derive(Debug, Clone)]
pub struct EncodedVideo {
    /// frame width
    pub width: u32,
    /// frame height
    pub height: u32,
    /// sequence parameter set (without start code)
    pub sps: Vec<u8>,
    /// picture parameter set (without start code)
    pub pps: Vec<u8>,
    /// one sample per input frame
    pub samples: Vec<EncodedSample>,
}

/// Splits Annex-B bytes into NAL units without their start codes.
pub fn split_annex_b(stream: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut out = Vec::with_capacity(starts.len());
    for (k, &start) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(stream.len(), |&next| next - 3);
        // A 4-byte start code leaves one extra zero in front of the next marker.
        while end > start && k + 1 < starts.len() && stream[end - 1] == 0 {
            end -= 1;
        }
        if end > start {
            out.push(&stream[start..end]);
        }
    }
    out
}

/// Encodes `count` frames produced by `frame_at` into H.264.
pub fn encode(
    width: u32,
    height: u32,
    fps: f64,
    count: usize,
    mut frame_at: impl FnMut(usize) -> RgbImage,
) -> Result<EncodedVideo, EncodeError> {
    if count == 0 {
        return Err(EncodeError::Empty);
    }
    if !width.is_multiple_of(2) || !height.is_multiple_of(2) || width == 0 || height == 0 {
        return Err(EncodeError::OddDimensions { width, height });
    }
    let fps = if fps.is_finite() && fps > 0.0 { fps } else { 24.0 };
    let keyframe_every = ((fps * 2.0).round() as u32).max(1);
    // Rate control off (constant quantiser): the fastest mode, no frame skipping, and unlike the
    // bitrate modes it does not make OpenH264 print a warning when skipping is disabled.
    let config = EncoderConfig::new()
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .rate_control_mode(RateControlMode::Off)
        .skip_frames(false)
        .usage_type(UsageType::CameraVideoRealTime)
        .complexity(Complexity::Low)
        .scene_change_detect(false)
        .background_detection(false)
        .adaptive_quantization(false)
        .intra_frame_period(IntraFramePeriod::from_num_frames(keyframe_every))
        .num_threads(1)
        .vui(VuiConfig::bt601());
    let mut encoder =
        Encoder::with_api_config(OpenH264API::from_source(), config).map_err(|e| EncodeError::Codec(e.to_string()))?;

    let mut sps: Option<Vec<u8>> = None;
    let mut pps: Option<Vec<u8>> = None;
    let mut samples = Vec::with_capacity(count);
    let mut annex_b = Vec::new();
    let mut yuv = YUVBuffer::new(width as usize, height as usize);
    for index in 0..count {
        let frame = frame_at(index);
        if frame.dimensions() != (width, height) {
            return Err(EncodeError::SizeMismatch { index, got: frame.dimensions(), expected: (width, height) });
        }
        yuv.read_rgb8(RgbSliceU8::new(frame.as_raw(), (width as usize, height as usize)));
        let millis = (index as f64 * 1000.0 / fps) as u64;
        let bitstream =
            encoder.encode_at(&yuv, Timestamp::from_millis(millis)).map_err(|e| EncodeError::Codec(e.to_string()))?;
        annex_b.clear();
        bitstream.write_vec(&mut annex_b);
        let mut data = Vec::with_capacity(annex_b.len() + 16);
        let mut sync = false;
        for nal in split_annex_b(&annex_b) {
            match nal[0] & 0x1f {
                7 => {
                    sps.get_or_insert_with(|| nal.to_vec());
                }
                8 => {
                    pps.get_or_insert_with(|| nal.to_vec());
                }
                nal_type => {
                    sync |= nal_type == 5;
                    data.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    data.extend_from_slice(nal);
                }
            }
        }
        if data.is_empty() {
            return Err(EncodeError::Bitstream("a frame produced no slice data"));
        }
        samples.push(EncodedSample { data, sync });
    }
    let sps = sps.ok_or(EncodeError::Bitstream("no SPS"))?;
    let pps = pps.ok_or(EncodeError::Bitstream("no PPS"))?;
    if sps.len() < 4 {
        return Err(EncodeError::Bitstream("SPS too short"));
    }
    Ok(EncodedVideo { width, height, sps, pps, samples })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_three_and_four_byte_start_codes() {
        let stream = [0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5];
        let nals = split_annex_b(&stream);
        assert_eq!(nals, vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 4, 5][..]]);
    }
}
