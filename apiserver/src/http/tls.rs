//! TLS: the cluster CA and serving certificate `stratus up` makes, etcd's own CA and
//! certificates, and the server's acceptor.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio_rustls::TlsAcceptor;

/// Where the PKI files are.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate clients trust (PEM).
    pub ca_cert: PathBuf,
    /// The serving certificate (PEM).
    pub server_cert: PathBuf,
    /// The serving key (PEM, mode 0600).
    pub server_key: PathBuf,
}

pub(super) fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

pub(super) fn write_private(path: &Path, data: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data.as_bytes())
}

/// Makes a CA and a serving certificate for `hosts` (names or IPs) in `dir`, unless they exist.
pub fn ensure_pki(dir: &Path, hosts: &[String]) -> io::Result<Pki> {
    std::fs::create_dir_all(dir)?;
    let pki = Pki {
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("apiserver.crt"),
        server_key: dir.join("apiserver.key"),
    };
    if pki.ca_cert.exists() && pki.server_cert.exists() && pki.server_key.exists() {
        return Ok(pki);
    }
    let ca_key = KeyPair::generate().map_err(other)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "stratus-ca");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(other)?;

    let key = KeyPair::generate().map_err(other)?;
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(other)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "stratus-apiserver");
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = params.signed_by(&key, &ca).map_err(other)?;

    std::fs::write(&pki.ca_cert, ca.pem())?;
    std::fs::write(&pki.server_cert, cert.pem())?;
    write_private(&pki.server_key, &key.serialize_pem())?;
    Ok(pki)
}

/// etcd's PKI: a CA of its own (as kubeadm's `pki/etcd/ca.crt`), so that no certificate
/// the cloud's CA signs (the API server's, and any client certificate it may sign later) is
/// accepted by etcd, and etcd's client certificates are good for nothing but etcd.
#[derive(Debug, Clone)]
pub struct EtcdPki {
    /// The etcd CA certificate (PEM): etcd trusts clients and peers it signed, clients trust
    /// etcd's serving certificate through it.
    pub ca_cert: PathBuf,
    /// etcd's serving certificate (PEM; 127.0.0.1 and localhost).
    pub server_cert: PathBuf,
    /// etcd's serving key (PEM, mode 0600).
    pub server_key: PathBuf,
    /// etcd's peer certificate, both server and client of other members (PEM).
    pub peer_cert: PathBuf,
    /// etcd's peer key (PEM, mode 0600).
    pub peer_key: PathBuf,
    /// The API server's client certificate for etcd (PEM; CN `stratus-apiserver-etcd-client`).
    pub client_cert: PathBuf,
    /// The API server's client key (PEM, mode 0600).
    pub client_key: PathBuf,
}

impl EtcdPki {
    /// How the API server reaches this etcd.
    pub fn client_tls(&self) -> crate::storage::etcd::EtcdTls {
        crate::storage::etcd::EtcdTls {
            ca_file: self.ca_cert.clone(),
            client: Some((self.client_cert.clone(), self.client_key.clone())),
        }
    }

    fn files(&self) -> [&Path; 7] {
        [
            &self.ca_cert,
            &self.server_cert,
            &self.server_key,
            &self.peer_cert,
            &self.peer_key,
            &self.client_cert,
            &self.client_key,
        ]
    }
}

/// Makes etcd's CA, serving, peer and client certificates in `dir` (made 0700), unless they all
/// exist. Keys are written 0600. The CA's key is not kept: to issue more, make them all anew.
pub fn ensure_etcd_pki(dir: &Path) -> io::Result<EtcdPki> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let pki = EtcdPki {
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        peer_cert: dir.join("peer.crt"),
        peer_key: dir.join("peer.key"),
        client_cert: dir.join("apiserver-etcd-client.crt"),
        client_key: dir.join("apiserver-etcd-client.key"),
    };
    if pki.files().iter().all(|f| f.exists()) {
        return Ok(pki);
    }
    let ca_key = KeyPair::generate().map_err(other)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "stratus-etcd-ca");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(other)?;
    let hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    // etcd uses its serving certificate as a client too (its gRPC gateway dials itself), and a
    // peer certificate both ways: both carry server and client usages, as kubeadm's do.
    let both = [
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let issue = |cn: &str,
                 hosts: Vec<String>,
                 usages: &[ExtendedKeyUsagePurpose],
                 cert: &Path,
                 key: &Path|
     -> io::Result<()> {
        let pair = KeyPair::generate().map_err(other)?;
        let mut params = CertificateParams::new(hosts).map_err(other)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = usages.to_vec();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let signed = params.signed_by(&pair, &ca).map_err(other)?;
        write_private(key, &pair.serialize_pem())?;
        std::fs::write(cert, signed.pem())
    };
    issue(
        "stratus-etcd",
        hosts.clone(),
        &both,
        &pki.server_cert,
        &pki.server_key,
    )?;
    issue(
        "stratus-etcd-peer",
        hosts,
        &both,
        &pki.peer_cert,
        &pki.peer_key,
    )?;
    issue(
        "stratus-apiserver-etcd-client",
        Vec::new(),
        &[ExtendedKeyUsagePurpose::ClientAuth],
        &pki.client_cert,
        &pki.client_key,
    )?;
    // The CA last: its presence with the others is what makes a later start reuse them.
    std::fs::write(&pki.ca_cert, ca.pem())?;
    Ok(pki)
}

/// A TLS acceptor serving the given certificate chain and key, offering HTTP/2 and HTTP/1.1.
pub fn acceptor(cert: &Path, key: &Path) -> io::Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut io::BufReader::new(std::fs::File::open(cert)?))
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut io::BufReader::new(std::fs::File::open(key)?))?
        .ok_or_else(|| other("no private key in the key file"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(other)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// What the PKI tests (this module's and the NBD PKI's) check files and chains with.
#[cfg(test)]
pub(super) mod check {
    use std::io;
    use std::path::Path;
    use std::sync::Arc;

    /// The permission bits of `p`.
    pub fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    /// The first certificate of PEM file `p`.
    pub fn der(p: &Path) -> rustls::pki_types::CertificateDer<'static> {
        let pem = std::fs::read(p).expect("read");
        rustls_pemfile::certs(&mut io::BufReader::new(&pem[..]))
            .next()
            .expect("a certificate")
            .expect("pem")
    }

    /// A verifier of client certificates trusting CA certificate file `ca` alone.
    pub fn verifier(ca: &Path) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(ca)).expect("root");
        rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier")
    }
}

#[cfg(test)]
mod tests {
    use super::check::{der, mode, verifier};
    use super::*;

    #[test]
    fn etcd_keys_are_private_and_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki/etcd");
        let pki = ensure_etcd_pki(&dir).expect("pki");
        assert_eq!(mode(&dir), 0o700);
        for key in [&pki.server_key, &pki.peer_key, &pki.client_key] {
            assert_eq!(mode(key), 0o600, "{}", key.display());
        }
        let ca = std::fs::read(&pki.ca_cert).expect("ca");
        let again = ensure_etcd_pki(&dir).expect("pki again");
        assert_eq!(std::fs::read(&again.ca_cert).expect("ca"), ca, "kept");
        // A missing file makes them all anew, signed by a new CA.
        std::fs::remove_file(&pki.peer_key).expect("remove");
        ensure_etcd_pki(&dir).expect("pki anew");
        assert_ne!(std::fs::read(&pki.ca_cert).expect("ca"), ca);
        assert_eq!(mode(&pki.peer_key), 0o600);
    }

    #[test]
    fn etcd_certificates_chain_to_the_etcd_ca_not_the_clouds() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cloud = ensure_pki(&tmp.path().join("pki"), &["127.0.0.1".into()]).expect("cloud");
        let etcd = ensure_etcd_pki(&tmp.path().join("pki/etcd")).expect("etcd");
        let now = rustls::pki_types::UnixTime::now();
        let client = der(&etcd.client_cert);
        assert!(
            verifier(&etcd.ca_cert)
                .verify_client_cert(&client, &[], now)
                .is_ok()
        );
        assert!(
            verifier(&cloud.ca_cert)
                .verify_client_cert(&client, &[], now)
                .is_err()
        );
        let server = der(&cloud.server_cert);
        assert!(
            verifier(&etcd.ca_cert)
                .verify_client_cert(&server, &[], now)
                .is_err()
        );
    }
}
