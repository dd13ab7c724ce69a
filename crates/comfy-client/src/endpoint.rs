//! Where ComfyUI servers live: a validated base URL per server ([`ComfyEndpoint`]) and the list of
//! servers a worker talks to ([`ComfyEndpoints`]), read from `COMFYUI_URLS` or the one-server
//! shorthand `COMFYUI_HOST` / `COMFYUI_PORT`.

use std::fmt;
use std::str::FromStr;

use reqwest::Url;

use crate::ids::ClientId;

/// Default ComfyUI host when only `COMFYUI_PORT` (or nothing) is configured.
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// Default ComfyUI port (ComfyUI's own default).
pub const DEFAULT_PORT: u16 = 8188;

/// A validated ComfyUI base URL (plain `http`), from which every HTTP route and the `/ws` URL are
/// derived.
///
/// A path prefix is kept (`http://gpu/comfy/` → `http://gpu/comfy/prompt`), so ComfyUI can sit
/// behind a reverse proxy.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ComfyEndpoint {
    base: Url,
}

impl ComfyEndpoint {
    /// Parses `http://host:port[/prefix]`, or `host:port` which is taken as plain http.
    pub fn parse(text: &str) -> Result<Self, EndpointError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(EndpointError::Empty);
        }
        let with_scheme = if trimmed.contains("://") { trimmed.to_owned() } else { format!("http://{trimmed}") };
        let mut url = Url::parse(&with_scheme)
            .map_err(|e| EndpointError::Invalid { input: trimmed.to_owned(), reason: e.to_string() })?;
        let invalid = |reason: &str| EndpointError::Invalid { input: trimmed.to_owned(), reason: reason.to_owned() };
        match url.scheme() {
            "http" => {}
            // reqwest is built without TLS: ComfyUI is reached over plain http on the LAN, and an
            // https URL would otherwise only fail at the first request with an obscure error.
            "https" => {
                return Err(invalid("https is not supported; use http:// on a trusted network"));
            }
            other => return Err(invalid(&format!("scheme {other:?} is not http"))),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("missing host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            // ComfyUI has no auth; credentials in the URL would only end up in logs.
            return Err(invalid("credentials in the URL are not supported"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("query strings and fragments are not allowed"));
        }
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(Self { base: url })
    }

    /// Builds an endpoint from a host name or address and a port.
    pub fn from_host_port(host: &str, port: u16) -> Result<Self, EndpointError> {
        let host = host.trim();
        if host.is_empty() {
            return Err(EndpointError::Empty);
        }
        if port == 0 {
            return Err(EndpointError::InvalidPort(port.to_string()));
        }
        // A bare IPv6 address must be bracketed inside a URL.
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
        Self::parse(&format!("http://{host}:{port}/"))
    }

    /// The base URL, always ending in `/`.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// `host:port` for logs and metrics labels.
    pub fn authority(&self) -> String {
        let host = self.base.host_str().unwrap_or_default();
        match self.base.port_or_known_default() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        }
    }

    /// The URL of an HTTP route such as `prompt` or `history/<id>` (no leading slash needed).
    pub fn http_url(&self, route: &str) -> Url {
        let mut url = self.base.clone();
        let path = format!("{}{}", self.base.path(), route.trim_start_matches('/'));
        url.set_path(&path);
        url
    }

    /// The WebSocket URL `ws://…/ws?clientId=<client_id>`.
    pub fn ws_url(&self, client_id: &ClientId) -> Url {
        let mut url = self.http_url("ws");
        // http → ws is always a valid scheme change for a special scheme; if it ever failed the
        // handshake would report it, so the result can be ignored.
        let _ = url.set_scheme("ws");
        url.query_pairs_mut().append_pair("clientId", client_id.as_str());
        url
    }

    /// [`ComfyEndpoint::ws_url`] with `&token=<token>` when there is one: browsers cannot set
    /// headers on a WebSocket, so token-checking ComfyUI wrappers read it from the query (C19).
    pub fn ws_url_with_token(&self, client_id: &ClientId, token: Option<&str>) -> Url {
        let mut url = self.ws_url(client_id);
        if let Some(token) = token {
            url.query_pairs_mut().append_pair("token", token);
        }
        url
    }
}

impl fmt::Display for ComfyEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.base.as_str())
    }
}

impl fmt::Debug for ComfyEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ComfyEndpoint({})", self.base)
    }
}

impl FromStr for ComfyEndpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The non-empty, duplicate-free list of ComfyUI servers one worker drives.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ComfyEndpoints(Vec<ComfyEndpoint>);

impl ComfyEndpoints {
    /// Environment variable with a comma-separated list of server URLs; wins over host/port.
    pub const URLS_VAR: &'static str = "COMFYUI_URLS";
    /// One-server shorthand: host (default `127.0.0.1`).
    pub const HOST_VAR: &'static str = "COMFYUI_HOST";
    /// One-server shorthand: port (default `8188`).
    pub const PORT_VAR: &'static str = "COMFYUI_PORT";

    /// Builds the list, rejecting an empty list and duplicates.
    pub fn new(endpoints: Vec<ComfyEndpoint>) -> Result<Self, EndpointError> {
        if endpoints.is_empty() {
            return Err(EndpointError::Empty);
        }
        for (i, endpoint) in endpoints.iter().enumerate() {
            if endpoints[..i].contains(endpoint) {
                return Err(EndpointError::Duplicate(endpoint.to_string()));
            }
        }
        Ok(Self(endpoints))
    }

    /// Parses a comma-separated list of URLs (blank entries, e.g. a trailing comma, are skipped).
    pub fn parse_list(text: &str) -> Result<Self, EndpointError> {
        let endpoints = text
            .split(',')
            .filter(|part| !part.trim().is_empty())
            .map(ComfyEndpoint::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(endpoints)
    }

    /// Reads the process environment; see [`ComfyEndpoints::from_lookup`].
    pub fn from_env() -> Result<Self, EndpointError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Resolves the configuration through `lookup` (an environment stand-in):
    /// a non-blank `COMFYUI_URLS` wins; otherwise `COMFYUI_HOST` / `COMFYUI_PORT` describe one
    /// server, each defaulting to ComfyUI's own default `127.0.0.1:8188`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, EndpointError> {
        let non_blank = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        if let Some(urls) = non_blank(Self::URLS_VAR) {
            return Self::parse_list(&urls);
        }
        let host = non_blank(Self::HOST_VAR).unwrap_or_else(|| DEFAULT_HOST.to_owned());
        let port = match non_blank(Self::PORT_VAR) {
            Some(text) => {
                text.trim().parse::<u16>().ok().filter(|port| *port != 0).ok_or(EndpointError::InvalidPort(text))?
            }
            None => DEFAULT_PORT,
        };
        // A host given with a scheme (`http://gpu`) is a common mistake; accept it as a URL and
        // apply the port only when the URL has none.
        if host.contains("://") {
            let mut endpoint = ComfyEndpoint::parse(&host)?;
            if endpoint.base.port().is_none() {
                let _ = endpoint.base.set_port(Some(port));
            }
            return Self::new(vec![endpoint]);
        }
        Self::new(vec![ComfyEndpoint::from_host_port(&host, port)?])
    }

    /// The servers, in configuration order.
    pub fn as_slice(&self) -> &[ComfyEndpoint] {
        &self.0
    }

    /// Number of servers (at least one).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: the list is never empty. Present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Iterates the servers.
    pub fn iter(&self) -> std::slice::Iter<'_, ComfyEndpoint> {
        self.0.iter()
    }
}

impl IntoIterator for ComfyEndpoints {
    type Item = ComfyEndpoint;
    type IntoIter = std::vec::IntoIter<ComfyEndpoint>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ComfyEndpoints {
    type Item = &'a ComfyEndpoint;
    type IntoIter = std::slice::Iter<'a, ComfyEndpoint>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A ComfyUI server address that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// No server configured (empty string or empty list).
    #[error("no ComfyUI server configured")]
    Empty,
    /// The URL cannot be parsed or uses unsupported features.
    #[error("invalid ComfyUI URL {input:?}: {reason}")]
    Invalid {
        /// What was configured.
        input: String,
        /// Why it was rejected.
        reason: String,
    },
    /// `COMFYUI_PORT` is not a port number.
    #[error("invalid ComfyUI port {0:?}: expected 1-65535")]
    InvalidPort(String),
    /// The same server is listed twice, which would double its share of work.
    #[error("ComfyUI server {0} is listed twice")]
    Duplicate(String),
}
