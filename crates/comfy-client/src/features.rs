//! What one ComfyUI server can do, found out by asking it (never from its version string):
//! [`ServerFeatures`], and the per-prompt preview setting [`PreviewMethod`].
//!
//! | mechanism | detected by | fallback |
//! |---|---|---|
//! | jobs API (C1) | `GET /api/jobs?limit=1` → a job list (404/405/not a list: absent) | `/history/{id}` + `GET /queue` |
//! | job lookup (C1) | the jobs API being present | `/history/{id}` + `GET /queue` |
//! | atomic cancel (C3) | the jobs API being present, then the first `POST /api/jobs/{id}/cancel` (404/405: absent, remembered) | `POST /queue {delete}` + `POST /interrupt {prompt_id}` |
//! | preview metadata, upload limit (C8) | the WebSocket `feature_flags` reply, or `GET /features` | no type-4 previews; no size check before the upload |
//!
//! Everything is forgotten when the event socket reconnects (the server may have been upgraded
//! or replaced meanwhile) and asked again.

use serde::Serialize;
use serde_json::Value;

/// What a ComfyUI server showed it supports, for the current connection.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ServerFeatures {
    /// `GET /api/jobs` and `GET /api/jobs/{id}` exist (C1); `None` until asked.
    pub jobs_api: Option<bool>,
    /// `POST /api/jobs/{id}/cancel` exists (C3); `None` until the first cancel found out.
    pub jobs_cancel: Option<bool>,
    /// The server sends type-4 previews with node and prompt ids (C8/C9), when it said so.
    pub supports_preview_metadata: Option<bool>,
    /// Largest request body the server accepts (`--max-upload-size`, C8), when it said so.
    pub max_upload_size: Option<u64>,
    /// The event-socket connection (hub generation) these were found for; 0 before any.
    pub connection: u64,
}

impl ServerFeatures {
    /// Reads `supports_preview_metadata` and `max_upload_size` from a `feature_flags` reply or a
    /// `GET /features` body, leaving what the body does not mention as it was.
    pub(crate) fn apply_flags(&mut self, flags: &serde_json::Map<String, Value>) {
        if let Some(flag) = flags.get("supports_preview_metadata").and_then(Value::as_bool) {
            self.supports_preview_metadata = Some(flag);
        }
        // ComfyUI sends an int; a float from an odd server still counts.
        let limit = flags.get("max_upload_size").and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)));
        if let Some(limit) = limit.filter(|l| *l > 0) {
            self.max_upload_size = Some(limit);
        }
    }

    /// One line for logs: `jobs API yes, jobs cancel unknown, preview metadata yes, upload limit 104857600 B`.
    pub fn summary(&self) -> String {
        let yes_no = |v: Option<bool>| match v {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        };
        let limit = self.max_upload_size.map_or_else(|| "unknown".to_owned(), |l| format!("{l} B"));
        format!(
            "jobs API {}, jobs cancel {}, preview metadata {}, upload limit {limit}",
            yes_no(self.jobs_api),
            yes_no(self.jobs_cancel),
            yes_no(self.supports_preview_metadata)
        )
    }
}

/// How ComfyUI renders sampler previews for one prompt (`extra_data.preview_method`, C5).
///
/// Newer ComfyUI resets the method on every prompt to its command-line default when a prompt does
/// not name one, so it is sent with every prompt: `none` saves GPU time when nobody watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PreviewMethod {
    /// No previews.
    #[default]
    None,
    /// The server picks (TAESD when installed, else latent2rgb).
    Auto,
    /// Cheap colour approximation from the latent.
    Latent2rgb,
    /// TAESD decoder (better, costs some VRAM).
    Taesd,
}

impl PreviewMethod {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Auto => "auto",
            Self::Latent2rgb => "latent2rgb",
            Self::Taesd => "taesd",
        }
    }
}

impl std::fmt::Display for PreviewMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PreviewMethod {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Self::None),
            "auto" => Ok(Self::Auto),
            "latent2rgb" => Ok(Self::Latent2rgb),
            "taesd" => Ok(Self::Taesd),
            other => Err(format!("unknown preview method {other:?}: expected none, auto, latent2rgb or taesd")),
        }
    }
}
