//! TLS material for the access node: load a configured certificate, or create
//! a private CA and server certificates on first start (standalone), so TLS
//! is on by default without any set-up. Clients trust the CA by path.
//!
//! The generated set holds two chains, each under its own CA: Ed25519 and
//! ECDSA P-256. A client that offers Ed25519 signatures (rustls, OpenSSL
//! 1.1.1+, BoringSSL) gets the Ed25519 chain: signing is twice as fast for
//! the server and the client verifies its two signatures (the CA's on the
//! certificate, the server's on the handshake) in 26 µs each instead of
//! 38 µs. Any other client (Java's trust manager, browsers) gets the P-256
//! chain. `ca.pem` holds both CA certificates, so trusting that one file
//! trusts whichever chain is served.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SignatureAlgorithm,
};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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
    /// The server's chains, preferred first (see [`acceptor`]).
    pub server: Vec<CertPaths>,
    /// False when the files already existed.
    pub created: bool,
}

/// Creates `dir/ca.pem` (both CA certificates), `dir/server-ed25519.pem` and
/// `.key`, and `dir/server.pem` and `.key` (P-256) unless `ca.pem` and the
/// P-256 pair exist. The server certificates are valid for `localhost`,
/// `127.0.0.1`, `::1` and any extra `names`.
///
/// A directory written by an earlier version holds only the P-256 chain
/// under a `ca.pem` with only its CA. It is used as it is: adding an Ed25519
/// chain would be served to clients that still trust the old `ca.pem` alone.
///
/// Several processes may share `dir` (the access nodes of a local cluster)
/// and start at once: the files are written into a private directory that is
/// then renamed to `dir` in one step, so every process ends up using the one
/// set that won, never a CA from one and a certificate from another.
pub fn ensure_self_signed(dir: &Path, names: &[String]) -> Result<GeneratedTls, TlsError> {
    let paths = |dir: &Path| {
        (
            dir.join("ca.pem"),
            CertPaths { cert: dir.join("server-ed25519.pem"), key: dir.join("server-ed25519.key") },
            CertPaths { cert: dir.join("server.pem"), key: dir.join("server.key") },
        )
    };
    // The Ed25519 chain is served only where it was created with the CA file.
    let existing = |dir: &Path| {
        let (ca_cert, ed25519, p256) = paths(dir);
        let present = |c: &CertPaths| c.cert.exists() && c.key.exists();
        if !(ca_cert.exists() && present(&p256)) {
            return None;
        }
        let server = if present(&ed25519) { vec![ed25519, p256] } else { vec![p256] };
        Some(GeneratedTls { ca_cert, server, created: false })
    };
    if let Some(found) = existing(dir) {
        return Ok(found);
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

    let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    sans.extend(names.iter().cloned());
    let (staged_ca, staged_ed25519, staged_p256) = paths(&staging);
    let ed25519 = generate_chain(&rcgen::PKCS_ED25519, "tern standalone CA (Ed25519)", &sans)?;
    let p256 = generate_chain(&rcgen::PKCS_ECDSA_P256_SHA256, "tern standalone CA", &sans)?;
    for (chain, staged) in [(&ed25519, &staged_ed25519), (&p256, &staged_p256)] {
        write(&staged.key, &chain.key_pem)?;
        write(&staged.cert, &chain.cert_pem)?;
    }
    write(&staged_ca, &format!("{}{}", p256.ca_pem, ed25519.ca_pem))?;
    // An empty `dir` left by an earlier failed attempt would block the rename.
    let _ = fs::remove_dir(dir);
    match fs::rename(&staging, dir) {
        Ok(()) => {
            let (ca_cert, ed25519, p256) = paths(dir);
            Ok(GeneratedTls { ca_cert, server: vec![ed25519, p256], created: true })
        }
        Err(source) => {
            // Another process may have won the race: then use its files.
            let _ = fs::remove_dir_all(&staging);
            existing(dir).ok_or(TlsError::Write { path: dir.to_owned(), source })
        }
    }
}

/// A generated CA and the server certificate it signed, in PEM.
struct GeneratedChain {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

/// A CA and a server certificate for `names` signed by it, both with keys
/// of algorithm `alg`.
fn generate_chain(
    alg: &'static SignatureAlgorithm,
    ca_name: &str,
    names: &[String],
) -> Result<GeneratedChain, TlsError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, ca_name);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate_for(alg)?;
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, "tern access node");
    let key = KeyPair::generate_for(alg)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(GeneratedChain { ca_pem: ca.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn write(path: &Path, contents: &str) -> Result<(), TlsError> {
    fs::write(path, contents).map_err(|source| TlsError::Write { path: path.to_owned(), source })
}

/// The aws-lc-rs provider with TLS_AES_128_GCM_SHA256 first (rustls lists
/// TLS_AES_256_GCM_SHA384 first). Every TLS 1.3 key schedule step is an
/// HMAC with the suite's hash, and CPUs accelerate SHA-256 (SHA-NI) but not
/// SHA-384: in a connect storm SHA-384 alone took about 3% of the server's
/// CPU and as much of each client's. AES-128-GCM is TLS 1.3's
/// mandatory-to-implement suite; the others stay available.
///
/// aws-lc-rs rather than ring because a handshake is mostly the X25519 key
/// exchange, and aws-lc's is twice as fast on x86-64 (23 µs against 47 µs
/// per key pair and agreement on this project's benchmark machine).
fn provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

/// Serves the first chain, in order of preference, whose key can sign with
/// a scheme the client offers; the last one if none can (the handshake then
/// fails with rustls' own error, as it would with that single chain).
#[derive(Debug)]
struct PreferredChain {
    chains: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for PreferredChain {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = hello.signature_schemes();
        let fits = |chain: &&Arc<CertifiedKey>| chain.key.choose_scheme(offered).is_some();
        self.chains.iter().find(fits).or(self.chains.last()).cloned()
    }
}

/// Loads one chain and its key, checking that they belong together.
fn load_chain(
    paths: &CertPaths,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
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
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        let message = format!("{e} (key {} and certificate {})", paths.key.display(), paths.cert.display());
        TlsError::Config(rustls::Error::General(message))
    })
}

/// Builds the acceptor from PEM files: one or more chains, preferred first
/// (each client gets the first one it can verify, see [`PreferredChain`]).
pub fn acceptor(chains: &[CertPaths]) -> Result<TlsAcceptor, TlsError> {
    let provider = provider();
    let chains = chains
        .iter()
        .map(|paths| load_chain(paths, &provider).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    if chains.is_empty() {
        return Err(TlsError::Config(rustls::Error::General("no server certificate given".into())));
    }
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(PreferredChain { chains }));
    // Our suite order, not the client's (see `provider`).
    config.ignore_client_order = true;
    // Stateless tickets (encrypted with a key that rotates in memory), one
    // per connection: a client that reconnects to this node resumes without
    // the certificate signature and its verification, whatever the number
    // of connections. rustls' default (two tickets backed by a 256-session
    // cache) only served the 256 most recent sessions.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.send_tls13_tickets = 1;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::SignatureScheme;
    use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
    use rustls::pki_types::ServerName;
    use tokio::net::{TcpListener, TcpStream};

    /// A client provider that offers only ECDSA signatures, as clients
    /// without Ed25519 support do.
    fn ecdsa_only_client() -> CryptoProvider {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        let algorithms = provider.signature_verification_algorithms;
        let mapping: Vec<_> = algorithms
            .mapping
            .iter()
            .filter(|(scheme, _)| {
                matches!(
                    scheme,
                    SignatureScheme::ECDSA_NISTP256_SHA256 | SignatureScheme::ECDSA_NISTP384_SHA384
                )
            })
            .cloned()
            .collect();
        provider.signature_verification_algorithms =
            WebPkiSupportedAlgorithms { all: algorithms.all, mapping: Box::leak(mapping.into_boxed_slice()) };
        provider
    }

    /// Does a handshake over loopback with a client trusting `ca` and
    /// returns the leaf certificate the server presented.
    async fn served_leaf(
        acceptor: TlsAcceptor,
        ca: &Path,
        client: CryptoProvider,
    ) -> Result<CertificateDer<'static>, std::io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            acceptor.accept(tcp).await.map(drop)
        });
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(client))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
        let leaf = tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone().into_owned();
        let _ = server.await;
        Ok(leaf)
    }

    fn leaf_of(paths: &CertPaths) -> CertificateDer<'static> {
        CertificateDer::pem_file_iter(&paths.cert).unwrap().next().unwrap().unwrap()
    }

    #[tokio::test]
    async fn clients_get_the_ed25519_chain_if_they_offer_it_and_p256_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let generated = ensure_self_signed(&dir.path().join("tls"), &[]).unwrap();
        assert!(generated.created);
        let [ed25519, p256] = &generated.server[..] else { panic!("two chains: {:?}", generated.server) };
        assert!(ed25519.cert.ends_with("server-ed25519.pem") && p256.cert.ends_with("server.pem"));
        let ca = &generated.ca_cert;
        assert_eq!(CertificateDer::pem_file_iter(ca).unwrap().count(), 2, "ca.pem holds both CAs");

        let acceptor = || acceptor(&generated.server).unwrap();
        let default_client = rustls::crypto::aws_lc_rs::default_provider();
        assert_eq!(served_leaf(acceptor(), ca, default_client).await.unwrap(), leaf_of(ed25519));
        assert_eq!(served_leaf(acceptor(), ca, ecdsa_only_client()).await.unwrap(), leaf_of(p256));
    }

    /// A directory from before the Ed25519 chain (P-256 only, `ca.pem` with
    /// one CA) is served as it is, so its clients keep verifying.
    #[tokio::test]
    async fn a_p256_only_directory_keeps_serving_its_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let generated = ensure_self_signed(&tls, &[]).unwrap();
        // What an earlier version wrote: the P-256 CA (first in ca.pem) and chain.
        let both = fs::read_to_string(&generated.ca_cert).unwrap();
        let end = "-----END CERTIFICATE-----\n";
        fs::write(&generated.ca_cert, &both[..both.find(end).unwrap() + end.len()]).unwrap();
        fs::remove_file(tls.join("server-ed25519.pem")).unwrap();
        fs::remove_file(tls.join("server-ed25519.key")).unwrap();

        let again = ensure_self_signed(&tls, &[]).unwrap();
        assert!(!again.created);
        assert_eq!(again.server.len(), 1);
        let leaf = served_leaf(
            acceptor(&again.server).unwrap(),
            &again.ca_cert,
            rustls::crypto::aws_lc_rs::default_provider(),
        )
        .await
        .unwrap();
        assert_eq!(leaf, leaf_of(&again.server[0]));
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused_with_both_paths() {
        let dir = tempfile::tempdir().unwrap();
        let generated = ensure_self_signed(&dir.path().join("tls"), &[]).unwrap();
        let crossed =
            CertPaths { cert: generated.server[1].cert.clone(), key: generated.server[0].key.clone() };
        let e = acceptor(&[crossed]).err().expect("a crossed pair is refused").to_string();
        assert!(e.contains("server-ed25519.key") && e.contains("server.pem"), "{e}");
        let e = acceptor(&[]).err().expect("no chain is refused").to_string();
        assert!(e.contains("no server certificate"), "{e}");
    }

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
