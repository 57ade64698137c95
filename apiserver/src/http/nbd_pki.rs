//! The NBD PKI: a CA of its own (as etcd's), whose certificates are good for volume exports
//! alone, and each node's certificate for them, in the files QEMU's `tls-creds-x509` reads.
//!
//! `stratus up` makes the CA (`pki/nbd/ca-cert.pem`, and its key `ca-key.pem`, 0600, kept so
//! that an operator can issue more); `stratus pki nbd-node NAME` issues a node's certificate.
//! A node's certificate has CN `system:node:NAME` (as a node's identity is spelled to the
//! API), is both server (its storage agent's `qemu-nbd`) and client (its guests' QEMU), and
//! names the node's storage addresses, which QEMU's NBD client checks the server against. The
//! storage agent lets only the attaching node's DN ([`node_dn`]) read an export.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::tls::{other, write_private};

/// The CA certificate, in a CA's directory and in every node's (QEMU's name for it).
pub const CA_CERT: &str = "ca-cert.pem";
/// The CA's key, in the CA's directory alone.
pub const CA_KEY: &str = "ca-key.pem";
/// A node's certificate and key as a server (QEMU's names).
pub const SERVER: [&str; 2] = ["server-cert.pem", "server-key.pem"];
/// The same certificate and key as a client (QEMU's names).
pub const CLIENT: [&str; 2] = ["client-cert.pem", "client-key.pem"];

/// The longest node name (a DNS subdomain).
const MAX_NAME: usize = 253;

/// The CN of node `node`'s certificate.
pub fn node_identity(node: &str) -> String {
    format!("system:node:{node}")
}

/// The DN of node `node`'s certificate as QEMU (GnuTLS, RFC 4514) spells it in an
/// `authz-simple` identity.
pub fn node_dn(node: &str) -> String {
    stratus_api_types::storage::nbd_node_dn(node)
}

/// Why `node` cannot be named in a certificate: node names are DNS subdomains (lower-case
/// letters, digits, `-` and `.`), so a DN made of one needs no escaping anywhere.
pub fn check_node(node: &str) -> Result<(), String> {
    let ok = !node.is_empty()
        && node.len() <= MAX_NAME
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !node.starts_with(['-', '.'])
        && !node.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{node:?} is not a node name (lower-case letters, digits, '-' and '.', at most {MAX_NAME})"
        ))
    }
}

/// Makes `dir` (and its parents) with mode 0700, closing an older open one.
fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The CA's parameters: the same at every issue, so a certificate issued later with the kept
/// key names the CA certificate made first as its issuer.
fn ca_params() -> io::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name
        .push(DnType::CommonName, "stratus-nbd-ca");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok(p)
}

/// Makes the NBD CA in `dir` (made 0700) unless its certificate and key are there; returns
/// the CA certificate's path. The key is written 0600.
///
/// # Errors
/// The directory or files cannot be written.
pub fn ensure_ca(dir: &Path) -> io::Result<PathBuf> {
    private_dir(dir)?;
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if cert.exists() && key.exists() {
        return Ok(cert);
    }
    let pair = KeyPair::generate().map_err(other)?;
    let ca = ca_params()?.self_signed(&pair).map_err(other)?;
    write_private(&key, &pair.serialize_pem())?;
    // The certificate last: with the key, it is what a later start keeps.
    std::fs::write(&cert, ca.pem())?;
    Ok(cert)
}

/// Issues node `node`'s certificate, signed by the CA in `ca_dir` and naming `addresses`
/// (the storage addresses other nodes connect to; none for a node that only attaches), into
/// `out` (made 0700): the CA certificate, and one certificate and key under both QEMU's server
/// and client names (keys 0600). Files already in `out` are replaced.
///
/// # Errors
/// A name that is no node name, a CA directory without the CA's certificate or key, or
/// files that cannot be read or written.
pub fn issue_node(ca_dir: &Path, node: &str, addresses: &[IpAddr], out: &Path) -> io::Result<()> {
    check_node(node).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let read = |name: &str| {
        let p = ca_dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: {e} (the NBD CA is made by stratus up)", p.display()),
            )
        })
    };
    let ca_pem = read(CA_CERT)?;
    let ca_key = KeyPair::from_pem(&read(CA_KEY)?).map_err(other)?;
    let issuer = Issuer::new(ca_params()?, ca_key);

    let pair = KeyPair::generate().map_err(other)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
    p.distinguished_name
        .push(DnType::CommonName, node_identity(node));
    p.subject_alt_names = addresses.iter().map(|a| SanType::IpAddress(*a)).collect();
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = p.signed_by(&pair, &issuer).map_err(other)?;

    private_dir(out)?;
    let key = pair.serialize_pem();
    for [c, k] in [SERVER, CLIENT] {
        // Made anew, so that an older key file's wider mode does not carry over.
        let _ = std::fs::remove_file(out.join(k));
        write_private(&out.join(k), &key)?;
        std::fs::write(out.join(c), cert.pem())?;
    }
    std::fs::write(out.join(CA_CERT), ca_pem)
}

#[cfg(test)]
mod tests {
    use super::super::tls::check::{der, mode, verifier};
    use super::*;

    #[test]
    fn the_ca_key_is_private_and_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki/nbd");
        let cert = ensure_ca(&dir).expect("ca");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
        let first = std::fs::read(&cert).expect("ca");
        ensure_ca(&dir).expect("again");
        assert_eq!(std::fs::read(&cert).expect("ca"), first, "kept");
    }

    #[test]
    fn a_nodes_certificate_is_in_qemus_files_and_chains_to_the_nbd_ca_alone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = tmp.path().join("pki/nbd");
        ensure_ca(&ca).expect("ca");
        let cloud = super::super::tls::ensure_pki(&tmp.path().join("pki"), &["127.0.0.1".into()])
            .expect("cloud ca");
        let out = tmp.path().join("node-b");
        issue_node(&ca, "node-b", &["10.0.0.2".parse().expect("ip")], &out).expect("issued");
        assert_eq!(mode(&out), 0o700);
        for [c, k] in [SERVER, CLIENT] {
            assert_eq!(mode(&out.join(k)), 0o600, "{k}");
            assert!(out.join(c).exists(), "{c}");
        }
        assert_eq!(
            std::fs::read(out.join(CA_CERT)).expect("ca"),
            std::fs::read(ca.join(CA_CERT)).expect("ca")
        );
        // Issued later with the kept key, it chains to the CA certificate made first.
        let now = rustls::pki_types::UnixTime::now();
        let node = der(&out.join(CLIENT[0]));
        assert!(
            verifier(&ca.join(CA_CERT))
                .verify_client_cert(&node, &[], now)
                .is_ok()
        );
        assert!(
            verifier(&cloud.ca_cert)
                .verify_client_cert(&node, &[], now)
                .is_err(),
            "the cloud's CA does not vouch for an NBD certificate"
        );
        assert!(
            verifier(&ca.join(CA_CERT))
                .verify_client_cert(&der(&cloud.server_cert), &[], now)
                .is_err(),
            "the NBD CA does not vouch for the API server's certificate"
        );
    }

    #[test]
    fn only_node_names_are_issued() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = tmp.path().join("ca");
        ensure_ca(&ca).expect("ca");
        for bad in [
            "",
            "a,b",
            "n1,,O=x",
            "N1",
            "a b",
            "-a",
            "a.",
            "x=y",
            &"a".repeat(254),
        ] {
            let out = tmp.path().join("out");
            let e = issue_node(&ca, bad, &[], &out).expect_err(bad);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}: {e}");
            assert!(!out.exists(), "{bad:?}: something was written");
        }
        assert_eq!(node_dn("n1.example"), "CN=system:node:n1.example");
        let e = issue_node(&tmp.path().join("none"), "n1", &[], &tmp.path().join("o"))
            .expect_err("no ca");
        assert!(e.to_string().contains("stratus up"), "{e}");
    }
}
