//! IMAGE values: batches of RGB frames, kept lazy.
//!
//! A ComfyUI IMAGE is a `[batch, height, width, 3]` float tensor. Materialising 97 frames of
//! 768×512 would cost ~110 MB per value, so a batch here is a list of cheap frame descriptions:
//! a shared source image plus the per-frame operations still to apply. Operations that are the
//! same for every frame (invert, resize) are applied once to the shared source when possible;
//! frame-dependent ones (the simulated sampler's motion) are applied when a frame is rendered.

use std::collections::HashMap;
use std::sync::Arc;

use image::imageops::FilterType;
use image::{Rgb, RgbImage};

/// How a resize samples the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeFilter {
    /// `nearest-exact`
    Nearest,
    /// `bilinear` (and `area`, which has no exact counterpart here)
    Bilinear,
    /// `bicubic`
    Bicubic,
    /// `lanczos`
    Lanczos,
}

impl ResizeFilter {
    /// Maps ComfyUI's `upscale_method` names.
    pub fn from_method(method: &str) -> Self {
        match method {
            "nearest-exact" => Self::Nearest,
            "bicubic" => Self::Bicubic,
            "lanczos" => Self::Lanczos,
            _ => Self::Bilinear,
        }
    }

    fn filter(self) -> FilterType {
        match self {
            Self::Nearest => FilterType::Nearest,
            Self::Bilinear => FilterType::Triangle,
            Self::Bicubic => FilterType::CatmullRom,
            Self::Lanczos => FilterType::Lanczos3,
        }
    }
}

/// The simulated "generation": a slow zoom and pan plus a colour drift, so a clip visibly moves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Motion {
    /// position in the clip, 0.0 (first frame) ..= 1.0 (last frame)
    pub t: f32,
    /// the sampler seed; it picks the pan direction and colour phase
    pub seed: u64,
}

/// One operation applied to a frame at render time.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameOp {
    /// `1 - x` per channel
    Invert,
    /// resize (optionally centre-cropping to the target aspect first)
    Resize {
        /// target width
        width: u32,
        /// target height
        height: u32,
        /// sampling
        filter: ResizeFilter,
        /// crop the source to the target aspect ratio first
        crop_center: bool,
    },
    /// frame-dependent motion
    Motion(Motion),
}

impl FrameOp {
    fn output_size(&self, w: u32, h: u32) -> (u32, u32) {
        match self {
            FrameOp::Resize { width, height, .. } => (*width, *height),
            _ => (w, h),
        }
    }
}

/// One frame: a shared source plus operations still to apply.
#[derive(Debug, Clone)]
pub struct Frame {
    base: Arc<RgbImage>,
    ops: Arc<Vec<FrameOp>>,
    width: u32,
    height: u32,
}

impl Frame {
    /// A frame that is exactly this image.
    pub fn from_image(image: Arc<RgbImage>) -> Self {
        let (width, height) = image.dimensions();
        Self { base: image, ops: Arc::new(Vec::new()), width, height }
    }

    /// Renders the frame.
    pub fn render(&self) -> RgbImage {
        let mut img: Option<RgbImage> = None;
        for op in self.ops.iter() {
            let src = img.as_ref().unwrap_or(&self.base);
            img = Some(apply(src, op));
        }
        img.unwrap_or_else(|| (*self.base).clone())
    }

    fn with_op(&self, op: FrameOp) -> Self {
        let (width, height) = op.output_size(self.width, self.height);
        let mut ops = (*self.ops).clone();
        ops.push(op);
        Self { base: self.base.clone(), ops: Arc::new(ops), width, height }
    }
}

/// An IMAGE value: a batch of frames of one size.
#[derive(Debug, Clone, Default)]
pub struct ImageBatch {
    frames: Vec<Frame>,
}

impl ImageBatch {
    /// A batch of these frames.
    pub fn new(frames: Vec<Frame>) -> Self {
        Self { frames }
    }

    /// A batch holding one image.
    #[cfg(test)]
    pub fn single(image: RgbImage) -> Self {
        Self { frames: vec![Frame::from_image(Arc::new(image))] }
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// `(width, height)` of the frames.
    pub fn size(&self) -> (u32, u32) {
        self.frames.first().map_or((0, 0), |f| (f.width, f.height))
    }

    /// The frames.
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// Renders frame `i`.
    pub fn render(&self, i: usize) -> Option<RgbImage> {
        self.frames.get(i).map(Frame::render)
    }

    /// Applies an operation to every frame. Frames without pending operations share their
    /// source, so the operation runs once per distinct source instead of once per frame.
    pub fn map(&self, op: FrameOp) -> Self {
        let eager = !matches!(op, FrameOp::Motion(_));
        let mut done: HashMap<*const RgbImage, Arc<RgbImage>> = HashMap::new();
        let frames = self
            .frames
            .iter()
            .map(|f| {
                if eager && f.ops.is_empty() {
                    let key = Arc::as_ptr(&f.base);
                    let out = done.entry(key).or_insert_with(|| Arc::new(apply(&f.base, &op))).clone();
                    Frame::from_image(out)
                } else {
                    f.with_op(op.clone())
                }
            })
            .collect();
        Self { frames }
    }

    /// Applies a frame-dependent operation built from each frame's index.
    pub fn map_indexed(&self, mut op: impl FnMut(usize) -> FrameOp) -> Self {
        Self { frames: self.frames.iter().enumerate().map(|(i, f)| f.with_op(op(i))).collect() }
    }

    /// The batch repeated `amount` times (RepeatImageBatch).
    pub fn repeat(&self, amount: usize) -> Self {
        let mut frames = Vec::with_capacity(self.frames.len() * amount);
        for _ in 0..amount {
            frames.extend(self.frames.iter().cloned());
        }
        Self { frames }
    }

    /// Concatenates batches.
    pub fn concat(parts: Vec<ImageBatch>) -> Self {
        Self { frames: parts.into_iter().flat_map(|b| b.frames).collect() }
    }
}

fn apply(src: &RgbImage, op: &FrameOp) -> RgbImage {
    match op {
        FrameOp::Invert => {
            let mut out = src.clone();
            for p in out.iter_mut() {
                *p = 255 - *p;
            }
            out
        }
        FrameOp::Resize { width, height, filter, crop_center } => resize(src, *width, *height, *filter, *crop_center),
        FrameOp::Motion(m) => apply_motion(src, *m),
    }
}

/// ComfyUI's `common_upscale`: optional centre crop to the target aspect, then resize.
pub fn resize(src: &RgbImage, width: u32, height: u32, filter: ResizeFilter, crop_center: bool) -> RgbImage {
    let (w, h) = src.dimensions();
    if width == 0 || height == 0 || w == 0 || h == 0 {
        return RgbImage::new(width.max(1), height.max(1));
    }
    if (w, h) == (width, height) {
        return src.clone();
    }
    if crop_center {
        let old_aspect = f64::from(w) / f64::from(h);
        let new_aspect = f64::from(width) / f64::from(height);
        let (mut x, mut y) = (0u32, 0u32);
        if old_aspect > new_aspect {
            x = ((f64::from(w) - f64::from(w) * (new_aspect / old_aspect)) / 2.0).round() as u32;
        } else if old_aspect < new_aspect {
            y = ((f64::from(h) - f64::from(h) * (old_aspect / new_aspect)) / 2.0).round() as u32;
        }
        let cw = w.saturating_sub(2 * x).max(1);
        let ch = h.saturating_sub(2 * y).max(1);
        let cropped = image::imageops::crop_imm(src, x, y, cw, ch).to_image();
        return image::imageops::resize(&cropped, width, height, filter.filter());
    }
    image::imageops::resize(src, width, height, filter.filter())
}

/// splitmix64: a tiny deterministic mixer for seed-derived parameters.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn unit(seed: u64, salt: u64) -> f32 {
    (mix64(seed ^ salt.wrapping_mul(0x2545_f491_4f6c_dd1d)) >> 40) as f32 / (1u64 << 24) as f32
}

/// Zoom towards a seed-chosen point, pan a little, drift the colour balance and move a soft
/// light across the picture (so even a flat input frame visibly moves).
///
/// Written as plain `while` loops over slices with nearest-neighbour sampling: this crate is not
/// optimised in debug builds, and in that mode built-in slice indexing is the only cheap
/// per-pixel operation (iterators, closures and `image`'s generic resizers cost 5–10× more).
fn apply_motion(src: &RgbImage, m: Motion) -> RgbImage {
    let (w32, h32) = src.dimensions();
    let (w, h) = (w32 as usize, h32 as usize);
    if w < 2 || h < 2 {
        return src.clone();
    }
    let t = m.t.clamp(0.0, 1.0);
    let ease = t * t * (3.0 - 2.0 * t);
    let zoom = 1.0 + 0.18 * ease;
    let angle = unit(m.seed, 1) * std::f32::consts::TAU;
    let pan = 0.06 * ease;
    let cx = w as f32 * (0.5 + pan * angle.cos());
    let cy = h as f32 * (0.5 + pan * angle.sin());
    let stride = w * 3;

    // Byte offset of the source pixel for each output column, and of the source row for each row.
    let axis = |n: usize, centre: f32, scale: usize| -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        let mut i = 0;
        while i < n {
            let s = centre + (i as f32 + 0.5 - n as f32 / 2.0) / zoom;
            out.push((s.max(0.0) as usize).min(n - 1) * scale);
            i += 1;
        }
        out
    };
    let xs = axis(w, cx, 3);
    let ys = axis(h, cy, stride);

    // The light: a separable soft spot travelling across the frame along a seed-chosen path.
    let flip = unit(m.seed, 3) < 0.5;
    let along = if flip { 1.0 - t } else { t };
    let spot_x = w as f32 * (-0.1 + 1.2 * along);
    let spot_y = h as f32 * (0.5 + 0.3 * (std::f32::consts::TAU * (t + unit(m.seed, 4))).sin());
    let bump = |n: usize, centre: f32, radius: f32| -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        let mut i = 0;
        while i < n {
            let d = (i as f32 - centre) / radius;
            out.push((255.0 * (-d * d).exp()) as u32);
            i += 1;
        }
        out
    };
    let bx = bump(w, spot_x, w as f32 * 0.22);
    let by = bump(h, spot_y, h as f32 * 0.3);

    let phase = unit(m.seed, 2) * std::f32::consts::TAU;
    // Indexed by `value + light` (up to 255 + 90), saturating.
    let lut = |k: f32| -> [u8; 512] {
        let gain = 1.0 + 0.25 * ease * (std::f32::consts::TAU * t + phase + k).sin();
        let mut table = [0u8; 512];
        let mut v = 0;
        while v < 512 {
            table[v] = (v as f32 * gain).clamp(0.0, 255.0) as u8;
            v += 1;
        }
        table
    };
    let (lr, lg, lb) = (lut(0.0), lut(2.094), lut(4.189));

    let data: &[u8] = src.as_raw();
    let mut out = vec![0u8; data.len()];
    let dst: &mut [u8] = &mut out;
    let (xs, ys, bx, by): (&[usize], &[usize], &[u32], &[u32]) = (&xs, &ys, &bx, &by);
    let mut y = 0;
    while y < h {
        let srow = ys[y];
        let drow = y * stride;
        let light_row = by[y] * 90;
        let mut x = 0;
        while x < w {
            let s = srow + xs[x];
            let d = drow + x * 3;
            let light = ((bx[x] * light_row) >> 16) as usize;
            dst[d] = lr[data[s] as usize + light];
            dst[d + 1] = lg[data[s + 1] as usize + light];
            dst[d + 2] = lb[data[s + 2] as usize + light];
            x += 1;
        }
        y += 1;
    }
    RgbImage::from_raw(w32, h32, out).unwrap_or_else(|| src.clone())
}

/// A colourful procedural image, used when a latent has no source picture (EmptyLTXVLatentVideo).
pub fn procedural(width: u32, height: u32, seed: u64) -> RgbImage {
    let hue = unit(seed, 3);
    let (w, h) = (width.max(1) as f32, height.max(1) as f32);
    RgbImage::from_fn(width.max(1), height.max(1), |x, y| {
        let fx = x as f32 / w;
        let fy = y as f32 / h;
        let ring = ((fx - 0.5).hypot(fy - 0.5) * 18.0).sin() * 0.5 + 0.5;
        let r = 0.5 + 0.5 * (std::f32::consts::TAU * (fx + hue)).sin();
        let g = 0.5 + 0.5 * (std::f32::consts::TAU * (fy + hue * 0.7)).sin();
        let b = ring;
        Rgb([(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_ops_are_shared_and_motion_differs_per_frame() {
        let batch = ImageBatch::single(procedural(64, 48, 7)).repeat(5);
        let inverted = batch.map(FrameOp::Invert);
        assert!(Arc::ptr_eq(&inverted.frames()[0].base, &inverted.frames()[4].base));
        let moving = inverted.map_indexed(|i| FrameOp::Motion(Motion { t: i as f32 / 4.0, seed: 1 }));
        let first = moving.render(0).expect("frame");
        let last = moving.render(4).expect("frame");
        assert_eq!(first.dimensions(), (64, 48));
        assert_ne!(first.as_raw(), last.as_raw());
        let resized =
            moving.map(FrameOp::Resize { width: 32, height: 32, filter: ResizeFilter::Bilinear, crop_center: true });
        assert_eq!(resized.size(), (32, 32));
        assert_eq!(resized.render(2).expect("frame").dimensions(), (32, 32));
    }
}
