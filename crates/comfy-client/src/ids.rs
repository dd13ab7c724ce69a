//! Identifier newtypes shared with ComfyUI: the prompt id we choose for every submission and the
//! client id that routes WebSocket execution events to our socket.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// A ComfyUI prompt id chosen by us: always a canonical lowercase hyphenated UUID.
///
/// Newer ComfyUI (≥ v0.25) rejects anything else with `invalid_prompt_id`, and choosing the id
/// ourselves lets the broker use its job id as the prompt id and reconcile after restarts.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PromptId(String);

impl PromptId {
    /// A fresh random (v4) prompt id.
    pub fn new() -> Self {
        Self(Uuid::new_v4().hyphenated().to_string())
    }

    /// Wraps an existing UUID (for example a job id) as a prompt id.
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid.hyphenated().to_string())
    }

    /// Parses a prompt id; accepts any UUID spelling and normalises it to lowercase hyphenated.
    pub fn parse(text: &str) -> Result<Self, InvalidId> {
        Uuid::parse_str(text.trim()).map(Self::from_uuid).map_err(|_| InvalidId::PromptId(text.to_owned()))
    }

    /// The wire form (lowercase hyphenated UUID).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when a prompt id seen on the wire (any string) names this prompt.
    pub fn matches(&self, wire: &str) -> bool {
        // ComfyUI echoes the id verbatim, so a plain comparison suffices; the case-insensitive
        // fallback only covers proxies or tools that upper-case UUIDs.
        self.0 == wire || self.0.eq_ignore_ascii_case(wire)
    }
}

impl Default for PromptId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for PromptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PromptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PromptId({})", self.0)
    }
}

impl FromStr for PromptId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for PromptId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PromptId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The WebSocket `clientId` / `POST /prompt` `client_id` that routes execution events to us.
///
/// ComfyUI accepts any string; we restrict it to a short, URL-safe token so it can never break
/// the query string or logs.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientId(String);

impl ClientId {
    /// Longest accepted client id.
    pub const MAX_LEN: usize = 128;

    /// A fresh client id of the form `tdcomfy-<32 hex digits>`.
    pub fn new() -> Self {
        Self(format!("tdcomfy-{}", Uuid::new_v4().simple()))
    }

    /// Validates a caller-chosen client id: 1..=128 characters from `[A-Za-z0-9._~-]`.
    pub fn parse(text: &str) -> Result<Self, InvalidId> {
        let ok = !text.is_empty()
            && text.len() <= Self::MAX_LEN
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'));
        if ok { Ok(Self(text.to_owned())) } else { Err(InvalidId::ClientId(text.to_owned())) }
    }

    /// The wire form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ClientId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientId({})", self.0)
    }
}

impl FromStr for ClientId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A string that is not a valid [`PromptId`] or [`ClientId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    /// Not a UUID.
    #[error("prompt id {0:?} is not a UUID")]
    PromptId(String),
    /// Empty, too long, or contains characters outside `[A-Za-z0-9._~-]`.
    #[error("client id {0:?} must be 1-128 characters from [A-Za-z0-9._~-]")]
    ClientId(String),
}
