//! Signed links: what lets a browser, an `<img>` tag or a link checker open one file URL without the API
//! key, as S3's presigned URLs do. A link carries an expiry and an HMAC-SHA256 signature, made with the
//! server's secret, over the owner it was made for, its expiry and the resource path; nothing else is
//! granted by it. The owner is not in the link: the one who checks tries every owner the server knows
//! (one per configured key), so a link leaks nothing of its key, and removing a key revokes its links.
//!
//! The secret is configured, or made once and kept in `<state-dir>/url-signing-secret`, a file only the
//! service writes (created `O_CREAT|O_EXCL|O_NOFOLLOW`, 0600, through a temporary file linked into place
//! so a crash never leaves half a secret; read `O_NOFOLLOW`, a regular file of at most 4 KiB, refused when
//! other users may read it). Changing the secret revokes every link at once.
//!
//! Checks are constant-time: [`UrlSigner::check`] answers a [`subtle::Choice`], never a `bool` made by
//! `==`, and [`UrlSigner::owner_of`] checks every candidate whatever matched.
//!
//! Must not touch: HTTP (the middleware and the URLs' shapes are `api::signed`'s), sessions, the file store.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use ring::hmac;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::session::Owner;

/// The secret's file in the state directory.
pub const SECRET_FILE: &str = "url-signing-secret";
/// The shortest secret accepted, in bytes.
pub const MIN_SECRET: usize = 32;
/// The largest secret file read back.
const MAX_SECRET_FILE: u64 = 4096;
/// What the signed message starts with, so that these signatures can never be mistaken for another use
/// of the same key.
const DOMAIN: &str = "kernelbox signed link v1";

/// Why the secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

/// Makes and checks link signatures with the server's secret.
pub struct UrlSigner {
    key: hmac::Key,
    /// The longest a link lives, whatever it points to.
    max_lifetime: Duration,
}

impl UrlSigner {
    pub fn new(secret: &[u8], max_lifetime: Duration) -> Self {
        UrlSigner { key: hmac::Key::new(hmac::HMAC_SHA256, secret), max_lifetime }
    }

    /// When a link made at `now` expires for something that lives until `not_after` (seconds since the
    /// epoch): the configured maximum from now, never later than the thing itself.
    pub fn expiry(&self, now: i64, not_after: i64) -> i64 {
        let max = i64::try_from(self.max_lifetime.as_secs()).unwrap_or(i64::MAX);
        now.saturating_add(max).min(not_after)
    }

    /// The signature (unpadded base64url, 43 characters) of a link to `path` for `owner` until `expires`.
    pub fn sign(&self, owner: &Owner, path: &str, expires: i64) -> String {
        let tag = hmac::sign(&self.key, &message(owner, path, expires));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
    }

    /// Whether `signature` is `owner`'s for `path` until `expires`, compared in constant time. (Its
    /// format and length are not secret: one that does not decode to 32 bytes fails at once.)
    pub fn check(&self, owner: &Owner, path: &str, expires: i64, signature: &str) -> subtle::Choice {
        let Ok(presented) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(signature) else {
            return subtle::Choice::from(0);
        };
        let expected = hmac::sign(&self.key, &message(owner, path, expires));
        if presented.len() != expected.as_ref().len() {
            return subtle::Choice::from(0);
        }
        expected.as_ref().ct_eq(&presented)
    }

    /// The owner among `owners` whose link this is, if any. Every candidate is checked, so the time it
    /// takes does not say which one matched or how far the signature was right.
    pub fn owner_of<'a>(&self, owners: &'a [Owner], path: &str, expires: i64, signature: &str) -> Option<&'a Owner> {
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, owner) in owners.iter().enumerate() {
            let matched = self.check(owner, path, expires, signature);
            index.conditional_assign(&(i as u64), matched);
            found |= matched;
        }
        bool::from(found).then(|| &owners[index as usize])
    }
}

/// What is signed: the purpose, the method (links only ever read), the owner, the expiry and the path.
/// Owners are digests or `anonymous` and expiries digits, so the fields cannot run into each other.
fn message(owner: &Owner, path: &str, expires: i64) -> Vec<u8> {
    format!("{DOMAIN}\nGET\n{}\n{expires}\n{path}", owner.0).into_bytes()
}

/// A configured secret, checked: at least [`MIN_SECRET`] bytes once trimmed.
pub fn configured_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let secret = secret.trim();
    if secret.len() < MIN_SECRET {
        return Err(SecretError::Invalid(format!(
            "the signed-URL secret must be at least {MIN_SECRET} bytes (e.g. `openssl rand -hex 32`)"
        )));
    }
    Ok(secret.as_bytes().to_vec())
}

/// The secret kept in `state_dir`, made (64 random hex digits) if there is none yet.
pub fn state_secret(state_dir: &Path) -> Result<Vec<u8>, SecretError> {
    let path = state_dir.join(SECRET_FILE);
    let io = |source| SecretError::Io { path: path.clone(), source };
    match std::fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(state_dir, &path).map_err(io)?,
        Err(e) => return Err(io(e)),
    }
    read(&path)
}

/// Writes a new secret under a temporary name and links it into place (a link never replaces a file, so
/// a secret someone else made first is kept).
fn create(state_dir: &Path, path: &Path) -> std::io::Result<()> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| std::io::Error::other("the system's random number generator failed"))?;
    let tmp = state_dir.join(format!(".{SECRET_FILE}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        file.write_all(format!("{}\n", hex::encode(bytes)).as_bytes())?;
        file.sync_all()?;
        match std::fs::hard_link(&tmp, path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    written
}

fn read(path: &Path) -> Result<Vec<u8>, SecretError> {
    let io = |source| SecretError::Io { path: path.to_owned(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let refuse = |why: &str| SecretError::Invalid(format!("{}: {why}", path.display()));
    if !meta.is_file() {
        return Err(refuse("not a regular file"));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(refuse("other users may read it; make it readable by the service only (chmod 600)"));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(refuse("larger than 4 KiB: not a secret this service made"));
    }
    let mut text = String::new();
    file.take(MAX_SECRET_FILE).read_to_string(&mut text).map_err(io)?;
    configured_secret(&text).map_err(|_| refuse("shorter than 32 bytes: remove it and a new one is made"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const NOW: i64 = 1_800_000_000;
    const PATH: &str = "/jupyter/files/data-0123456789ab-1800001200.csv";

    fn signer() -> UrlSigner {
        UrlSigner::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(3600))
    }

    fn alice() -> Owner {
        Owner("a1b2c3d4e5f60718".into())
    }

    #[test]
    fn a_signature_holds_for_its_owner_path_and_expiry_only() {
        let s = signer();
        let sig = s.sign(&alice(), PATH, NOW + 60);
        assert_eq!(sig.len(), 43);
        assert!(bool::from(s.check(&alice(), PATH, NOW + 60, &sig)));
        // Another path, another expiry, another owner, another secret: refused.
        assert!(!bool::from(s.check(&alice(), "/jupyter/files/other-0123456789ab-1800001200.csv", NOW + 60, &sig)));
        assert!(!bool::from(s.check(&alice(), PATH, NOW + 61, &sig)));
        assert!(!bool::from(s.check(&Owner("anonymous".into()), PATH, NOW + 60, &sig)));
        let other = UrlSigner::new(b"another secret of at least 32 bytes", Duration::from_secs(3600));
        assert!(!bool::from(other.check(&alice(), PATH, NOW + 60, &sig)));
    }

    #[test]
    fn tampered_signatures_are_refused_whatever_their_shape() {
        let s = signer();
        let sig = s.sign(&alice(), PATH, NOW + 60);
        let mut flipped = sig.clone().into_bytes();
        flipped[42] = if flipped[42] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        for bad in [flipped.as_str(), &sig[..42], &format!("{sig}A"), "", "!!!!", &sig.to_uppercase()] {
            assert!(!bool::from(s.check(&alice(), PATH, NOW + 60, bad)), "{bad}");
        }
    }

    #[test]
    fn the_owner_is_found_among_all_and_no_other() {
        let s = signer();
        let owners = [Owner("anonymous".into()), Owner("00ff00ff00ff00ff".into()), alice()];
        let sig = s.sign(&alice(), PATH, NOW + 60);
        assert_eq!(s.owner_of(&owners, PATH, NOW + 60, &sig), Some(&alice()));
        assert_eq!(s.owner_of(&owners[..2], PATH, NOW + 60, &sig), None, "a removed key's links stop working");
        assert_eq!(s.owner_of(&owners, PATH, NOW + 61, &sig), None);
        assert_eq!(s.owner_of(&[], PATH, NOW + 60, &sig), None);
    }

    #[test]
    fn a_link_lives_the_configured_maximum_and_never_longer_than_its_file() {
        let s = signer();
        assert_eq!(s.expiry(NOW, NOW + 1200), NOW + 1200, "a 20-minute file");
        assert_eq!(s.expiry(NOW, NOW + 2 * 86400), NOW + 3600, "a 2-day file: the maximum");
        assert_eq!(UrlSigner::new(b"k", Duration::MAX).expiry(NOW, NOW + 5), NOW + 5);
    }

    #[test]
    fn configured_secrets_must_be_long_enough() {
        assert!(configured_secret("short").is_err());
        assert!(configured_secret(&format!("  {}  ", "x".repeat(31))).is_err());
        assert_eq!(configured_secret(&"x".repeat(32)).unwrap(), b"x".repeat(32));
    }

    #[test]
    fn the_state_secret_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = state_secret(dir.path()).unwrap();
        assert_eq!(first.len(), 64, "64 hex digits");
        let path = dir.path().join(SECRET_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(state_secret(dir.path()).unwrap(), first, "kept across restarts");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, [SECRET_FILE], "no temporary file left");

        // Readable by others, too short, too long: refused, never used.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(state_secret(dir.path()), Err(SecretError::Invalid(_))));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "short").unwrap();
        assert!(matches!(state_secret(dir.path()), Err(SecretError::Invalid(_))));
        std::fs::write(&path, "x".repeat(5000)).unwrap();
        assert!(matches!(state_secret(dir.path()), Err(SecretError::Invalid(_))));
    }

    #[test]
    fn a_link_planted_in_place_of_the_secret_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "y".repeat(64)).unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(SECRET_FILE)).unwrap();
        assert!(state_secret(dir.path()).is_err(), "O_NOFOLLOW: a symlink is refused");
        // A dangling link is not replaced or written through either.
        std::fs::remove_file(&elsewhere).unwrap();
        assert!(state_secret(dir.path()).is_err());
        assert!(!elsewhere.exists(), "nothing written through the link");
    }
}
