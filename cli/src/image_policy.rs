//! The image URL policy's flags, shared by `stratus controllers`, `stratus agent` and
//! `stratus up`.

use std::net::SocketAddr;

use stratus_image_cache::policy::{
    DEFAULT_MAX_BYTES, DEFAULT_MAX_REDIRECTS, DEFAULT_MAX_VIRTUAL_SIZE,
};
use stratus_image_cache::{HostRule, Policy};

/// What image downloads may fetch, and how much (see the README's "Image safety").
#[derive(Debug, Clone, clap::Args)]
pub struct ImagePolicyArgs {
    /// Hosts image URLs may name whatever addresses they resolve to (loopback, link-local,
    /// a control-plane host), as HOST or HOST:PORT, comma-separated; e.g. a local mirror.
    #[arg(long, value_delimiter = ',')]
    pub image_url_allow_hosts: Vec<HostRule>,
    /// Ports image URLs may name, comma-separated (default: any).
    #[arg(long, value_delimiter = ',')]
    pub image_url_allow_ports: Vec<u16>,
    /// Allow image URLs on loopback addresses (127.0.0.0/8, ::1).
    #[arg(long)]
    pub image_url_allow_loopback: bool,
    /// Allow image URLs on link-local addresses (169.254.0.0/16, fe80::/10).
    #[arg(long)]
    pub image_url_allow_link_local: bool,
    /// Allow image URLs on private addresses (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16,
    /// 100.64.0.0/10, fc00::/7), e.g. an image mirror on the cloud's own network. To open one
    /// mirror alone, name it in --image-url-allow-hosts instead.
    #[arg(long)]
    pub image_url_allow_private: bool,
    /// Allow `file:` image URLs (paths on the host that fetches).
    #[arg(long)]
    pub image_url_allow_file: bool,
    /// Control-plane addresses never fetched from, comma-separated (e.g. etcd's); the API
    /// server's own address is added by itself.
    #[arg(long, value_delimiter = ',')]
    pub image_url_deny_addresses: Vec<SocketAddr>,
    /// Redirects one image download may follow (each hop is checked like the first URL).
    #[arg(long, default_value_t = DEFAULT_MAX_REDIRECTS)]
    pub image_max_redirects: u32,
    /// MiB one image download may bring; a larger one is cut and removed.
    #[arg(long, default_value_t = DEFAULT_MAX_BYTES >> 20)]
    pub image_max_download_mib: u64,
    /// Largest virtual disk size, in GiB, an image may have.
    #[arg(long, default_value_t = DEFAULT_MAX_VIRTUAL_SIZE >> 30)]
    pub image_max_virtual_size_gib: u64,
}

impl ImagePolicyArgs {
    /// The policy, with `control_plane` (the API server's and etcd's addresses) refused.
    pub fn policy(&self, control_plane: impl IntoIterator<Item = SocketAddr>) -> Policy {
        let mut refused = self.image_url_deny_addresses.clone();
        refused.extend(control_plane);
        Policy {
            allow_file: self.image_url_allow_file,
            allow_hosts: self.image_url_allow_hosts.clone(),
            allow_ports: self.image_url_allow_ports.clone(),
            allow_loopback: self.image_url_allow_loopback,
            allow_link_local: self.image_url_allow_link_local,
            allow_private: self.image_url_allow_private,
            control_plane: refused,
            max_redirects: self.image_max_redirects,
            max_bytes: self.image_max_download_mib.saturating_mul(1 << 20),
            max_virtual_size: self.image_max_virtual_size_gib.saturating_mul(1 << 30),
        }
    }
}

/// The addresses of the API server `config` talks to (refused as image sources).
pub async fn api_server_addrs(config: &kube::Config) -> Vec<SocketAddr> {
    let url = &config.cluster_url;
    let Some(host) = url.host() else {
        return Vec::new();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url
        .port_u16()
        .unwrap_or(if url.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => addrs.collect(),
        Err(e) => {
            tracing::warn!(host, error = %e, "cannot resolve the API server's address to refuse it as an image source");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        images: ImagePolicyArgs,
    }

    #[test]
    fn defaults_are_the_policys() {
        let cli = Cli::try_parse_from(["x"]).expect("no flags");
        assert_eq!(cli.images.policy([]), Policy::default());
    }

    #[test]
    fn flags_make_the_policy() {
        let cli = Cli::try_parse_from([
            "x",
            "--image-url-allow-hosts",
            "127.0.0.1:8099,mirror.example",
            "--image-url-allow-ports",
            "80,443",
            "--image-url-allow-loopback",
            "--image-url-allow-link-local",
            "--image-url-allow-private",
            "--image-url-allow-file",
            "--image-url-deny-addresses",
            "10.0.0.5:2379",
            "--image-max-redirects",
            "1",
            "--image-max-download-mib",
            "2",
            "--image-max-virtual-size-gib",
            "3",
        ])
        .expect("flags");
        let api: SocketAddr = "127.0.0.1:6443".parse().expect("addr");
        let p = cli.images.policy([api]);
        assert_eq!(
            p.allow_hosts,
            vec![
                "127.0.0.1:8099".parse::<HostRule>().expect("rule"),
                "mirror.example".parse().expect("rule")
            ]
        );
        assert_eq!(p.allow_ports, [80, 443]);
        assert!(p.allow_loopback && p.allow_link_local && p.allow_private && p.allow_file);
        assert_eq!(
            p.control_plane,
            ["10.0.0.5:2379".parse().expect("addr"), api]
        );
        assert_eq!(
            (p.max_redirects, p.max_bytes, p.max_virtual_size),
            (1, 2 << 20, 3 << 30)
        );
        assert!(Cli::try_parse_from(["x", "--image-url-allow-hosts", "a b"]).is_err());
    }
}
