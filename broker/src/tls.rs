//! Server TLS: loading certificates, and generating a CA and node certificate for dev mode.

use escrow_client::tls::{fingerprint, load_certs, load_key, provider};
use escrow_client::ClientError;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Files of a development TLS setup, kept under `<data dir>/tls/`.
#[derive(Clone, Debug)]
pub struct DevTls {
    /// The CA certificate clients trust (`--ca`).
    pub ca_cert: PathBuf,
    /// The node certificate, signed by the CA.
    pub node_cert: PathBuf,
    /// The node's private key.
    pub node_key: PathBuf,
    /// SHA-256 fingerprint of the node certificate.
    pub fingerprint: String,
}

/// A certificate authority on disk.
#[derive(Clone, Debug)]
pub struct CaFiles {
    /// `ca.pem`.
    pub cert: PathBuf,
    /// `ca.key`.
    pub key: PathBuf,
}

fn tls_error(e: impl std::fmt::Display) -> ClientError {
    ClientError::Tls(e.to_string())
}

/// Parameters of every CA `escrow` makes.
fn ca_params() -> Result<CertificateParams, ClientError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_error)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "Escrow cluster CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Loads the CA in `dir` (`ca.pem`, `ca.key`), creating it on first use.
pub fn ensure_ca(dir: &Path) -> Result<CaFiles, ClientError> {
    let ca = CaFiles {
        cert: dir.join("ca.pem"),
        key: dir.join("ca.key"),
    };
    if ca.cert.exists() && ca.key.exists() {
        return Ok(ca);
    }
    std::fs::create_dir_all(dir).map_err(tls_error)?;
    let params = ca_params()?;
    let key = KeyPair::generate().map_err(tls_error)?;
    let cert = params.self_signed(&key).map_err(tls_error)?;
    write_private(&ca.key, key.serialize_pem().as_bytes())?;
    std::fs::write(&ca.cert, cert.pem()).map_err(tls_error)?;
    Ok(ca)
}

/// Issues a node certificate signed by `ca` into `dir` (`node.pem`, `node.key`) unless
/// one is there. It names `localhost`, `127.0.0.1`, `::1`, the peer name and `names`,
/// and serves both as the client-facing certificate and for mutual TLS between nodes.
pub fn ensure_node_cert(
    ca: &CaFiles,
    dir: &Path,
    names: &[String],
) -> Result<(PathBuf, PathBuf), ClientError> {
    let cert_path = dir.join("node.pem");
    let key_path = dir.join("node.key");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir).map_err(tls_error)?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&ca.key).map_err(tls_error)?)
        .map_err(tls_error)?;
    // The issuer is rebuilt from the same parameters the CA was made with (same subject,
    // key identifier from the same key), which is all a signature needs.
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
        crate::raft::network::PEER_SERVER_NAME.to_string(),
    ];
    sans.extend(names.iter().cloned());
    let mut params = CertificateParams::new(sans).map_err(tls_error)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Escrow node");
    let key = KeyPair::generate().map_err(tls_error)?;
    let cert = params.signed_by(&key, &issuer).map_err(tls_error)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(tls_error)?;
    Ok((cert_path, key_path))
}

pub use escrow_client::defaults::dev_ca_path;

/// Loads the dev CA and node certificate from `data_dir/tls`, generating them on first use.
pub fn ensure_dev_tls(data_dir: &Path, names: &[String]) -> Result<DevTls, ClientError> {
    let dir = data_dir.join("tls");
    let ca = ensure_ca(&dir)?;
    let (node_cert, node_key) = ensure_node_cert(&ca, &dir, names)?;
    let certs = load_certs(&node_cert)?;
    Ok(DevTls {
        fingerprint: fingerprint(&certs[0]),
        ca_cert: ca.cert,
        node_cert,
        node_key,
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(tls_error)?;
    file.write_all(bytes).map_err(tls_error)
}

/// A QUIC server configuration (TLS 1.3, ring) for `alpn`.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[u8],
    transport: quinn::TransportConfig,
) -> Result<quinn::ServerConfig, ClientError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(tls_error)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// QUIC configurations for node-to-node traffic: mutual TLS, both sides proving a
/// certificate issued by the cluster CA in `ca`.
pub fn peer_configs(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), ClientError> {
    let alpn = escrow_proto::ALPN_RAFT.to_vec();
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(tls_error)?;
    }
    let roots = Arc::new(roots);
    let certs = load_certs(cert)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(tls_error)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), load_key(key)?)
        .map_err(tls_error)?;
    server.alpn_protocols = vec![alpn.clone()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, load_key(key)?)
        .map_err(tls_error)?;
    client.alpn_protocols = vec![alpn];
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(256u32.into());
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    transport.stream_receive_window((64u32 * 1024 * 1024).into());
    transport.receive_window((256u32 * 1024 * 1024).into());
    transport.send_window(256 * 1024 * 1024);
    transport.mtu_discovery_config(Some(escrow_client::mtu_discovery()));
    let transport = Arc::new(transport);
    let quic_server =
        quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(tls_error)?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
    server_config.transport_config(transport.clone());
    let quic_client =
        quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(tls_error)?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic_client));
    client_config.transport_config(transport);
    Ok((server_config, client_config))
}
