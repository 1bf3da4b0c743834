//! TLS termination: certificate chains and keys from PEM files, chosen by
//! the server name the client asks for (SNI), rebuilt on every reload.
//!
//! rustls with its safe defaults: TLS 1.3 and 1.2 only, forward-secret AEAD
//! suites only, ALPN `h2` then `http/1.1`. Handshake CPU is bounded by
//! session resumption: stateless tickets (TLS 1.3 and 1.2) whose key is kept
//! across reloads, plus a session cache for TLS 1.2 clients without tickets.
//! A broken certificate in a reload is refused like any invalid
//! configuration, and the running one keeps serving.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ConfigError, TlsConfig};

/// ALPN protocols offered, in the server's order of preference.
pub(crate) const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// What outlives a configuration generation: resumption state, so a reload
/// does not force every client through a full handshake again.
pub(crate) struct Resumption {
    ticketer: Arc<dyn ProducesTickets>,
    cache: Arc<dyn StoresServerSessions>,
}

impl Resumption {
    /// A ticket key (rotated by rustls every 6 hours) and a session cache.
    pub(crate) fn new() -> Result<Self, ConfigError> {
        let ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| ConfigError::Invalid(format!("tls: cannot make a ticket key: {e}")))?;
        Ok(Self {
            ticketer,
            cache: rustls::server::ServerSessionMemoryCache::new(16 * 1024),
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(msg: String) -> ConfigError {
    ConfigError::Invalid(format!("tls: {msg}"))
}

/// Loads one chain and its key, checking that they belong together.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, ConfigError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_error(format!("cannot read certificate {}: {e}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(format!("bad PEM in {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(tls_error(format!(
            "{} holds no CERTIFICATE block",
            cert.display()
        )));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        tls_error(format!(
            "cannot read a private key from {}: {e}",
            key.display()
        ))
    })?;
    let ck = CertifiedKey::from_der(chain, der, provider).map_err(|e| {
        tls_error(format!(
            "{} and {} do not make a usable certificate: {e}",
            cert.display(),
            key.display()
        ))
    })?;
    Ok(Arc::new(ck))
}

/// Picks the certificate for the client's server name.
#[derive(Debug)]
struct BySni {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example` entries, keyed by `example`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl BySni {
    fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
            .clone()
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// The rustls server configuration for `tls`.
///
/// # Errors
/// A file that cannot be read, holds no certificate or key, or a key that
/// does not match its certificate.
pub(crate) fn server_config(
    tls: &TlsConfig,
    resumption: &Resumption,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let provider = provider();
    let mut resolver = BySni {
        default: certified_key(&tls.cert, &tls.key, &provider)?,
        exact: HashMap::new(),
        wildcard: HashMap::new(),
    };
    for entry in &tls.sni {
        let key = certified_key(&entry.cert, &entry.key, &provider)?;
        for name in &entry.names {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => resolver.wildcard.insert(parent.to_string(), key.clone()),
                None => resolver.exact.insert(name, key.clone()),
            };
        }
    }
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls_error(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    config.ticketer = resumption.ticketer.clone();
    config.session_storage = resumption.cache.clone();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tag: u8) -> Arc<CertifiedKey> {
        // Distinguishable by their (fake) chain; never used for a handshake.
        let signer = rustls::crypto::ring::sign::any_supported_type(
            &PrivateKeyDer::from_pem_slice(
                rcgen::KeyPair::generate()
                    .unwrap()
                    .serialize_pem()
                    .as_bytes(),
            )
            .unwrap(),
        )
        .unwrap();
        Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(vec![tag])],
            signer,
        ))
    }

    #[test]
    fn server_names_pick_exact_then_one_wildcard_label_then_the_default() {
        let (d, a, w) = (key(0), key(1), key(2));
        let sni = BySni {
            default: d,
            exact: [("a.example".to_string(), a)].into(),
            wildcard: [("w.example".to_string(), w)].into(),
        };
        let tag = |name: Option<&str>| sni.pick(name).cert[0].as_ref()[0];
        assert_eq!(tag(Some("a.example")), 1);
        assert_eq!(tag(Some("A.Example")), 1, "names are case-insensitive");
        assert_eq!(tag(Some("x.w.example")), 2);
        assert_eq!(tag(Some("w.example")), 0, "a wildcard needs a label");
        assert_eq!(tag(Some("y.x.w.example")), 0, "one label only");
        assert_eq!(tag(Some("other.example")), 0);
        assert_eq!(tag(None), 0);
    }
}
