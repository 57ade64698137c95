//! The `stratus` binary: every role of a Stratus cloud and the client verbs.

mod agent;
mod client;
mod controllers;
mod image;
mod image_policy;
mod kubeconfig;
mod pki;
mod serving;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

// The API server allocates per request; mimalloc is markedly cheaper than glibc's malloc there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "stratus",
    version,
    about = "Stratus: an IaaS cloud run the way Kubernetes runs things"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole single-node cloud: etcd, the API server and the controllers.
    Up(up::UpArgs),
    /// Run the API server alone against an etcd cluster (several replicas may run at once).
    Apiserver(ApiserverArgs),
    /// Run the cluster-wide controllers against an API server.
    Controllers(controllers::ControllersArgs),
    /// Run one node's agents (compute: libvirt guests; network: bridges, VXLAN, nftables,
    /// DHCP) against an API server.
    Agent(agent::AgentArgs),
    /// Create or update objects from YAML (server-side apply).
    Apply {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        args: client::ApplyArgs,
    },
    /// List objects or show one.
    Get {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        args: client::GetArgs,
    },
    /// Show an object and its events.
    Describe {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        args: client::DescribeArgs,
    },
    /// Delete objects and wait until they are gone.
    Delete {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        args: client::DeleteArgs,
    },
    /// Wait for a condition on an object.
    Wait {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        args: client::WaitArgs,
    },
    /// Log in with a user name and password; adds and selects a kubeconfig context.
    Login {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        args: client::LoginArgs,
    },
    /// Take servers off their hypervisor so they are rebuilt elsewhere (`nova evacuate`; for
    /// servers with `evacuationPolicy: Manual` on a lost hypervisor). Needs an admin role.
    Evacuate {
        #[command(flatten)]
        client: client::ClientArgs,
        /// Server names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Print a server's serial console log (read on its hypervisor's node).
    Console {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        args: client::ConsoleArgs,
    },
    /// Show what applying files would change (exit 1 when something would).
    Diff {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        args: client::DiffArgs,
    },
    /// Image data: `stratus image upload NAME FILE` sends a disk image's data.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Issue certificates from the cloud's CAs (on the machine `stratus up` keeps them on).
    #[command(subcommand)]
    Pki(pki::PkiCommand),
}

#[derive(Debug, clap::Args)]
struct ApiserverArgs {
    /// etcd client URLs, comma-separated: `https://` ones with `--etcd-cafile`, else `http://`.
    #[arg(long, value_delimiter = ',', required = true)]
    etcd_endpoints: Vec<String>,
    /// PEM CA certificate that etcd's serving certificate chains to (TLS to etcd).
    #[arg(long)]
    etcd_cafile: Option<PathBuf>,
    /// PEM client certificate for etcd's `--client-cert-auth`.
    #[arg(long, requires_all = ["etcd_keyfile", "etcd_cafile"])]
    etcd_certfile: Option<PathBuf>,
    /// PEM client key for etcd's `--client-cert-auth`.
    #[arg(long, requires = "etcd_certfile")]
    etcd_keyfile: Option<PathBuf>,
    /// Key prefix of every object in etcd.
    #[arg(long, default_value = "/stratus")]
    etcd_prefix: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// PEM serving certificate.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM serving key.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Bearer tokens: one `token,user` per line.
    #[arg(long)]
    token_file: PathBuf,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 60)]
    bookmark_seconds: u64,
    /// Append an audit record (audit.k8s.io/v1 Event, JSON lines) of every request here.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    #[command(flatten)]
    serving: serving::ServingArgs,
}

async fn apiserver(args: ApiserverArgs) -> Result<()> {
    let mut config = stratus_apiserver::Config::new(args.etcd_endpoints);
    config.etcd_tls = args
        .etcd_cafile
        .map(|ca_file| stratus_apiserver::storage::etcd::EtcdTls {
            ca_file,
            client: args.etcd_certfile.zip(args.etcd_keyfile),
        });
    config.prefix = args.etcd_prefix;
    config.listen = args.listen;
    config.tls = args.tls_cert.zip(args.tls_key);
    config.tokens = stratus_apiserver::http::server::read_token_file(&args.token_file)
        .with_context(|| format!("read {}", args.token_file.display()))?;
    config.bookmark_interval = std::time::Duration::from_secs(args.bookmark_seconds.max(1));
    config.audit_log = args.audit_log;
    args.serving.apply(&mut config);
    let plain = config.tls.is_none();
    let server = stratus_apiserver::start(config)
        .await
        .context("start the API server")?;
    if plain {
        tracing::warn!(
            addr = %server.local_addr,
            "SERVING PLAIN HTTP: no --tls-cert/--tls-key, so bearer tokens and passwords cross \
             the network in clear text; use this only for tests on a loopback address"
        );
    }
    tracing::info!(addr = %server.local_addr, "API server ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    server.abort();
    Ok(())
}

/// Servers log at info; client verbs only warnings, so their output stays readable.
fn init_tracing(server: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATUS_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if server { "info" } else { "warn" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing(matches!(
        cli.command,
        Command::Up(_) | Command::Apiserver(_) | Command::Controllers(_) | Command::Agent(_)
    ));
    match cli.command {
        Command::Up(a) => up::run(a).await,
        Command::Apiserver(a) => apiserver(a).await,
        Command::Controllers(a) => controllers::run(a).await,
        Command::Agent(a) => agent::run(a).await,
        Command::Apply { client, args } => client::apply(&client, args).await,
        Command::Get { client, args } => client::get(&client, args).await,
        Command::Describe { client, args } => client::describe(&client, args).await,
        Command::Delete { client, args } => client::delete(&client, args).await,
        Command::Wait { client, args } => client::wait(&client, args).await,
        Command::Login { client, args } => client::login(&client, args).await,
        Command::Console { client, args } => client::console(&client, args).await,
        Command::Evacuate { client, names } => client::evacuate(&client, &names).await,
        Command::Pki(c) => pki::run(c),
        Command::Image(c) => image::run(c).await,
        Command::Diff { client, args } => {
            if client::diff(&client, args).await? {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn enumerated_flags_take_only_their_values() -> Result<()> {
        let cli = Cli::try_parse_from(["stratus", "controllers", "--weigher", "pack"])?;
        assert!(matches!(
            cli.command,
            Command::Controllers(a) if a.weigher == controllers::WeigherArg::Pack
        ));
        assert!(Cli::try_parse_from(["stratus", "controllers", "--weigher", "pak"]).is_err());
        let cli = Cli::try_parse_from(["stratus", "get", "flavors", "-o", "name"])?;
        assert!(matches!(
            cli.command,
            Command::Get { args, .. } if args.output == Some(client::Output::Name)
        ));
        assert!(Cli::try_parse_from(["stratus", "get", "flavors", "-o", "xml"]).is_err());
        // kubectl spells it lower case; earlier releases of this binary documented Background.
        for spelling in ["orphan", "Orphan"] {
            let cli =
                Cli::try_parse_from(["stratus", "delete", "flavor", "f", "--cascade", spelling])?;
            assert!(matches!(
                cli.command,
                Command::Delete { args, .. } if args.cascade == client::Cascade::Orphan
            ));
        }
        assert!(Cli::try_parse_from(["stratus", "wait", "flavor/f", "--for", "Ready"]).is_err());
        Ok(())
    }
}
