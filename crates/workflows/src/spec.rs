//! Parameter value specs: the public `ParamType`, the built-in table of known node inputs
//! (types, ranges, steps, descriptions, taken from ComfyUI 0.3.64 `/object_info` plus product
//! rules such as LTXV's 8k+1 frame count), type inference from graph literals, and value checking.

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use crate::error::BindError;
use crate::graph::json_kind;

/// The type of a bindable parameter, as served by `GET /workflows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// The uploaded input frame (a ComfyUI input file name such as `td/frame.png`).
    Image,
    /// Free text.
    String,
    /// A whole number (JSON integer; seeds use the full `u64` range).
    Integer,
    /// Any JSON number.
    Number,
    /// `true` or `false`.
    Boolean,
}

impl ParamType {
    /// "an integer", "a string", ... for error messages.
    pub fn with_article(self) -> &'static str {
        match self {
            ParamType::Image => "an image file name",
            ParamType::String => "a string",
            ParamType::Integer => "an integer",
            ParamType::Number => "a number",
            ParamType::Boolean => "a boolean",
        }
    }
}

impl std::fmt::Display for ParamType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParamType::Image => "image",
            ParamType::String => "string",
            ParamType::Integer => "integer",
            ParamType::Number => "number",
            ParamType::Boolean => "boolean",
        })
    }
}

/// A numeric limit. Integers are kept as `i128` so the whole `u64` seed range and negative
/// `i64` values compare exactly; floats stay floats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Limit {
    Int(i128),
    Float(f64),
}

impl Limit {
    fn as_f64(self) -> f64 {
        match self {
            // Precision loss only matters near 2^53, far beyond any float input's range.
            Limit::Int(i) => i as f64,
            Limit::Float(f) => f,
        }
    }

    pub fn to_number(self) -> Option<Number> {
        match self {
            Limit::Int(i) => int_number(i),
            Limit::Float(f) => Number::from_f64(f),
        }
    }
}

/// Type and constraints of a parameter (or of one node input).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ValueSpec {
    pub ty: ParamType,
    pub min: Option<Limit>,
    pub max: Option<Limit>,
    /// Allowed values are `min + k·step` (so `min 9, step 8` means 8k+1, `min 64, step 32`
    /// means multiples of 32).
    pub step: Option<u64>,
    pub description: Option<&'static str>,
}

impl ValueSpec {
    const fn of(ty: ParamType) -> ValueSpec {
        ValueSpec { ty, min: None, max: None, step: None, description: None }
    }

    const fn int(min: i128, max: i128, step: Option<u64>, description: &'static str) -> ValueSpec {
        ValueSpec {
            ty: ParamType::Integer,
            min: Some(Limit::Int(min)),
            max: Some(Limit::Int(max)),
            step,
            description: Some(description),
        }
    }

    const fn float(min: f64, max: f64, description: &'static str) -> ValueSpec {
        ValueSpec {
            ty: ParamType::Number,
            min: Some(Limit::Float(min)),
            max: Some(Limit::Float(max)),
            step: None,
            description: Some(description),
        }
    }

    /// The spec of a literal with no table entry: its JSON type, no limits. Lists and objects
    /// cannot be parameters.
    pub fn infer(literal: &Value) -> Option<ValueSpec> {
        let ty = match literal {
            Value::String(_) => ParamType::String,
            Value::Bool(_) => ParamType::Boolean,
            Value::Number(n) if n.is_f64() => ParamType::Number,
            Value::Number(_) => ParamType::Integer,
            _ => return None,
        };
        Some(ValueSpec::of(ty))
    }

    /// The spec that satisfies both `self` and `other` (one parameter bound to several inputs):
    /// the tighter range, the larger step; an integer input makes the whole parameter integer.
    pub fn intersect(&self, other: &ValueSpec) -> Option<ValueSpec> {
        let ty = match (self.ty, other.ty) {
            (a, b) if a == b => a,
            (ParamType::Integer, ParamType::Number) | (ParamType::Number, ParamType::Integer) => ParamType::Integer,
            _ => return None,
        };
        let pick = |a: Option<Limit>, b: Option<Limit>, want_larger: bool| match (a, b) {
            (Some(x), Some(y)) => {
                let x_wins = if want_larger { x.as_f64() >= y.as_f64() } else { x.as_f64() <= y.as_f64() };
                Some(if x_wins { x } else { y })
            }
            (x, None) => x,
            (None, y) => y,
        };
        let mut min = pick(self.min, other.min, true);
        let mut max = pick(self.max, other.max, false);
        if ty == ParamType::Integer {
            // Float limits of a number input become integer limits of the integer parameter.
            min = min.map(|l| match l {
                Limit::Float(f) => Limit::Int(f.ceil() as i128),
                l => l,
            });
            max = max.map(|l| match l {
                Limit::Float(f) => Limit::Int(f.floor() as i128),
                l => l,
            });
        }
        Some(ValueSpec {
            ty,
            min,
            max,
            step: self.step.max(other.step),
            description: self.description.or(other.description),
        })
    }

    /// Whether a graph literal can be held by an input of this spec (ignoring ranges).
    pub fn accepts_literal(&self, literal: &Value) -> bool {
        match self.ty {
            ParamType::Image | ParamType::String => literal.is_string(),
            ParamType::Boolean => literal.is_boolean(),
            ParamType::Number => literal.is_number(),
            ParamType::Integer => whole_number(literal).is_some(),
        }
    }

    /// Checks a caller-supplied value for parameter `name` and returns it normalised for the
    /// graph (e.g. `97.0` → `97` for an integer input, because TouchDesigner float pars send that).
    pub fn check(&self, name: &str, value: &Value) -> Result<Value, BindError> {
        let wrong_type = || BindError::WrongType { name: name.to_string(), expected: self.ty, got: json_kind(value) };
        match self.ty {
            ParamType::Image | ParamType::String => {
                value.as_str().ok_or_else(wrong_type)?;
                Ok(value.clone())
            }
            ParamType::Boolean => {
                value.as_bool().ok_or_else(wrong_type)?;
                Ok(value.clone())
            }
            ParamType::Integer => {
                let v = whole_number(value).ok_or_else(wrong_type)?;
                self.check_int(name, v)?;
                int_number(v).map(Value::Number).ok_or_else(wrong_type)
            }
            ParamType::Number => {
                let v = value.as_f64().filter(|f| f.is_finite()).ok_or_else(wrong_type)?;
                self.check_float(name, v, value)?;
                Ok(value.clone())
            }
        }
    }

    fn check_int(&self, name: &str, v: i128) -> Result<(), BindError> {
        let shown = || show_int(v);
        if let Some(min) = self.min
            && match min {
                Limit::Int(m) => v < m,
                Limit::Float(f) => (v as f64) < f,
            }
        {
            return Err(BindError::TooSmall {
                name: name.to_string(),
                value: shown(),
                min: min.to_number().unwrap_or_else(|| Number::from(0)),
            });
        }
        if let Some(max) = self.max
            && match max {
                Limit::Int(m) => v > m,
                Limit::Float(f) => (v as f64) > f,
            }
        {
            return Err(BindError::TooLarge {
                name: name.to_string(),
                value: shown(),
                max: max.to_number().unwrap_or_else(|| Number::from(0)),
            });
        }
        if let Some(step) = self.step.filter(|s| *s > 1) {
            let base = match self.min {
                Some(Limit::Int(m)) => m,
                Some(Limit::Float(f)) => f.ceil() as i128,
                None => 0,
            };
            let step = i128::from(step);
            let offset = (v - base).rem_euclid(step);
            if offset != 0 {
                let below = v - offset;
                let above = below + step;
                return Err(BindError::NotOnStep {
                    name: name.to_string(),
                    value: shown(),
                    base: show_int(base),
                    step: step as u64,
                    below: (below >= base).then(|| show_int(below)),
                    above: show_int(above),
                });
            }
        }
        Ok(())
    }

    fn check_float(&self, name: &str, v: f64, original: &Value) -> Result<(), BindError> {
        let shown = || match original {
            Value::Number(n) => n.clone(),
            _ => Number::from(0),
        };
        if let Some(min) = self.min
            && v < min.as_f64()
        {
            return Err(BindError::TooSmall {
                name: name.to_string(),
                value: shown(),
                min: min.to_number().unwrap_or_else(|| Number::from(0)),
            });
        }
        if let Some(max) = self.max
            && v > max.as_f64()
        {
            return Err(BindError::TooLarge {
                name: name.to_string(),
                value: shown(),
                max: max.to_number().unwrap_or_else(|| Number::from(0)),
            });
        }
        Ok(())
    }
}

/// A JSON number that is a whole number, as `i128`. Integral floats count: ComfyUI itself
/// coerces with `int()`, and TouchDesigner sends float pars as `97.0`.
fn whole_number(v: &Value) -> Option<i128> {
    let n = v.as_number()?;
    if let Some(i) = n.as_i64() {
        return Some(i128::from(i));
    }
    if let Some(u) = n.as_u64() {
        return Some(i128::from(u));
    }
    let f = n.as_f64()?;
    // 1e30 keeps the cast exact-enough and far above any input's max.
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 1e30).then_some(f as i128)
}

/// An `i128` for messages: exact when it fits JSON's integers, approximate beyond.
fn show_int(v: i128) -> Number {
    int_number(v).or_else(|| Number::from_f64(v as f64)).unwrap_or_else(|| Number::from(0))
}

/// An `i128` as a JSON number, if it fits `i64` or `u64` (which is all JSON can carry exactly).
pub(crate) fn int_number(v: i128) -> Option<Number> {
    if let Ok(i) = i64::try_from(v) { Some(Number::from(i)) } else { u64::try_from(v).ok().map(Number::from) }
}

const SEED: ValueSpec = ValueSpec::int(
    0,
    u64::MAX as i128,
    None,
    "Noise seed (0 to 2^64-1); the same seed and inputs reproduce the same result",
);
const LTXV_SIZE: ValueSpec =
    ValueSpec::int(64, 16384, Some(32), "Generated size in pixels (multiple of 32, at least 64)");
const LTXV_LENGTH: ValueSpec = ValueSpec::int(9, 16384, Some(8), "Number of generated frames, 8k+1 (9, 17, ..., 97)");
const EMPTY_LTXV_LENGTH: ValueSpec =
    ValueSpec::int(1, 16384, Some(8), "Number of generated frames, 8k+1 (1, 9, 17, ..., 97)");
const VIDEO_FPS: ValueSpec = ValueSpec::float(1.0, 120.0, "Frames per second of the video");
const COND_FPS: ValueSpec =
    ValueSpec::float(0.01, 1000.0, "Frame rate the model is conditioned on (frames per second, > 0)");
const ANIM_FPS: ValueSpec = ValueSpec::float(0.01, 1000.0, "Frames per second of the animation");
const STEPS: ValueSpec = ValueSpec::int(1, 10000, None, "Number of sampling steps");
const CFG: ValueSpec =
    ValueSpec::float(0.0, 100.0, "Classifier-free guidance scale (how strongly the prompt is followed)");
const SCALE_SIZE: ValueSpec = ValueSpec::int(
    0,
    16384,
    Some(2),
    "Output size in pixels after scaling (even, so H.264 can encode it; 0 keeps the aspect ratio)",
);

/// The built-in table of node inputs whose range or meaning we know better than the literal
/// alone tells. Anything not listed is typed from its literal, without limits.
pub(crate) fn known_input(class_type: &str, input: &str) -> Option<ValueSpec> {
    let spec = match (class_type, input) {
        ("LoadImage", "image") => {
            ValueSpec { description: Some("The uploaded input frame"), ..ValueSpec::of(ParamType::Image) }
        }
        (_, "text") if class_type.starts_with("CLIPTextEncode") => {
            ValueSpec { description: Some("Prompt text"), ..ValueSpec::of(ParamType::String) }
        }
        ("KSampler", "seed")
        | ("KSamplerAdvanced", "noise_seed")
        | ("SamplerCustom", "noise_seed")
        | ("RandomNoise", "noise_seed") => SEED,
        ("LTXVImgToVideo" | "EmptyLTXVLatentVideo", "width" | "height") => LTXV_SIZE,
        ("LTXVImgToVideo", "length") => LTXV_LENGTH,
        ("EmptyLTXVLatentVideo", "length") => EMPTY_LTXV_LENGTH,
        ("LTXVImgToVideo" | "EmptyLTXVLatentVideo", "batch_size") => ValueSpec::int(1, 4096, None, "Batch size"),
        ("LTXVImgToVideo", "strength") => {
            ValueSpec::float(0.0, 1.0, "How strictly the first frame keeps the input image (1.0 = exactly)")
        }
        ("LTXVConditioning", "frame_rate") => COND_FPS,
        ("CreateVideo", "fps") => VIDEO_FPS,
        ("SaveAnimatedWEBP" | "SaveAnimatedPNG" | "SaveWEBM", "fps") => ANIM_FPS,
        ("VHS_VideoCombine", "frame_rate") => ValueSpec {
            min: Some(Limit::Float(1.0)),
            description: Some("Frames per second of the video"),
            ..ValueSpec::of(ParamType::Number)
        },
        ("KSampler" | "KSamplerAdvanced", "steps") => STEPS,
        (
            "BasicScheduler"
            | "LTXVScheduler"
            | "KarrasScheduler"
            | "ExponentialScheduler"
            | "PolyexponentialScheduler"
            | "BetaSamplingScheduler"
            | "SDTurboScheduler",
            "steps",
        ) => STEPS,
        ("KSampler" | "KSamplerAdvanced" | "SamplerCustom" | "CFGGuider", "cfg") => CFG,
        ("LTXVPreprocess", "img_compression") => {
            ValueSpec::int(0, 100, None, "H.264 CRF the input frame is re-encoded with (0 = none)")
        }
        ("ImageScale", "width" | "height") => SCALE_SIZE,
        ("RepeatImageBatch", "amount") => ValueSpec::int(1, 4096, None, "Number of copies"),
        _ => return None,
    };
    Some(spec)
}
