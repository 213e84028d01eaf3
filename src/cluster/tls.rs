//! The TLS settings of the link between API replicas and agents, both ends mutually authenticated with
//! the cluster's certificates (`certs.rs` makes them): rustls over ring (never aws-lc-rs), TLS 1.3 only
//! (both ends are this binary), ALPN `http/1.1`.
//!
//! - An agent's [`ServerConfig`] demands a client certificate that chains to the cluster CA (rustls's
//!   webpki verifier, which also wants the clientAuth usage) **and** names the API role
//!   ([`API_ROLE_URI`] as a URI subject alternative name), so that no other certificate the CA signed
//!   (an agent's own, say) can speak to an agent as an API replica.
//! - An API replica's [`ClientConfig`] trusts only the cluster CA, checks the agent's certificate for the
//!   agent service's DNS name (`link.rs` sets it) and presents the API certificate.
//!
//! The role check reads the certificate's subject alternative names with `x509-parser`: webpki verifies
//! chains and DNS/IP names but exposes no URI names, and rustls hands a verifier only the DER.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::node::{AGENT_ROLE_URI, API_ROLE_URI};

/// Why the cluster's TLS settings could not be made; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("could not read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{} holds no PEM private key (PKCS#8, SEC1 or PKCS#1): {source}", path.display())]
    NoKey { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("the CA certificate in {} is unusable: {source}", path.display())]
    BadCa { path: PathBuf, source: rustls::Error },
    #[error("the certificate {} and the key {} do not make a usable pair: {source}", cert.display(), key.display())]
    BadPair { cert: PathBuf, key: PathBuf, source: rustls::Error },
    #[error("could not set up TLS: {0}")]
    Setup(rustls::Error),
}

/// Where a node's cluster certificates are: the CA to trust, its own certificate and its key
/// (`--cluster-ca`, `--cluster-cert`, `--cluster-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Which side of the cluster a verified certificate speaks for, by its URI name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// An API replica ([`API_ROLE_URI`]).
    Api,
    /// An agent ([`AGENT_ROLE_URI`]).
    Agent,
}

impl PeerRole {
    pub fn uri(self) -> &'static str {
        match self {
            PeerRole::Api => API_ROLE_URI,
            PeerRole::Agent => AGENT_ROLE_URI,
        }
    }

    /// The role a certificate names (the API role first, should one name both), if any. `None` also when
    /// the DER does not parse.
    pub fn of(cert: &CertificateDer<'_>) -> Option<PeerRole> {
        let uris = uri_names(cert)?;
        [PeerRole::Api, PeerRole::Agent].into_iter().find(|role| uris.iter().any(|u| u == role.uri()))
    }
}

/// The URI subject alternative names of a certificate; `None` when it does not parse.
fn uri_names(cert: &CertificateDer<'_>) -> Option<Vec<String>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Some(Vec::new());
    };
    Some(
        san.value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
                _ => None,
            })
            .collect(),
    )
}

/// The crypto the cluster link uses: ring, named here once. rustls 0.23.48 deprecates it for lacking
/// post-quantum key exchange; the project uses ring throughout (aws-lc-rs, rustls's other provider,
/// needs a C toolchain and cmake at build time), and the link is TLS 1.3 with X25519 between our own
/// processes on an internal network.
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM material of one end of the link, read and parsed.
struct Material {
    files: TlsFiles,
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Material {
    fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca = read(&files.ca)?;
        let cert = read(&files.cert)?;
        let key = read(&files.key)?;
        Self::from_pem(files.clone(), &ca, &cert, &key)
    }

    /// `files` only names the sources in errors.
    fn from_pem(files: TlsFiles, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca_cert in certificates(&files.ca, ca)? {
            roots.add(ca_cert).map_err(|source| TlsError::BadCa { path: files.ca.clone(), source })?;
        }
        let chain = certificates(&files.cert, cert)?;
        let key =
            PrivateKeyDer::from_pem_slice(key).map_err(|source| TlsError::NoKey { path: files.key.clone(), source })?;
        Ok(Material { files, roots, chain, key })
    }

    fn bad_pair(&self, source: rustls::Error) -> TlsError {
        TlsError::BadPair { cert: self.files.cert.clone(), key: self.files.key.clone(), source }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

/// An agent's TLS settings, from its certificate files: see the module doc.
pub fn agent_server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    server_config(Material::load(files)?)
}

/// An API replica's TLS settings, from its certificate files: see the module doc.
pub fn api_client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    client_config(Material::load(files)?)
}

/// [`agent_server_config`] from PEM held in memory.
pub fn agent_server_config_from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
    server_config(Material::from_pem(in_memory(), ca, cert, key)?)
}

/// [`api_client_config`] from PEM held in memory.
pub fn api_client_config_from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Arc<ClientConfig>, TlsError> {
    client_config(Material::from_pem(in_memory(), ca, cert, key)?)
}

fn in_memory() -> TlsFiles {
    TlsFiles { ca: "<ca in memory>".into(), cert: "<certificate in memory>".into(), key: "<key in memory>".into() }
}

fn server_config(material: Material) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(material.roots.clone()), provider.clone())
        .build()
        .map_err(|e| TlsError::Setup(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(RoleVerifier { inner: webpki, role: PeerRole::Api });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Setup)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain.clone(), material.key.clone_key())
        .map_err(|e| material.bad_pair(e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn client_config(material: Material) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Setup)?
        .with_root_certificates(material.roots.clone())
        .with_client_auth_cert(material.chain.clone(), material.key.clone_key())
        .map_err(|e| material.bad_pair(e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// rustls's webpki client verifier, plus: the certificate must name `role`.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    role: PeerRole,
}

impl ClientCertVerifier for RoleVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The chain first: only a certificate the cluster CA signed is parsed any further.
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if PeerRole::of(end_entity) != Some(self.role) {
            tracing::warn!(wanted = self.role.uri(), "refused a cluster certificate without the role it needs");
            return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rcgen::ExtendedKeyUsagePurpose;
    use rcgen::string::Ia5String;

    use super::*;
    use crate::cluster::certs::{self, Authority, ClusterCerts};

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn verifier(ca: &str) -> RoleVerifier {
        let mut roots = RootCertStore::empty();
        roots.add(der(ca)).unwrap();
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build().unwrap();
        RoleVerifier { inner, role: PeerRole::Api }
    }

    #[test]
    fn certificates_name_their_roles() {
        let c = ClusterCerts::generate(certs::DEFAULT_AGENT_NAME, 2).unwrap();
        assert_eq!(PeerRole::of(&der(&c.api.cert_pem)), Some(PeerRole::Api));
        assert_eq!(PeerRole::of(&der(&c.agent.cert_pem)), Some(PeerRole::Agent));
        assert_eq!(PeerRole::of(&der(&c.ca.cert_pem)), None);
        assert_eq!(PeerRole::of(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01])), None, "garbage DER");
    }

    #[test]
    fn the_agent_admits_only_the_api_role_from_its_own_ca() {
        let ca = Authority::new(2).unwrap();
        let verifier = verifier(&ca.pair().cert_pem);
        let now = UnixTime::now();
        let api_role = vec![rcgen::SanType::URI(Ia5String::try_from(API_ROLE_URI).unwrap())];
        let api = ca.issue("api", api_role.clone(), ExtendedKeyUsagePurpose::ClientAuth).unwrap();
        assert!(verifier.verify_client_cert(&der(&api.cert_pem), &[], now).is_ok());

        // Signed by the CA, usable by a client, but without the role.
        let plain = ca.issue("someone", vec![], ExtendedKeyUsagePurpose::ClientAuth).unwrap();
        let other_role = vec![rcgen::SanType::URI(Ia5String::try_from(AGENT_ROLE_URI).unwrap())];
        let agent_as_client = ca.issue("agent", other_role, ExtendedKeyUsagePurpose::ClientAuth).unwrap();
        // The role, but from another CA.
        let stranger = Authority::new(2).unwrap().issue("api", api_role, ExtendedKeyUsagePurpose::ClientAuth).unwrap();
        // The role, but a server's certificate.
        let api_role = vec![rcgen::SanType::URI(Ia5String::try_from(API_ROLE_URI).unwrap())];
        let server = ca.issue("api", api_role, ExtendedKeyUsagePurpose::ServerAuth).unwrap();
        for (what, pair) in
            [("no role", plain), ("agent role", agent_as_client), ("other CA", stranger), ("serverAuth", server)]
        {
            assert!(verifier.verify_client_cert(&der(&pair.cert_pem), &[], now).is_err(), "{what}");
        }
    }

    #[test]
    fn configs_load_from_files_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        ClusterCerts::generate(certs::DEFAULT_AGENT_NAME, 2).unwrap().write(dir.path()).unwrap();
        let at = |name: &str| dir.path().join(name);
        let agent = TlsFiles { ca: at(certs::CA_CERT), cert: at(certs::AGENT_CERT), key: at(certs::AGENT_KEY) };
        let api = TlsFiles { ca: at(certs::CA_CERT), cert: at(certs::API_CERT), key: at(certs::API_KEY) };
        agent_server_config(&agent).unwrap();
        api_client_config(&api).unwrap();

        let missing = TlsFiles { ca: at("nope.pem"), ..agent.clone() };
        let err = agent_server_config(&missing).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }) && err.to_string().contains("nope.pem"), "{err}");
        let swapped = TlsFiles { key: at(certs::API_KEY), ..agent.clone() };
        let err = agent_server_config(&swapped).unwrap_err();
        assert!(matches!(err, TlsError::BadPair { .. }) && err.to_string().contains("api-key.pem"), "{err}");
        let key_as_cert = TlsFiles { cert: at(certs::AGENT_KEY), ..agent };
        let err = agent_server_config(&key_as_cert).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }) && err.to_string().contains("agent-key.pem"), "{err}");
        let cert_as_key = TlsFiles { key: at(certs::API_CERT), ..api };
        let err = api_client_config(&cert_as_key).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }) && err.to_string().contains("api.pem"), "{err}");
    }
}
