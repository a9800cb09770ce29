//! TLS material for the access node: load a configured certificate, or create
//! a private CA and a server certificate on first start (standalone), so TLS
//! is on by default without any set-up. Clients trust the CA by path.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("bad PEM in {path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
}

/// Paths of a server certificate chain and its private key (PEM).
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What [`ensure_self_signed`] left on disk.
#[derive(Debug, Clone)]
pub struct GeneratedTls {
    pub ca_cert: PathBuf,
    pub server: CertPaths,
    /// False when the files already existed.
    pub created: bool,
}

/// Creates `dir/ca.pem`, `dir/server.pem` and `dir/server.key` unless they
/// exist. The server certificate is valid for `localhost`, `127.0.0.1`, `::1`
/// and any extra `names`.
pub fn ensure_self_signed(dir: &Path, names: &[String]) -> Result<GeneratedTls, TlsError> {
    let ca_cert = dir.join("ca.pem");
    let server = CertPaths { cert: dir.join("server.pem"), key: dir.join("server.key") };
    if ca_cert.exists() && server.cert.exists() && server.key.exists() {
        return Ok(GeneratedTls { ca_cert, server, created: false });
    }
    fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.to_owned(), source })?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "tern standalone CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    sans.extend(names.iter().cloned());
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, "tern access node");
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    write(&server.key, key.serialize_pem())?;
    write(&server.cert, cert.pem())?;
    write(&ca_cert, ca.pem())?;
    Ok(GeneratedTls { ca_cert, server, created: true })
}

fn write(path: &Path, contents: String) -> Result<(), TlsError> {
    fs::write(path, contents).map_err(|source| TlsError::Write { path: path.to_owned(), source })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the acceptor from PEM files.
pub fn acceptor(paths: &CertPaths) -> Result<TlsAcceptor, TlsError> {
    let read =
        |path: &Path| fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source });
    let pem_err = |path: &Path, message: String| TlsError::Pem { path: path.to_owned(), message };
    let cert_pem = read(&paths.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(&paths.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(&paths.cert, "no certificate found".into()));
    }
    let key_pem = read(&paths.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(&paths.key, e.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
