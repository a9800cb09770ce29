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
///
/// Several processes may share `dir` (the access nodes of a local cluster)
/// and start at once: the files are written into a private directory that is
/// then renamed to `dir` in one step, so every process ends up using the one
/// set that won, never a CA from one and a certificate from another.
pub fn ensure_self_signed(dir: &Path, names: &[String]) -> Result<GeneratedTls, TlsError> {
    let paths = |dir: &Path| {
        (dir.join("ca.pem"), CertPaths { cert: dir.join("server.pem"), key: dir.join("server.key") })
    };
    let (ca_cert, server) = paths(dir);
    if ca_cert.exists() && server.cert.exists() && server.key.exists() {
        return Ok(GeneratedTls { ca_cert, server, created: false });
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|source| TlsError::Write { path: parent.to_owned(), source })?;
    static ATTEMPT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let staging = parent.join(format!(
        ".{}.{}.{}.tmp",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("tls"),
        std::process::id(),
        ATTEMPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(|source| TlsError::Write { path: staging.clone(), source })?;

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

    let (staged_ca, staged) = paths(&staging);
    write(&staged.key, key.serialize_pem())?;
    write(&staged.cert, cert.pem())?;
    write(&staged_ca, ca.pem())?;
    // An empty `dir` left by an earlier failed attempt would block the rename.
    let _ = fs::remove_dir(dir);
    match fs::rename(&staging, dir) {
        Ok(()) => Ok(GeneratedTls { ca_cert, server, created: true }),
        Err(_) if ca_cert.exists() && server.cert.exists() && server.key.exists() => {
            // Another process won the race: use its files.
            let _ = fs::remove_dir_all(&staging);
            Ok(GeneratedTls { ca_cert, server, created: false })
        }
        Err(source) => Err(TlsError::Write { path: dir.to_owned(), source }),
    }
}

fn write(path: &Path, contents: String) -> Result<(), TlsError> {
    fs::write(path, contents).map_err(|source| TlsError::Write { path: path.to_owned(), source })
}

/// The ring provider with TLS_AES_128_GCM_SHA256 first (rustls lists
/// TLS_AES_256_GCM_SHA384 first). Every TLS 1.3 key schedule step is an
/// HMAC with the suite's hash, and CPUs accelerate SHA-256 (SHA-NI) but not
/// SHA-384: in a connect storm SHA-384 alone took about 3% of the server's
/// CPU and as much of each client's. AES-128-GCM is TLS 1.3's
/// mandatory-to-implement suite; the others stay available.
fn provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
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
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    // Our suite order, not the client's (see `provider`).
    config.ignore_client_order = true;
    // Stateless tickets (encrypted with a key that rotates in memory), one
    // per connection: a client that reconnects to this node resumes without
    // the certificate signature and its verification, whatever the number
    // of connections. rustls' default (two tickets backed by a 256-session
    // cache) only served the 256 most recent sessions.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    config.send_tls13_tickets = 1;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_creators_agree_on_one_set() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tls");
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || ensure_self_signed(&dir, &[]).unwrap())
            })
            .collect();
        let results: Vec<GeneratedTls> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(results.iter().filter(|r| r.created).count() <= 1);
        // The files on disk are one consistent set the acceptor accepts.
        acceptor(&results[0].server).unwrap();
        let again = ensure_self_signed(&dir, &[]).unwrap();
        assert!(!again.created);
        let leftovers: Vec<_> =
            std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, [std::ffi::OsString::from("tls")], "staging directories are cleaned up");
    }
}
