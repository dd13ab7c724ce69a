//! Which broker a client command (`submit`, `status`) talks to, and how: its flags, shared so the
//! two commands take the same ones.

use std::path::PathBuf;
use std::time::Duration;

/// The broker of a client command.
#[derive(Debug, clap::Args)]
pub struct BrokerTarget {
    /// Broker URL. Default: http://127.0.0.1:$API_PORT.
    #[arg(long, env = "TDCOMFY_URL")]
    url: Option<String>,
    /// Port of a local broker, used when --url is not given.
    #[arg(long, env = "API_PORT", default_value_t = 8080)]
    api_port: u16,
    /// The broker's API_TOKEN, if it has one.
    #[arg(long, env = "API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// For an https:// broker with a self-signed certificate or a private CA: that certificate
    /// (PEM), trusted besides the system's roots.
    #[arg(long = "ca", env = "BROKER_CA", value_name = "PEM")]
    ca: Option<PathBuf>,
}

impl BrokerTarget {
    /// The broker's base URL, without a trailing slash.
    pub fn base(&self) -> String {
        let base = self.url.clone().unwrap_or_else(|| format!("http://127.0.0.1:{}", self.api_port));
        base.trim_end_matches('/').to_owned()
    }

    /// The token to send, if one is set.
    pub fn token(&self) -> Option<String> {
        self.token.clone().filter(|t| !t.is_empty())
    }

    /// An HTTP client that trusts `--ca` besides the system's roots.
    pub fn http(&self) -> anyhow::Result<reqwest::Client> {
        let mut http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if let Some(path) = &self.ca {
            let certs =
                tdcomfy_worker::broker_client::BrokerTrust::read_pem(path).map_err(|e| anyhow::anyhow!("--ca: {e}"))?;
            http = http.tls_certs_merge(certs);
        }
        Ok(http.build()?)
    }
}
