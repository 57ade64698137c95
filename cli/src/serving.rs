//! The API server's limits and login throttling, as `stratus apiserver` and `stratus up` take
//! them (kube-apiserver's names where it has the same setting).

use std::time::Duration;

use stratus_apiserver::Config;

/// Limits on what clients may hold, and failed-login throttling.
#[derive(Debug, Clone, clap::Args)]
pub struct ServingArgs {
    /// Seconds a request other than a watch may take before it is answered 504.
    #[arg(long, default_value_t = 60)]
    pub request_timeout_seconds: u64,
    /// Read-only requests served at once (watches not counted); more are answered 429.
    #[arg(long, default_value_t = 400)]
    pub max_requests_inflight: usize,
    /// Mutating requests served at once; more are answered 429.
    #[arg(long, default_value_t = 200)]
    pub max_mutating_requests_inflight: usize,
    /// Watches one identity may hold open at once; more are answered 429.
    #[arg(long, default_value_t = 200)]
    pub max_watches_per_user: usize,
    /// Watches one node identity (`system:node:NAME`) may hold open at once; more are
    /// answered 429. A node's agents watch each network, subnet list, port list and
    /// security group of its ports one by one.
    #[arg(long, default_value_t = 2000)]
    pub max_watches_per_node: usize,
    /// Connections held open at once; more wait in the listen backlog.
    #[arg(long, default_value_t = 2048)]
    pub max_connections: usize,
    /// Seconds a client may take to send a request's headers.
    #[arg(long, default_value_t = 10)]
    pub header_read_timeout_seconds: u64,
    /// Seconds a TLS handshake may take.
    #[arg(long, default_value_t = 10)]
    pub tls_handshake_timeout_seconds: u64,
    /// Seconds a connection may stay open with no request.
    #[arg(long, default_value_t = 90)]
    pub idle_timeout_seconds: u64,
    /// Image data uploads and downloads (`images/NAME/data`) served at once, apart from the
    /// in-flight limits; more are answered 429.
    #[arg(long, default_value_t = 16)]
    pub max_image_transfers: usize,
    /// The slowest an image upload or download may be, in KiB/s averaged over
    /// `--image-transfer-window-seconds`; a slower one is cut off (0: no minimum).
    #[arg(long, default_value_t = 32)]
    pub image_min_transfer_kib_per_second: u64,
    /// The window `--image-min-transfer-kib-per-second` is averaged over, in seconds.
    #[arg(long, default_value_t = 60)]
    pub image_transfer_window_seconds: u64,
    /// MiB of image uploads staged on the server's disk at once, in all (each is kept whole
    /// until inspected and stored); past it, uploads are answered 429, and one larger than it
    /// 507.
    #[arg(long, default_value_t = 16384)]
    pub image_staging_max_mib: u64,
    /// Failed logins in a row from one source (an IPv4 address or an IPv6 /64) after which a
    /// user is locked out for that source (0: never), as Keystone's `lockout_failure_attempts`.
    #[arg(long, default_value_t = 6)]
    pub lockout_failure_attempts: u32,
    /// Seconds a user stays locked out for a source after that source's last failure.
    #[arg(long, default_value_t = 1800)]
    pub lockout_duration_seconds: u64,
    /// Failed logins one source address may make per window before it is answered 429 (0: no
    /// limit).
    #[arg(long, default_value_t = 30)]
    pub login_source_failures: u32,
    /// The window of `--login-source-failures`, in seconds.
    #[arg(long, default_value_t = 60)]
    pub login_source_window_seconds: u64,
    /// Threads that hash and check passwords (default: half the cores, at least one).
    #[arg(long)]
    pub password_hash_threads: Option<usize>,
    /// Password checks that may wait for a hashing thread; more are answered 429.
    #[arg(long, default_value_t = 16)]
    pub password_hash_queue: usize,
    /// The Swift proxy's URL (`http://HOST:PORT`) named in the service catalog of identity
    /// tokens (`/identity/v3`), so `swift --os-auth-url` finds its project's account.
    #[arg(long)]
    pub object_store_url: Option<String>,
    /// Requests a second one source address (an IPv4 address or an IPv6 /64) may make to the
    /// identity endpoints that take no credential (Keystone password logins and `s3tokens`,
    /// which a Swift proxy calls for each S3 request), in bursts of twice as many; more are
    /// answered 429 (0: no limit).
    #[arg(long, default_value_t = 100)]
    pub identity_requests_per_second: u32,
    /// The address a Swift proxy calls the API server from (repeatable): its `s3tokens`
    /// calls, one for each S3 request of any client, are not limited per source address
    /// (limit S3 clients at the proxy instead).
    #[arg(long = "identity-proxy-address", value_name = "IP")]
    pub identity_proxy_addresses: Vec<std::net::IpAddr>,
    /// A network storage nodes may record their storage address in (a StoragePool's
    /// `status.storageAddress`, where compute nodes' QEMU connects for a volume of another
    /// node), repeatable; given, it replaces the default, the private networks 10.0.0.0/8,
    /// 172.16.0.0/12, 192.168.0.0/16 and fc00::/7. Name the storage network alone; loopback
    /// only where a test grants it.
    #[arg(long = "storage-cidr", value_name = "CIDR")]
    pub storage_cidrs: Vec<stratus_apiserver::admission::pools::StorageCidr>,
}

impl ServingArgs {
    /// Sets these in `config`.
    pub fn apply(&self, config: &mut Config) {
        let s = Duration::from_secs;
        let l = &mut config.limits;
        l.request_timeout = s(self.request_timeout_seconds.max(1));
        l.max_requests_inflight = self.max_requests_inflight.max(1);
        l.max_mutating_requests_inflight = self.max_mutating_requests_inflight.max(1);
        l.max_watches_per_user = self.max_watches_per_user;
        l.max_watches_per_node = self.max_watches_per_node;
        l.max_connections = self.max_connections.max(1);
        l.header_read_timeout = s(self.header_read_timeout_seconds.max(1));
        l.tls_handshake_timeout = s(self.tls_handshake_timeout_seconds.max(1));
        l.idle_timeout = s(self.idle_timeout_seconds.max(1));
        l.max_image_transfers = self.max_image_transfers.max(1);
        l.image_min_rate = stratus_apiserver::http::limits::MinRate {
            bytes_per_second: self.image_min_transfer_kib_per_second.saturating_mul(1024),
            window: s(self.image_transfer_window_seconds.max(1)),
        };
        config.image_staging_max_bytes = self.image_staging_max_mib.saturating_mul(1 << 20);
        let p = &mut config.login;
        p.lockout_failure_attempts = self.lockout_failure_attempts;
        p.lockout_duration = s(self.lockout_duration_seconds);
        p.source_failure_attempts = self.login_source_failures;
        p.source_window = s(self.login_source_window_seconds.max(1));
        if let Some(n) = self.password_hash_threads {
            p.hash_threads = n.max(1);
        }
        p.hash_queue = self.password_hash_queue;
        config.object_store_url = self
            .object_store_url
            .as_ref()
            .map(|u| u.trim_end_matches('/').to_string());
        config.identity_rate = stratus_apiserver::http::keystone::SourceRate {
            per_second: f64::from(self.identity_requests_per_second),
            burst: self.identity_requests_per_second.saturating_mul(2),
        };
        config
            .identity_proxies
            .extend(self.identity_proxy_addresses.iter().copied());
        if !self.storage_cidrs.is_empty() {
            config.storage_ranges.clone_from(&self.storage_cidrs);
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
        serving: ServingArgs,
    }

    #[test]
    fn the_flags_defaults_are_the_servers() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["x"])?;
        let mut config = Config::new(Vec::new());
        cli.serving.apply(&mut config);
        let defaults = Config::new(Vec::new());
        assert_eq!(config.limits, defaults.limits);
        assert_eq!(config.login, defaults.login);
        assert_eq!(config.identity_rate, defaults.identity_rate);
        assert_eq!(
            config.image_staging_max_bytes,
            defaults.image_staging_max_bytes
        );
        let cli = Cli::try_parse_from([
            "x",
            "--lockout-failure-attempts",
            "3",
            "--header-read-timeout-seconds",
            "2",
        ])?;
        cli.serving.apply(&mut config);
        assert_eq!(config.login.lockout_failure_attempts, 3);
        assert_eq!(config.limits.header_read_timeout, Duration::from_secs(2));
        Ok(())
    }
}
