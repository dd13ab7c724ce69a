//! Built-in TLS: `TLS_CERT` and `TLS_KEY` make the broker serve HTTPS and WSS itself, so a
//! TouchDesigner machine can reach a broker on a cloud GPU without a reverse proxy. rustls with the
//! aws-lc-rs provider, the one the worker's reqwest uses too, so the binary carries one.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

use crate::config::ConfigError;

/// Reads the PEM certificate chain and key and builds the server's TLS settings (TLS 1.2 and 1.3,
/// HTTP/1.1 by ALPN: the broker speaks HTTP/1.1 only). Fails at start, naming the setting, rather
/// than at the first handshake.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, ConfigError> {
    let invalid = |name: &'static str, path: &Path, what: String| ConfigError::Invalid {
        name,
        message: format!("{}: {what}", path.display()),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| invalid("TLS_CERT", cert, format!("cannot read a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(invalid("TLS_CERT", cert, "holds no CERTIFICATE block".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| invalid("TLS_KEY", key, format!("cannot read a PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS_CERT", cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| invalid("TLS_KEY", key, format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
