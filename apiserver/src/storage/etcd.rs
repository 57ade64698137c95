//! [`Kv`] over etcd's gRPC client: each operation translated one to one.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, KvClient, PutOptions, TlsOptions,
    TxnOpResponse, WatchOptions,
};

use crate::storage::kv::{
    Compare, CompareOp, Event, KeyValue, Kv, Op, Range, RangeResp, Target, Txn, TxnResp, WatchFeed,
    WatchMsg,
};
use crate::storage::store::StoreError;

/// A handle on etcd; cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    /// The key-value client, accepting answers up to [`MAX_ANSWER_BYTES`].
    kv: KvClient,
}

/// The largest answer read from etcd. The store reads ranges in pages of a byte budget
/// (see [`crate::storage::store`]), far below this; it is what one page of the largest
/// objects may reach, where the gRPC client's default (4 MiB) is about 6,000 Flavors.
pub const MAX_ANSWER_BYTES: usize = 512 * 1024 * 1024;

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").finish_non_exhaustive()
    }
}

/// How to reach etcd over TLS (kube-apiserver's `--etcd-cafile`, `--etcd-certfile`,
/// `--etcd-keyfile`): the CA that signed etcd's serving certificate and, for etcd's
/// `--client-cert-auth`, this client's certificate and key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA certificate etcd's serving certificate must chain to.
    pub ca_file: PathBuf,
    /// This client's certificate and key, when etcd asks for one.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl EtcdTls {
    fn options(&self) -> Result<TlsOptions, StoreError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| StoreError::ReadFile {
                path: path.clone(),
                source,
            })
        };
        let mut opts =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read(&self.ca_file)?));
        if let Some((cert, key)) = &self.client {
            opts = opts.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(opts)
    }
}

impl Etcd {
    /// Connects to etcd: over TLS with `tls` (every endpoint `https://`), in the clear without
    /// (every endpoint `http://`).
    ///
    /// # Errors
    /// When an endpoint's scheme does not match `tls`, a TLS file cannot be read, or no
    /// endpoint answers.
    pub async fn connect(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<Self, StoreError> {
        let want = if tls.is_some() { "https://" } else { "http://" };
        if let Some(e) = endpoints.iter().find(|e| !e.starts_with(want)) {
            return Err(StoreError::Endpoint {
                endpoint: e.clone(),
                expected: want,
            });
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(30))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(10));
        if let Some(tls) = tls {
            opts = opts.with_tls(tls.options()?);
        }
        let client = Client::connect(endpoints, Some(opts)).await?;
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_ANSWER_BYTES);
        Ok(Self { client, kv })
    }
}

fn get_options(r: &Range) -> Option<GetOptions> {
    let plain = r.end.is_none() && r.revision <= 0 && r.limit <= 0 && !r.keys_only;
    if plain && !r.count_only {
        return None;
    }
    let mut opts = GetOptions::new();
    if let Some(end) = &r.end {
        opts = opts.with_range(end.clone());
    }
    if r.revision > 0 {
        opts = opts.with_revision(r.revision);
    }
    if r.limit > 0 {
        opts = opts.with_limit(r.limit);
    }
    if r.keys_only {
        opts = opts.with_keys_only();
    }
    if r.count_only {
        opts = opts.with_count_only();
    }
    Some(opts)
}

fn key_value(kv: etcd_client::KeyValue) -> KeyValue {
    let mod_revision = kv.mod_revision();
    let (key, value) = kv.into_key_value();
    KeyValue {
        key,
        value,
        mod_revision,
    }
}

fn range_resp(mut resp: etcd_client::GetResponse) -> RangeResp {
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    RangeResp {
        more: resp.more(),
        count: resp.count(),
        revision,
        kvs: resp.take_kvs().into_iter().map(key_value).collect(),
    }
}

fn compare(c: Compare) -> etcd_client::Compare {
    let op = match c.op {
        CompareOp::Equal => etcd_client::CompareOp::Equal,
        CompareOp::Greater => etcd_client::CompareOp::Greater,
        CompareOp::Less => etcd_client::CompareOp::Less,
    };
    let cmp = match c.target {
        Target::Mod => etcd_client::Compare::mod_revision(c.key, op, c.revision),
        Target::Create => etcd_client::Compare::create_revision(c.key, op, c.revision),
    };
    match c.end {
        Some(end) => cmp.with_range(end),
        None => cmp,
    }
}

fn op(o: Op) -> etcd_client::TxnOp {
    match o {
        Op::Put { key, value, lease } => etcd_client::TxnOp::put(
            key,
            value,
            (lease != 0).then(|| PutOptions::new().with_lease(lease)),
        ),
        Op::Delete(key) => etcd_client::TxnOp::delete(key, None),
        Op::Get(r) => {
            let opts = get_options(&r);
            etcd_client::TxnOp::get(r.key, opts)
        }
    }
}

impl Kv for Etcd {
    type Watch = EtcdWatch;

    async fn range(&self, r: Range) -> Result<RangeResp, StoreError> {
        let opts = get_options(&r);
        let resp = self.kv.clone().get(r.key, opts).await?;
        Ok(range_resp(resp))
    }

    async fn txn(&self, t: Txn) -> Result<TxnResp, StoreError> {
        let Txn {
            when,
            then,
            otherwise,
        } = t;
        let reads_then = then.iter().any(|o| matches!(o, Op::Get(_)));
        let reads_otherwise = otherwise.iter().any(|o| matches!(o, Op::Get(_)));
        let txn = etcd_client::Txn::new()
            .when(when.into_iter().map(compare).collect::<Vec<_>>())
            .and_then(then.into_iter().map(op).collect::<Vec<_>>())
            .or_else(otherwise.into_iter().map(op).collect::<Vec<_>>());
        let resp = self.kv.clone().txn(txn).await?;
        let succeeded = resp.succeeded();
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        // The responses are copied out of the reply: only when a read is among them.
        let gets = if (succeeded && reads_then) || (!succeeded && reads_otherwise) {
            resp.op_responses()
                .into_iter()
                .filter_map(|r| match r {
                    TxnOpResponse::Get(g) => Some(range_resp(g)),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(TxnResp {
            succeeded,
            revision,
            gets,
        })
    }

    async fn watch(
        &self,
        key: &str,
        end: Vec<u8>,
        start_revision: i64,
    ) -> Result<EtcdWatch, StoreError> {
        let opts = WatchOptions::new()
            .with_range(end)
            .with_start_revision(start_revision)
            .with_prev_key()
            .with_progress_notify();
        let stream = self.client.watch_client().watch(key, Some(opts)).await?;
        Ok(EtcdWatch { stream })
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        self.kv.clone().compact(revision, None).await?;
        Ok(())
    }

    async fn grant_lease(&self, ttl: i64) -> Result<i64, StoreError> {
        Ok(self.client.lease_client().grant(ttl, None).await?.id())
    }

    async fn revoke_lease(&self, id: i64) -> Result<(), StoreError> {
        self.client.lease_client().revoke(id).await?;
        Ok(())
    }
}

/// An etcd watch.
pub struct EtcdWatch {
    stream: etcd_client::WatchStream,
}

impl std::fmt::Debug for EtcdWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWatch").finish_non_exhaustive()
    }
}

fn event(ev: &etcd_client::Event) -> Option<Event> {
    let copy = |kv: &etcd_client::KeyValue| KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
    };
    Some(Event {
        kv: copy(ev.kv()?),
        prev: ev.prev_kv().map(copy),
        deleted: ev.event_type() == etcd_client::EventType::Delete,
    })
}

impl WatchFeed for EtcdWatch {
    async fn message(&mut self) -> Result<Option<WatchMsg>, StoreError> {
        loop {
            let Some(resp) = self.stream.message().await? else {
                return Ok(None);
            };
            if resp.canceled() {
                return Ok(Some(WatchMsg::Canceled {
                    compact_revision: resp.compact_revision(),
                }));
            }
            if resp.events().is_empty() {
                if resp.created() {
                    continue;
                }
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                return Ok(Some(WatchMsg::Progress(rev)));
            }
            return Ok(Some(WatchMsg::Events(
                resp.events().iter().filter_map(event).collect(),
            )));
        }
    }

    async fn request_progress(&mut self) -> Result<(), StoreError> {
        Ok(self.stream.request_progress().await?)
    }
}
