//! Identifier newtypes: parsed once at the edge, then trusted.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A job's id: a UUID, written lowercase and hyphenated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid)]
pub struct JobId(uuid::Uuid);

impl JobId {
    /// A fresh random id.
    pub fn new() -> JobId {
        JobId(uuid::Uuid::new_v4())
    }

    /// Parses an id from a path or a database column; `None` if it is not a UUID.
    pub fn parse(s: &str) -> Option<JobId> {
        uuid::Uuid::try_parse(s).ok().map(JobId)
    }
}

impl Default for JobId {
    fn default() -> Self {
        JobId::new()
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The secret that proves a worker holds the current lease on a job. Each lease gets a new one, so a
/// worker whose lease expired cannot finish a job that was handed to someone else.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String)]
pub struct LeaseToken(String);

impl LeaseToken {
    /// A fresh random token.
    pub fn new() -> LeaseToken {
        LeaseToken(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Wraps a token received from a worker or read from the store.
    pub fn from_string(s: String) -> LeaseToken {
        LeaseToken(s)
    }

    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for LeaseToken {
    fn default() -> Self {
        LeaseToken::new()
    }
}

// Tokens are secrets: keep them out of logs.
impl std::fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseToken(..)")
    }
}
