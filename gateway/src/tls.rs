//! TLS for the data-plane and admin listeners. The policy names PEM files; [`load`] reads them
//! into a rustls `CertifiedKey` when the policy is loaded (so `config check` and a reload catch
//! a bad file), and both listeners pick their certificate from the policy in force at each
//! handshake ([`PolicyCert`]), so a reload that reads a renewed certificate needs no restart.
//! Pingora terminates the data plane's TLS (its `rustls` feature); the admin API's axum server
//! is fed by [`TlsListener`]. Both use the rustls and tokio-rustls that Pingora already brings.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::config::Policy;

/// How long a client gets to finish the admin listener's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate chain and its private key, read from the policy's files.
pub struct TlsCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SHA-256 of the leaf certificate (public), to tell a renewed certificate from the old.
    pub fingerprint: String,
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for TlsCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl TlsCert {
    /// `cert.pem (sha256 0123abcd…)`, for logs and `config diff`.
    pub fn describe(&self) -> String {
        format!(
            "{} (sha256 {}…)",
            self.cert.display(),
            &self.fingerprint[..16]
        )
    }
}

/// Which PEM file a problem is in, and what it is (never the file's contents).
#[derive(Debug)]
pub struct LoadError {
    pub field: &'static str,
    pub message: String,
}

/// Reads and checks a certificate chain and its key: both parse, and the key is the
/// certificate's.
pub fn load(cert: &Path, key: &Path) -> Result<TlsCert, LoadError> {
    let err = |field, message: String| LoadError { field, message };
    let read = |field, path: &Path| {
        std::fs::read(path).map_err(|e| err(field, format!("cannot read {}: {e}", path.display())))
    };
    let cert_pem = read("cert", cert)?;
    let key_pem = read("key", key)?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err("cert", format!("{}: not a PEM file: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(err(
            "cert",
            format!("{}: no PEM certificate in it", cert.display()),
        ));
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .ok()
        .ok_or_else(|| {
            err(
                "key",
                format!(
                    "{}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it",
                    key.display()
                ),
            )
        })?;
    let fingerprint = hex::encode(Sha256::digest(&chain[0]));
    let certified = CertifiedKey::from_der(chain, private, &provider())
        .map_err(|e| err("key", format!("{}: {e}", key.display())))?;
    Ok(TlsCert {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        fingerprint,
        certified: Arc::new(certified),
    })
}

/// The process's rustls provider (ring, the one Pingora installs).
fn provider() -> Arc<CryptoProvider> {
    pingora::tls::install_default_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .expect("a rustls crypto provider is installed")
}

/// Which listener a [`PolicyCert`] serves.
#[derive(Debug, Clone, Copy)]
pub enum Listener {
    DataPlane,
    Admin,
}

/// Answers every handshake with the certificate of the policy in force.
pub struct PolicyCert {
    policy: Arc<arc_swap::ArcSwap<Policy>>,
    listener: Listener,
}

impl PolicyCert {
    pub fn new(policy: Arc<arc_swap::ArcSwap<Policy>>, listener: Listener) -> Arc<PolicyCert> {
        Arc::new(PolicyCert { policy, listener })
    }
}

impl fmt::Debug for PolicyCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyCert({:?})", self.listener)
    }
}

impl ResolvesServerCert for PolicyCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let policy = self.policy.load();
        let tls = match self.listener {
            Listener::DataPlane => &policy.tls,
            Listener::Admin => &policy.admin_tls,
        };
        tls.as_ref().map(|t| t.certified.clone())
    }
}

/// The data plane's Pingora TLS settings: TLS 1.2 and 1.3, HTTP/1.1, certificate from the policy.
pub fn data_plane_settings(
    policy: Arc<arc_swap::ArcSwap<Policy>>,
) -> pingora::Result<pingora::listeners::tls::TlsSettings> {
    // No paths: the resolver below supplies the certificate (Pingora ignores the paths then).
    let mut settings = pingora::listeners::tls::TlsSettings::intermediate("", "")?;
    settings.set_cert_resolver(PolicyCert::new(policy, Listener::DataPlane));
    Ok(settings)
}

/// The admin listener's rustls configuration (HTTP/1.1).
pub fn admin_config(policy: Arc<arc_swap::ArcSwap<Policy>>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_no_client_auth()
        .with_cert_resolver(PolicyCert::new(policy, Listener::Admin));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

type TlsStream = pingora::tls::ServerTlsStream<tokio::net::TcpStream>;

/// An axum listener that accepts TCP connections and hands over those whose TLS handshake
/// succeeded. Handshakes run concurrently (one task each, bounded by a timeout), so a slow or
/// silent client does not hold up the others.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp`; must be called within a Tokio runtime.
    pub fn new(tcp: tokio::net::TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = pingora::tls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            while !tx.is_closed() {
                let (stream, remote) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!("admin API: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, remote)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, "admin API: TLS handshake failed: {e}")
                        }
                        Err(_) => tracing::debug!(%remote, "admin API: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task is gone (its runtime is shutting down): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, signing_key.serialize_pem()).unwrap();
        (c, k, signing_key.serialize_pem())
    }

    #[test]
    fn loads_a_matching_pair_and_names_the_file_at_fault_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, key_pem) = write_pair(dir.path(), "a");
        let (_, other_key, _) = write_pair(dir.path(), "b");
        let loaded = load(&cert, &key).expect("a matching pair");
        assert_eq!(loaded.fingerprint.len(), 64);
        assert!(loaded.describe().starts_with(&cert.display().to_string()));
        let debug = format!("{loaded:?}");
        assert!(!debug.contains(key_pem.lines().nth(1).unwrap()), "{debug}");

        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        for (c, k, field, says) in [
            (&cert, &other_key, "key", "mismatch"),
            (&missing, &key, "cert", "cannot read"),
            (&cert, &missing, "key", "cannot read"),
            (&garbage, &key, "cert", "no PEM certificate"),
            (&cert, &garbage, "key", "no PEM private key"),
            (&key, &key, "cert", "no PEM certificate"),
            (&cert, &cert, "key", "no PEM private key"),
        ] {
            let e = load(c, k).unwrap_err();
            assert_eq!(e.field, field, "{c:?} {k:?}: {e:?}");
            assert!(
                e.message.to_lowercase().contains(&says.to_lowercase()),
                "{e:?}"
            );
            assert!(!e.message.contains(key_pem.lines().nth(1).unwrap()));
        }
    }
}
