//! The cluster's certificates, made by `kernelbox cluster certs`: a cluster CA, the agents' server
//! certificate (DNS name = the agent service's name, plus the agent role's URI name, serverAuth only) and
//! the API replicas' client certificate (the API role's URI name, clientAuth only), all with ECDSA P-256
//! keys (rcgen over ring). Written into a folder without ever replacing or following anything there.
//!
//! It knows nothing of TLS itself: `tls.rs` loads what this writes.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::node::{AGENT_ROLE_URI, API_ROLE_URI};

/// The agent service's name when none is given: the DNS name API replicas check the agents' certificate
/// for (`--agent-server-name`).
pub const DEFAULT_AGENT_NAME: &str = "kernelbox-agent";

/// The file names in the output folder, in the order they are written.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const AGENT_CERT: &str = "agent.pem";
pub const AGENT_KEY: &str = "agent-key.pem";
pub const API_CERT: &str = "api.pem";
pub const API_KEY: &str = "api-key.pem";

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0:?} is not a DNS name a certificate can carry (letters, digits, '-' and '.')")]
    BadName(String),
    #[error("a certificate must be valid for 1 to 36500 days, not {0}")]
    BadDays(u32),
    #[error("could not make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{} already exists: certificates are never overwritten (move the old ones away first)", .0.display())]
    Exists(PathBuf),
    #[error("could not write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// One certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").field("cert_pem", &self.cert_pem).field("key_pem", &"<secret>").finish()
    }
}

/// A cluster's three certificates.
#[derive(Debug, Clone)]
pub struct ClusterCerts {
    pub ca: Pair,
    pub agent: Pair,
    pub api: Pair,
}

/// The cluster CA while it issues certificates (its key stays in memory only until written).
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pair: Pair,
    days: u32,
}

impl Authority {
    /// A new self-signed CA valid for `days`.
    pub fn new(days: u32) -> Result<Self, CertError> {
        if !(1..=36_500).contains(&days) {
            return Err(CertError::BadDays(days));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = name("kernelbox cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, days);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pair = Pair { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        Ok(Authority { issuer: Issuer::new(params, key), pair, days })
    }

    /// A leaf certificate with these subject alternative names and this one extended key usage.
    pub fn issue(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Pair, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, self.days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// The CA's own certificate and key.
    pub fn pair(&self) -> &Pair {
        &self.pair
    }
}

impl ClusterCerts {
    /// A new CA and the agent and API certificates it signs, all valid for `days` from now (and from an
    /// hour ago, for clocks a little behind).
    pub fn generate(agent_name: &str, days: u32) -> Result<Self, CertError> {
        let dns = valid_dns_name(agent_name).ok_or_else(|| CertError::BadName(agent_name.to_string()))?;
        let ca = Authority::new(days)?;
        let agent = ca.issue(
            "kernelbox agent",
            vec![SanType::DnsName(dns), uri(AGENT_ROLE_URI)],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let api = ca.issue("kernelbox api", vec![uri(API_ROLE_URI)], ExtendedKeyUsagePurpose::ClientAuth)?;
        Ok(ClusterCerts { ca: ca.pair().clone(), agent, api })
    }

    /// Writes the six files into `dir` (made 0700 if missing): certificates 0644, keys 0600. Refuses
    /// before writing anything if one of them exists; each file is created exclusively, so a file or link
    /// that appears meanwhile is never followed nor replaced. Returns the paths written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, CertError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CertError::Write { path: dir.to_path_buf(), source })?;
        let files = [
            (CA_CERT, &self.ca.cert_pem, 0o644),
            (CA_KEY, &self.ca.key_pem, 0o600),
            (AGENT_CERT, &self.agent.cert_pem, 0o644),
            (AGENT_KEY, &self.agent.key_pem, 0o600),
            (API_CERT, &self.api.cert_pem, 0o644),
            (API_KEY, &self.api.key_pem, 0o600),
        ];
        for (file, _, _) in &files {
            let path = dir.join(file);
            // symlink_metadata: a dangling link counts as existing too.
            if std::fs::symlink_metadata(&path).is_ok() {
                return Err(CertError::Exists(path));
            }
        }
        let mut written = Vec::with_capacity(files.len());
        for (file, pem, mode) in files {
            let path = dir.join(file);
            write_new(&path, pem.as_bytes(), mode)?;
            written.push(path);
        }
        Ok(written)
    }
}

/// Creates `path` with `O_CREAT|O_EXCL|O_NOFOLLOW` (never through a link, never over a file) and `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let failed = |source| CertError::Write { path: path.to_path_buf(), source };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => CertError::Exists(path.to_path_buf()),
            _ => failed(e),
        })?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(failed)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "kernelbox");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn uri(role: &'static str) -> SanType {
    SanType::URI(Ia5String::try_from(role).expect("the role names are ASCII"))
}

/// A DNS name: dot-separated labels of letters, digits and inner hyphens, 253 characters at most.
fn valid_dns_name(name: &str) -> Option<Ia5String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    (name.len() <= 253 && name.split('.').all(label_ok)).then(|| Ia5String::try_from(name).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn writes_six_files_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let certs = ClusterCerts::generate(DEFAULT_AGENT_NAME, 30).unwrap();
        let written = certs.write(&out).unwrap();
        assert_eq!(written.len(), 6);
        for (file, mode) in [
            (CA_CERT, 0o644),
            (CA_KEY, 0o600),
            (AGENT_CERT, 0o644),
            (AGENT_KEY, 0o600),
            (API_CERT, 0o644),
            (API_KEY, 0o600),
        ] {
            let meta = std::fs::metadata(out.join(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
        }
        assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(std::fs::read_to_string(out.join(AGENT_KEY)).unwrap().contains("PRIVATE KEY"));
        assert!(std::fs::read_to_string(out.join(CA_CERT)).unwrap().contains("BEGIN CERTIFICATE"));
    }

    #[test]
    fn refuses_to_overwrite_and_writes_nothing_then() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(API_KEY), "mine").unwrap();
        let err = ClusterCerts::generate(DEFAULT_AGENT_NAME, 30).unwrap().write(dir.path()).unwrap_err();
        assert!(matches!(err, CertError::Exists(ref p) if p.ends_with(API_KEY)), "{err}");
        assert!(!dir.path().join(CA_CERT).exists(), "nothing is written when one file exists");
        assert_eq!(std::fs::read_to_string(dir.path().join(API_KEY)).unwrap(), "mine");
    }

    #[test]
    fn never_writes_through_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, dir.path().join(CA_KEY)).unwrap();
        let err = ClusterCerts::generate(DEFAULT_AGENT_NAME, 30).unwrap().write(dir.path()).unwrap_err();
        assert!(matches!(err, CertError::Exists(_)), "{err}");
        assert!(!target.exists());
        // Even when the link appears after the check: the exclusive create refuses it.
        let err = write_new(&dir.path().join(CA_KEY), b"secret", 0o600).unwrap_err();
        assert!(matches!(err, CertError::Exists(_)), "{err}");
        assert!(!target.exists());
    }

    #[test]
    fn the_agent_certificate_names_the_service_and_its_role() {
        let certs = ClusterCerts::generate("tasks.my-agent", 1).unwrap();
        let agent = pem_der(&certs.agent.cert_pem);
        let (_, agent) = x509_parser::parse_x509_certificate(&agent).unwrap();
        let sans = agent.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
        let names: Vec<String> = sans.iter().map(|n| n.to_string()).collect();
        assert!(names.contains(&"DNSName(tasks.my-agent)".to_string()), "{names:?}");
        assert!(names.contains(&format!("URI({AGENT_ROLE_URI})")), "{names:?}");
        let eku = agent.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);

        let api = pem_der(&certs.api.cert_pem);
        let (_, api) = x509_parser::parse_x509_certificate(&api).unwrap();
        let eku = api.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let days = (agent.validity().not_after.timestamp() - agent.validity().not_before.timestamp()) / 86_400;
        assert_eq!(days, 1, "one day plus the hour of slack");
    }

    #[test]
    fn bad_names_and_lifetimes_are_refused() {
        for bad in ["", "-agent", "a..b", "agent_1", "ünï", &"a".repeat(64)] {
            assert!(matches!(ClusterCerts::generate(bad, 30), Err(CertError::BadName(_))), "{bad:?}");
        }
        assert!(matches!(ClusterCerts::generate(DEFAULT_AGENT_NAME, 0), Err(CertError::BadDays(0))));
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
    }
}
