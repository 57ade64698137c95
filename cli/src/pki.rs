//! `stratus pki`: certificates an operator issues from the cloud's CAs that `stratus up` keeps.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};

/// What `stratus pki` issues.
#[derive(Debug, clap::Subcommand)]
pub enum PkiCommand {
    /// Issue node NAME's certificate for volume exports over NBD, from the cloud's NBD CA:
    /// the storage agent's --nbd-tls-dir on a storage node, and libvirtd's
    /// nbd_tls_x509_cert_dir (qemu.conf) on a compute node. Its CN is `system:node:NAME`; a
    /// storage node's export is read only by the node it is attached to.
    NbdNode(NbdNodeArgs),
}

/// Options of `stratus pki nbd-node`.
#[derive(Debug, clap::Args)]
pub struct NbdNodeArgs {
    /// The node's name, as its agents are started with (`stratus agent --node`).
    pub name: String,
    /// A storage address of the node (its `stratus agent --storage-address`): compute nodes
    /// check the storage node's certificate names the address they connect to. Repeatable;
    /// none for a node that only attaches volumes.
    #[arg(long = "address", value_name = "IP")]
    pub addresses: Vec<IpAddr>,
    /// The NBD CA's directory: `pki/nbd` in `stratus up`'s data directory.
    #[arg(long, value_name = "DIR", default_value = ".stratus/pki/nbd")]
    pub ca_dir: PathBuf,
    /// Where the node's files go (made 0700; keys 0600): ca-cert.pem, server-cert.pem,
    /// server-key.pem, client-cert.pem, client-key.pem. Copy it to the node.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Runs `stratus pki`.
///
/// # Errors
/// A name that is no node name, no CA where said, files that cannot be written.
pub fn run(cmd: PkiCommand) -> Result<()> {
    match cmd {
        PkiCommand::NbdNode(a) => {
            stratus_apiserver::http::nbd_pki::issue_node(&a.ca_dir, &a.name, &a.addresses, &a.out)
                .with_context(|| format!("issue node {:?}'s NBD certificate", a.name))?;
            eprintln!(
                "{}: node {}'s NBD certificate (CN {})",
                a.out.display(),
                a.name,
                stratus_apiserver::http::nbd_pki::node_identity(&a.name)
            );
            Ok(())
        }
    }
}

/// A volume served by the storage agent's own `qemu-nbd` command line over TLS, read by a real
/// QEMU client (`qemu-io`) with certificates `stratus pki nbd-node` issues: the attaching
/// node's certificate reads it; another node's of the same CA, one of another CA, and a
/// client without TLS are refused.
#[cfg(test)]
mod host_tests {
    use std::net::{Ipv4Addr, TcpListener};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use stratus_apiserver::http::nbd_pki::{ensure_ca, issue_node};
    use stratus_storage_agent::export::Record;

    /// An address of this test alone: nothing else listens on it.
    const STORAGE: Ipv4Addr = Ipv4Addr::new(127, 88, 16, 1);

    /// A directory of the test's own, removed however the test ends.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The test's `qemu-nbd`, stopped however the test ends.
    struct Served(Child);

    impl Drop for Served {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// `qemu-io` reading the first 4 KiB of the export, expecting pattern 0x5a, with the
    /// client certificates in `certs` (none: without TLS). What it printed.
    fn read(port: u16, certs: Option<&Path>) -> String {
        let mut cmd = Command::new("timeout");
        cmd.args(["120", "qemu-io", "-r"]);
        let mut opts = format!(
            "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={STORAGE},file.server.port={port},file.export=vol"
        );
        if let Some(dir) = certs {
            cmd.arg("--object").arg(format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                dir.display()
            ));
            opts.push_str(",file.tls-creds=tls0");
        }
        cmd.args(["--image-opts", &opts, "-c", "read -P 0x5a 0 4k"]);
        let out = cmd.output().expect("run qemu-io");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    #[test]
    fn only_the_attaching_nodes_certificate_reads_an_export() {
        let dir =
            Scratch(std::env::temp_dir().join(format!("stratus-nbd-tls-{}", std::process::id())));
        let d = &dir.0;
        std::fs::create_dir_all(d).expect("a directory");
        let ca = d.join("ca");
        ensure_ca(&ca).expect("the NBD CA");
        issue_node(&ca, "n1", &[STORAGE.into()], &d.join("n1")).expect("the storage node's");
        issue_node(&ca, "n2", &[], &d.join("n2")).expect("the attaching node's");
        issue_node(&ca, "n3", &[], &d.join("n3")).expect("another node's");
        let other = d.join("other-ca");
        ensure_ca(&other).expect("another CA");
        issue_node(&other, "n2", &[], &d.join("n2-other")).expect("n2 of another CA");
        // Trusting the storage node's CA too (QEMU checks its own certificate against its CA
        // file). Both CAs are named alike, so the chain fails wherever it is checked.
        let both = [ca.join("ca-cert.pem"), other.join("ca-cert.pem")]
            .iter()
            .map(|p| std::fs::read_to_string(p).expect("a CA"))
            .collect::<String>();
        std::fs::write(d.join("n2-other/ca-cert.pem"), both).expect("written");

        let device = d.join("volume.raw");
        let mut data = vec![0x5au8; 4096];
        data.resize(1 << 20, 0);
        std::fs::write(&device, data).expect("a volume");
        let port = TcpListener::bind((STORAGE, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let record = Record {
            export: "v.n2".into(),
            volume: "v".into(),
            device,
            node: "n2".into(),
            peer: Ipv4Addr::LOCALHOST.into(),
            host: STORAGE.into(),
            port,
            name: "vol".into(),
            pid: 0,
            clients: 1,
            tls: Some(d.join("n1")),
            size: 1 << 20,
            grown: false,
        };
        let pid_file = d.join("qemu-nbd.pid");
        let argv = record.argv(&pid_file);
        let _served = Served(
            Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("qemu-nbd.log")).expect("a log"))
                .spawn()
                .expect("start qemu-nbd"),
        );
        // Its pid file is written once it listens.
        let until = Instant::now() + Duration::from_secs(60);
        while !std::fs::metadata(&pid_file).is_ok_and(|m| m.len() > 0) {
            assert!(
                Instant::now() < until,
                "qemu-nbd is not listening: {}",
                std::fs::read_to_string(d.join("qemu-nbd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }

        let ok = read(port, Some(&d.join("n2")));
        assert!(
            ok.contains("read 4096/4096 bytes"),
            "n2 could not read: {ok}"
        );
        assert!(!ok.contains("Pattern verification failed"), "{ok}");
        for (who, certs) in [
            ("another node of the same CA", Some(d.join("n3"))),
            ("n2's name from another CA", Some(d.join("n2-other"))),
            ("a client without TLS", None),
        ] {
            let out = read(port, certs.as_deref());
            assert!(
                !out.contains("read 4096/4096 bytes"),
                "{who} read the volume: {out}"
            );
            assert!(
                out.contains("Could not open") || out.contains("can't open"),
                "{who}: {out}"
            );
        }
        // And the attaching node still reads it after those were refused.
        let again = read(port, Some(&d.join("n2")));
        assert!(again.contains("read 4096/4096 bytes"), "{again}");
    }
}
