//! The API client of Stratus's agents and controllers: kube's client over one HTTP/2
//! connection.
//!
//! kube's own client speaks HTTP/1.1, where every watch holds a connection of its own. A
//! network agent watches its networks, their subnets and ports and its security groups one
//! by one (what the node authorizer lets a node read), so a node of a hundred networks held
//! hundreds of connections to the API server — and a process whose descriptors pass 1,024
//! aborts in the nftables library, which waits on its netlink socket with `select`. Over
//! HTTP/2 (the API server offers it by ALPN) every request and watch of the process shares
//! one connection, as client-go's do (the API server lets a connection carry twice the
//! watches an identity may hold, so requests never wait behind watches); keep-alive pings
//! find a dead connection, which the watches then open again.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use tower::ServiceBuilder;

/// How often an idle connection is pinged, and how long an answer may take.
const KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(20), Duration::from_secs(20));

/// How long a request waits for its response to begin (its status and headers; a watch's
/// events come after, for as long as it runs) unless the configuration's `read_timeout`
/// says otherwise. Keep-alive pings find a dead connection, not a live one on which a
/// request is never answered: without this, a reconcile waiting on such a request would
/// wait for good.
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// A client of the API server `config` names, multiplexing every request over one HTTP/2
/// connection where the server offers HTTP/2 (HTTP/1.1 otherwise).
///
/// # Errors
/// The configuration's TLS material or credentials cannot be used.
pub fn client(config: kube::Config) -> Result<kube::Client, kube::Error> {
    if config.proxy_url.is_some() {
        // Through a proxy: kube's own client, which knows them.
        return kube::Client::try_from(config);
    }
    // ALPN offers `h2` and `http/1.1`, as the connector sets from the protocols enabled.
    let tls = config.rustls_client_config()?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    // An HTTP/2 request is several frames written one after another: with Nagle's
    // algorithm the later ones waited for the server's delayed ACK (40 ms a request).
    http.set_nodelay(true);
    let mut https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    if let Some(name) = &config.tls_server_name {
        let name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|e| kube::Error::Service(format!("tls-server-name {name:?}: {e}").into()))?;
        https = https.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name));
    }
    let https = https.enable_http1().enable_http2().wrap_connector(http);
    let (interval, timeout) = KEEP_ALIVE;
    let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_keep_alive_interval(interval)
        .http2_keep_alive_timeout(timeout)
        .http2_keep_alive_while_idle(true)
        .build(https);
    // As kube's own stack: 429, 503 and 504 are tried again with a growing pause.
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        // Each try timed on its own; one that runs out fails the request.
        .timeout(config.read_timeout.unwrap_or(ANSWER_WITHIN))
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that takes the connection and never answers makes a request fail once its
    /// time is up (here the configuration's `read_timeout`), not wait for good.
    #[tokio::test]
    async fn a_request_never_answered_fails_in_its_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        // Accepts and holds every connection, reading nothing and writing nothing.
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                open.push(conn);
            }
        });
        let mut config = kube::Config::new(format!("http://{addr}").parse().expect("url"));
        config.read_timeout = Some(Duration::from_secs(1));
        let client = client(config).expect("client");
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(20), client.apiserver_version())
            .await
            .expect("the request ended by itself");
        let took = started.elapsed();
        assert!(answer.is_err(), "{answer:?}");
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(10),
            "{took:?}"
        );
        held.abort();
    }
}
