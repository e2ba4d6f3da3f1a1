//! TLS and mutual TLS (rustls, through tonic).
//!
//! One set of three PEM files per process, the same meaning on both sides:
//! - `cert` + `key`: this process's identity (the server's certificate; a worker's client
//!   certificate for mutual TLS);
//! - `ca`: the authority that signed the *other* side. On a worker it is what the server's
//!   certificate must chain to; on the server, setting it turns on mutual TLS: every worker
//!   must present a certificate signed by it, or the handshake fails before any RPC, and
//!   that certificate must name the worker index it joins as: a DNS name `worker-K` among
//!   its subject alternative names ([`names_worker`]), so one worker's certificate cannot
//!   join as another.

use std::path::{Path, PathBuf};
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Paths of the PEM files; all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate chain.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// The authority the peer's certificate must chain to.
    pub ca: Option<PathBuf>,
}

/// A TLS file could not be used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("cannot read TLS {what} {path}: {source}")]
    Read {
        /// cert, key or ca.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not PEM.
    #[error("TLS {what} {path} is not a PEM file (expected a `-----BEGIN ...-----` block)")]
    NotPem {
        /// cert, key or ca.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Half of an identity.
    #[error("tls-cert and tls-key go together: give both or neither")]
    HalfIdentity,
    /// A server without a certificate.
    #[error("the parameter server needs tls-cert and tls-key to serve TLS (tls-ca alone only says whom to trust)")]
    ServerWithoutIdentity,
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem { what, path: path.to_path_buf() });
    }
    Ok(bytes)
}

impl TlsFiles {
    /// Whether any TLS file is set (then the connection is TLS).
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    fn identity(&self) -> Result<Option<Identity>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some(Identity::from_pem(read_pem("cert", c)?, read_pem("key", k)?))),
            (None, None) => Ok(None),
            _ => Err(TlsError::HalfIdentity),
        }
    }

    /// The server side: `None` without TLS files; with `ca`, clients must present a certificate.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        if !self.enabled() {
            return Ok(None);
        }
        let identity = self.identity()?.ok_or(TlsError::ServerWithoutIdentity)?;
        let mut cfg = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read_pem("ca", ca)?));
        }
        Ok(Some(cfg))
    }

    /// The worker side: `None` without TLS files. `domain` is the name the server's
    /// certificate must carry (the host of its address).
    pub fn client(&self, domain: &str) -> Result<Option<ClientTlsConfig>, TlsError> {
        if !self.enabled() {
            return Ok(None);
        }
        let mut cfg = ClientTlsConfig::new().domain_name(domain);
        if let Some(ca) = &self.ca {
            cfg = cfg.ca_certificate(Certificate::from_pem(read_pem("ca", ca)?));
        }
        if let Some(id) = self.identity()? {
            cfg = cfg.identity(id);
        }
        Ok(Some(cfg))
    }
}

/// The DNS name a client certificate must carry to join as worker `index` under mutual TLS.
pub fn worker_name(index: u32) -> String {
    format!("worker-{index}")
}

/// Whether the (DER) certificate names worker `index` ([`worker_name`] among its subject
/// alternative names). The chain was already verified during the handshake.
pub fn names_worker(cert: &[u8], index: u32) -> bool {
    let der = rustls_pki_types::CertificateDer::from(cert);
    let Ok(cert) = webpki::EndEntityCert::try_from(&der) else { return false };
    let Ok(name) = rustls_pki_types::ServerName::try_from(worker_name(index)) else { return false };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_an_identity_and_non_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, b"hello").unwrap();
        let half = TlsFiles { cert: Some(junk.clone()), ..Default::default() };
        assert!(matches!(half.server(), Err(TlsError::HalfIdentity)));
        let both = TlsFiles { cert: Some(junk.clone()), key: Some(junk.clone()), ca: None };
        let e = both.server().unwrap_err().to_string();
        assert!(e.contains("junk.pem") && e.contains("not a PEM"), "{e}");
        let missing = TlsFiles { ca: Some(dir.path().join("nope.pem")), ..Default::default() };
        let e = missing.client("localhost").unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");
        let ca_only = TlsFiles { ca: Some(junk), ..Default::default() };
        assert!(matches!(ca_only.server(), Err(TlsError::ServerWithoutIdentity)));
        assert!(TlsFiles::default().server().unwrap().is_none());
        assert!(TlsFiles::default().client("x").unwrap().is_none());
    }
}
