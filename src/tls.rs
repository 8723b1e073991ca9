//! The ext_proc server's TLS: the serving certificate, its reload, and the handshakes.
//!
//! The certificate is `tls.crt`/`tls.key` from `--cert-path`, or a self-signed one made at start
//! (as the Go EPP does; gateways do not verify it). Every handshake reads the current
//! certificate from one [`ArcSwap`], so with `--enable-cert-reload` a rotated secret (cert-manager
//! rewriting the mounted files) is served to new connections without a restart; connections
//! already open keep the certificate they were made with. A rotation that cannot be read or
//! parsed (a half-written file, a key that does not match) keeps the old certificate and is
//! retried at the next check.
//!
//! Handshakes run in their own tasks, so a slow or silent client cannot hold up the accept loop;
//! ALPN offers only `h2`, which is what a gRPC client asks for.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

/// Longest a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The PEM does not hold a usable certificate chain and private key.
    #[error("{0}")]
    Invalid(String),
}

/// The certificate served to the next handshake.
#[derive(Debug)]
pub struct ServingCert {
    current: ArcSwap<CertifiedKey>,
    /// Where it was read from (`None`: self-signed).
    source: Option<CertFiles>,
}

/// The certificate's files, and the bytes last loaded from them.
#[derive(Debug)]
struct CertFiles {
    dir: PathBuf,
    /// `tls.crt` and `tls.key` as last loaded.
    loaded: parking_lot::Mutex<(Vec<u8>, Vec<u8>)>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// A certified key from PEM: the chain in `cert_pem`, the private key in `key_pem`, which must
/// belong to the chain's first certificate.
fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid(format!("tls.crt: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Invalid("tls.crt holds no certificate".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Invalid(format!("tls.key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(|e| TlsError::Invalid(e.to_string()))
}

impl ServingCert {
    /// `tls.crt` and `tls.key` from `dir`.
    ///
    /// # Errors
    /// [`TlsError`] when they cannot be read or do not form a certificate and its key.
    pub fn from_dir(dir: &Path) -> Result<Self, TlsError> {
        let (crt, key) = (read(&dir.join("tls.crt"))?, read(&dir.join("tls.key"))?);
        let ck = certified_key(&crt, &key)?;
        Ok(Self {
            current: ArcSwap::from_pointee(ck),
            source: Some(CertFiles {
                dir: dir.to_owned(),
                loaded: parking_lot::Mutex::new((crt, key)),
            }),
        })
    }

    /// A self-signed certificate for `localhost` and `epp`.
    ///
    /// # Errors
    /// [`TlsError`] if generating it fails.
    pub fn self_signed() -> Result<Self, TlsError> {
        let names = vec!["localhost".to_owned(), "epp".to_owned()];
        let ck = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Invalid(e.to_string()))?;
        let key = certified_key(
            ck.cert.pem().as_bytes(),
            ck.signing_key.serialize_pem().as_bytes(),
        )?;
        Ok(Self {
            current: ArcSwap::from_pointee(key),
            source: None,
        })
    }

    /// The certificate chain now served (its first entry is the leaf).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }

    /// Read the files again and serve them if they changed. Returns whether the certificate
    /// changed; a self-signed certificate never does.
    ///
    /// # Errors
    /// [`TlsError`] when the changed files cannot be read or parsed; the old certificate stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some(CertFiles { dir, loaded }) = &self.source else {
            return Ok(false);
        };
        let (crt, key) = (read(&dir.join("tls.crt"))?, read(&dir.join("tls.key"))?);
        let mut last = loaded.lock();
        if last.0 == crt && last.1 == key {
            return Ok(false);
        }
        let ck = certified_key(&crt, &key)?;
        self.current.store(Arc::new(ck));
        *last = (crt, key);
        Ok(true)
    }

    /// Check the files every `every` until `cancel`, serving a changed certificate.
    pub async fn watch(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The same failure is logged once, not at every check.
        let mut last_error = None;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reload() {
                Ok(changed) => {
                    if changed {
                        info!("serving a new TLS certificate");
                    }
                    last_error = None;
                }
                Err(e) => {
                    let e = e.to_string();
                    if last_error.as_ref() != Some(&e) {
                        warn!(error = %e, "the changed TLS certificate cannot be loaded; keeping the current one");
                        last_error = Some(e);
                    }
                }
            }
        }
    }

    /// A rustls server config that serves whatever certificate is current, over `h2`.
    ///
    /// # Errors
    /// [`TlsError`] if the crypto provider offers none of the default protocol versions.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, TlsError> {
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Invalid(e.to_string()))?
                .with_no_client_auth()
                .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// TLS connections made from the TCP connections of `incoming`, each handshake in its own task
/// (bounded by `HANDSHAKE_TIMEOUT`); failed handshakes are logged and dropped. Accepting stops,
/// and `incoming` is dropped, once the returned stream is.
///
/// # Errors
/// [`TlsError`] from [`ServingCert::server_config`].
pub fn accept(
    incoming: impl Stream<Item = std::io::Result<TcpStream>> + Send + 'static,
    cert: &Arc<ServingCert>,
    tasks: &TaskTracker,
) -> Result<ReceiverStream<std::io::Result<TlsStream<TcpStream>>>, TlsError> {
    let acceptor = TlsAcceptor::from(Arc::new(cert.server_config()?));
    Ok(crate::listen::admit_each(incoming, tasks, move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err(e)) => {
                    debug!(error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    debug!("TLS handshake timed out");
                    None
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cert(dir: &Path, name: &str) -> CertificateDer<'static> {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        std::fs::write(dir.join("tls.crt"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
        ck.cert.der().clone()
    }

    #[test]
    fn reload_serves_a_changed_certificate_and_keeps_the_old_one_on_bad_files() {
        let dir = std::env::temp_dir().join(format!("epp-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = write_cert(&dir, "a.example");
        let cert = ServingCert::from_dir(&dir).unwrap();
        assert_eq!(cert.chain(), vec![first.clone()]);
        assert!(!cert.reload().unwrap(), "unchanged files");

        // Half-written: a certificate with the old key does not load; the old one stays.
        let other = rcgen::generate_simple_self_signed(vec!["b.example".to_owned()]).unwrap();
        std::fs::write(dir.join("tls.crt"), other.cert.pem()).unwrap();
        assert!(cert.reload().is_err());
        std::fs::write(dir.join("tls.crt"), "not a certificate").unwrap();
        let err = cert.reload().unwrap_err().to_string();
        assert_eq!(err, "tls.crt holds no certificate");
        assert_eq!(cert.chain(), vec![first]);

        let second = write_cert(&dir, "b.example");
        assert!(cert.reload().unwrap());
        assert_eq!(cert.chain(), vec![second]);
        std::fs::remove_file(dir.join("tls.key")).unwrap();
        let err = cert.reload().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: ", dir.join("tls.key").display())),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_self_signed_certificate_never_reloads() {
        let cert = ServingCert::self_signed().unwrap();
        assert_eq!(cert.chain().len(), 1);
        assert!(!cert.reload().unwrap());
    }
}
