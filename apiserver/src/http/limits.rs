//! Limits on what clients may hold of the server: connections, requests in flight, watches per
//! identity, and how long a connection may sit idle or take to send a request's headers.
//!
//! # Guarantees
//! - A request (other than a watch) past the in-flight limits is answered 429 at once, with
//!   `Retry-After`, as kube-apiserver's `--max-requests-inflight` does; watches count only
//!   against their identity's watch limit. Image data transfers (`images/NAME/data`) count
//!   only against their own limit ([`Limits::max_image_transfers`]), held until the last byte
//!   is sent, so slow uploads or downloads never take the places of other writes and reads;
//!   a user holds at most a quarter of them, and users together leave a quarter to nodes and
//!   system identities ([`Transfers`]), so no tenant keeps others or the nodes from images.
//! - A transfer moving fewer than [`MinRate`]'s bytes in any of its windows is cut off
//!   ([`Pace`]): an upload is answered 408, a download's connection is closed ([`Cutoff`]).
//! - A connection with no request in flight is closed once it has been idle for the idle
//!   timeout, or once it has spent the header-read timeout sending the bytes of a request
//!   that has not begun (a slow-header client): what a client holds without asking anything
//!   is bounded by `max_connections` × those timeouts.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::base::error::ApiError;

/// The limits of one API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// How long a request other than a watch may take, body included (504 past it).
    pub request_timeout: Duration,
    /// Read-only requests (other than watches) served at once; 429 past it.
    pub max_requests_inflight: usize,
    /// Mutating requests served at once; 429 past it.
    pub max_mutating_requests_inflight: usize,
    /// Watches one identity may hold open at once; 429 past it.
    pub max_watches_per_user: usize,
    /// Watches one node identity (`system:node:NAME`) may hold open at once; 429 past it.
    /// A node's agents watch what the node authorizer lets them read object by object
    /// (each network of the node's ports, its subnets and ports, each security group), so
    /// a node hosting many projects holds far more watches than a user.
    pub max_watches_per_node: usize,
    /// Connections held open at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers once it has begun.
    pub header_read_timeout: Duration,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// How long a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Image data transfers (uploads and downloads of `images/NAME/data`) served at once;
    /// 429 past it.
    pub max_image_transfers: usize,
    /// The slowest an image data transfer may be.
    pub image_min_rate: MinRate,
}

impl Limits {
    /// The watches `caller` may hold open at once.
    pub fn watches_for(&self, caller: &crate::policy::authn::Caller) -> usize {
        match caller.principal() {
            crate::policy::authn::Principal::Node(_) => self.max_watches_per_node,
            _ => self.max_watches_per_user,
        }
    }
}

impl Default for Limits {
    /// kube-apiserver's in-flight defaults (400 read-only, 200 mutating) and request timeout
    /// (60 s); Go's and nginx's orders of magnitude for the connection timeouts.
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(60),
            max_requests_inflight: 400,
            max_mutating_requests_inflight: 200,
            max_watches_per_user: 200,
            max_watches_per_node: 2000,
            max_connections: 2048,
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_image_transfers: 16,
            image_min_rate: MinRate {
                bytes_per_second: 32 * 1024,
                window: Duration::from_secs(60),
            },
        }
    }
}

/// The in-flight limits: one semaphore per kind of request, and image data transfers'
/// places ([`Transfers`]).
#[derive(Debug)]
pub struct Inflight {
    read_only: Arc<Semaphore>,
    mutating: Arc<Semaphore>,
    transfers: Transfers,
}

impl Inflight {
    /// Limits of `read_only` and `mutating` requests and image data `transfers` at once.
    pub fn new(read_only: usize, mutating: usize, transfers: usize) -> Self {
        Self {
            read_only: Arc::new(Semaphore::new(read_only)),
            mutating: Arc::new(Semaphore::new(mutating)),
            transfers: Transfers::new(transfers),
        }
    }

    /// A place for one image data transfer of `identity`, held until it is dropped
    /// ([`Transfers::admit`]).
    ///
    /// # Errors
    /// 429 with `Retry-After` when no place is left for it.
    pub fn admit_transfer(&self, identity: &str, trusted: bool) -> Result<TransferPlace, ApiError> {
        self.transfers.admit(identity, trusted)
    }

    /// A place for one request, held until it is dropped.
    ///
    /// # Errors
    /// 429 with `Retry-After` when every place of its kind is taken.
    pub fn admit(&self, mutating: bool) -> Result<OwnedSemaphorePermit, ApiError> {
        let s = if mutating {
            &self.mutating
        } else {
            &self.read_only
        };
        Arc::clone(s).try_acquire_owned().map_err(|_| {
            ApiError::too_many_requests("too many requests, please try again later", 1)
        })
    }
}

/// Image data transfers at once: `max` in all; of them, an identity other than a node's or
/// a system one (a user, a service) holds at most a quarter (at least 1), and such
/// identities together leave a quarter to nodes and system identities, so that no tenant,
/// nor all of them, keeps nodes and controllers from images.
#[derive(Debug)]
pub struct Transfers {
    max: usize,
    per_identity: usize,
    reserved: usize,
    open: Arc<Mutex<TransferCounts>>,
}

#[derive(Debug, Default)]
struct TransferCounts {
    all: usize,
    untrusted: usize,
    by_identity: HashMap<String, usize>,
}

/// One transfer's place, given back when dropped.
#[derive(Debug)]
pub struct TransferPlace {
    open: Arc<Mutex<TransferCounts>>,
    identity: String,
    trusted: bool,
}

impl Transfers {
    /// `max` transfers at once.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            per_identity: (max / 4).max(1),
            reserved: max / 4,
            open: Arc::default(),
        }
    }

    /// A place for one transfer of `identity`; `trusted` for a node's or a system identity.
    ///
    /// # Errors
    /// 429 with `Retry-After` when every place is taken, when `identity` (not `trusted`)
    /// holds its share, or when such identities hold all but the places kept for nodes and
    /// system identities.
    pub fn admit(&self, identity: &str, trusted: bool) -> Result<TransferPlace, ApiError> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| ApiError::internal("the transfer counts are poisoned"))?;
        let busy = |why: String| ApiError::too_many_requests(why, 5);
        if open.all >= self.max {
            return Err(busy(format!(
                "too many image uploads and downloads at once (this server serves {}): try again later",
                self.max
            )));
        }
        if !trusted {
            let mine = open.by_identity.get(identity).copied().unwrap_or(0);
            if mine >= self.per_identity {
                return Err(busy(format!(
                    "too many image uploads and downloads of \"{identity}\" at once (at most {} per user): try again later",
                    self.per_identity
                )));
            }
            if open.untrusted >= self.max - self.reserved {
                return Err(busy(format!(
                    "too many image uploads and downloads of users at once (this server serves {} of theirs): try again later",
                    self.max - self.reserved
                )));
            }
            open.untrusted += 1;
        }
        open.all += 1;
        *open.by_identity.entry(identity.to_owned()).or_default() += 1;
        Ok(TransferPlace {
            open: Arc::clone(&self.open),
            identity: identity.to_owned(),
            trusted,
        })
    }
}

impl Drop for TransferPlace {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            open.all = open.all.saturating_sub(1);
            if !self.trusted {
                open.untrusted = open.untrusted.saturating_sub(1);
            }
            if let Some(n) = open.by_identity.get_mut(&self.identity) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.by_identity.remove(&self.identity);
                }
            }
        }
    }
}

/// The slowest a transfer may be: at least `bytes_per_second` × `window` bytes in each
/// `window` (0 bytes per second: no minimum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRate {
    /// The average rate a window must reach.
    pub bytes_per_second: u64,
    /// How long a rate is averaged over.
    pub window: Duration,
}

impl MinRate {
    /// The fewest bytes a window must see.
    fn min_bytes(&self) -> u64 {
        let ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        self.bytes_per_second.saturating_mul(ms) / 1000
    }
}

/// A transfer's progress against its [`MinRate`], window by window.
#[derive(Debug)]
pub struct Pace {
    rate: MinRate,
    window_start: Instant,
    in_window: u64,
}

/// A window of a transfer that moved too few bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooSlow {
    /// The bytes the window moved.
    pub moved: u64,
    /// The fewest it had to.
    pub min: u64,
    /// The window.
    pub window: Duration,
}

impl std::fmt::Display for TooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes moved in {} s, fewer than this server's minimum of {} bytes",
            self.moved,
            self.window.as_secs_f64(),
            self.min
        )
    }
}

impl Pace {
    /// A transfer begun at `now`.
    pub fn new(rate: MinRate, now: Instant) -> Self {
        Self {
            rate: MinRate {
                window: rate.window.max(Duration::from_millis(100)),
                ..rate
            },
            window_start: now,
            in_window: 0,
        }
    }

    /// When the current window ends (and the transfer is next checked, if nothing moves).
    pub fn deadline(&self) -> Instant {
        self.window_start + self.rate.window
    }

    /// Checks every window that ended by `now`.
    ///
    /// # Errors
    /// The first of them that moved fewer bytes than the minimum.
    pub fn check(&mut self, now: Instant) -> Result<(), TooSlow> {
        let min = self.rate.min_bytes();
        while now >= self.deadline() {
            if self.in_window < min {
                return Err(TooSlow {
                    moved: self.in_window,
                    min,
                    window: self.rate.window,
                });
            }
            self.window_start += self.rate.window;
            self.in_window = 0;
        }
        Ok(())
    }

    /// Records `n` bytes moved at `now`, after checking the windows that ended before.
    ///
    /// # Errors
    /// As [`Pace::check`].
    pub fn moved(&mut self, n: u64, now: Instant) -> Result<(), TooSlow> {
        self.check(now)?;
        self.in_window = self.in_window.saturating_add(n);
        Ok(())
    }
}

/// Closes a connection from within a request it carries: for a transfer whose client
/// stopped reading, which a handler cannot answer any more (its response is under way).
#[derive(Debug, Clone, Default)]
pub struct Cutoff(Arc<tokio::sync::Notify>);

impl Cutoff {
    /// Asks for the connection to be closed (at once, or as soon as it is served).
    pub fn cut(&self) {
        self.0.notify_one();
    }

    /// Completes once the connection is to be closed.
    pub async fn cut_off(&self) {
        self.0.notified().await;
    }
}

/// Open watches per identity.
#[derive(Debug, Default)]
pub struct Watches {
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open watch, counted until dropped.
#[derive(Debug)]
pub struct WatchSlot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    user: String,
}

impl Watches {
    /// A slot for one more watch of `user`.
    ///
    /// # Errors
    /// 429 when `user` already holds `max` watches.
    pub fn open(&self, user: &str, max: usize) -> Result<WatchSlot, ApiError> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| ApiError::internal("the watch counts are poisoned"))?;
        let n = open.entry(user.to_string()).or_default();
        if *n >= max {
            return Err(ApiError::too_many_requests(
                format!("too many watches: at most {max} per user"),
                5,
            ));
        }
        *n += 1;
        Ok(WatchSlot {
            open: Arc::clone(&self.open),
            user: user.to_string(),
        })
    }

    /// How many watches `user` holds.
    pub fn count(&self, user: &str) -> usize {
        self.open
            .lock()
            .map_or(0, |o| o.get(user).copied().unwrap_or(0))
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock()
            && let Some(n) = open.get_mut(&self.user)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// What a connection is doing, for its watchdog.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Requests begun and not yet answered to the end of their body.
    in_flight: usize,
    /// Since when no request has been in flight.
    idle_since: Instant,
    /// Whether bytes arrived since then (the head of a request that has not begun).
    bytes_while_idle: bool,
}

/// Why a connection's watchdog closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A request's headers took longer than the header-read timeout.
    SlowHeaders,
    /// No request for the idle timeout.
    Idle,
}

impl Activity {
    /// A connection opened now, with nothing in flight.
    pub fn new() -> Arc<Self> {
        Self::at(Instant::now())
    }

    fn at(now: Instant) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: now,
                bytes_while_idle: false,
            }),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Option<T> {
        self.state.lock().ok().map(|mut s| f(&mut s))
    }

    /// A request began: held until its response's body is done.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.with(|s| s.in_flight += 1);
        Busy(Arc::clone(self))
    }

    fn read(&self, n: usize) {
        if n > 0 {
            self.with(|s| {
                if s.in_flight == 0 {
                    s.bytes_while_idle = true;
                }
            });
        }
    }

    /// Whether the connection should be closed at `now`. `headers_count` is false for
    /// HTTP/2, where bytes without a request are pings and settings, not a slow request.
    pub fn expired(
        &self,
        now: Instant,
        header_read: Duration,
        idle: Duration,
        headers_count: bool,
    ) -> Option<Expiry> {
        self.with(|s| {
            if s.in_flight > 0 {
                return None;
            }
            let waited = now.saturating_duration_since(s.idle_since);
            if headers_count && s.bytes_while_idle && waited >= header_read {
                Some(Expiry::SlowHeaders)
            } else if waited >= idle {
                Some(Expiry::Idle)
            } else {
                None
            }
        })
        .flatten()
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.with(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.idle_since = Instant::now();
                s.bytes_while_idle = false;
            }
        });
    }
}

/// A connection's stream, telling its [`Activity`] when bytes arrive.
#[derive(Debug)]
pub struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    /// `inner`, reporting to `activity`.
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.activity.read(buf.filled().len() - before);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that holds something (a connection's [`Busy`], a [`WatchSlot`]) until the
/// body is done or dropped; everything else is the inner body's.
#[derive(Debug)]
pub struct Holding<B, H> {
    inner: B,
    held: Option<H>,
}

impl<B, H> Holding<B, H> {
    /// `inner`, holding `held`.
    pub fn new(inner: B, held: H) -> Self {
        Self {
            inner,
            held: Some(held),
        }
    }
}

impl<B, H> hyper::body::Body for Holding<B, H>
where
    B: hyper::body::Body + Unpin,
    H: Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            self.held = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADERS: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(90);

    #[test]
    fn a_slow_request_head_expires_before_an_idle_connection() {
        let t0 = Instant::now();
        let a = Activity::at(t0);
        assert_eq!(a.expired(t0 + HEADERS, HEADERS, IDLE, true), None);
        a.read(1);
        assert_eq!(
            a.expired(t0 + HEADERS, HEADERS, IDLE, true),
            Some(Expiry::SlowHeaders)
        );
        // HTTP/2: bytes are pings, not a slow head.
        assert_eq!(a.expired(t0 + HEADERS, HEADERS, IDLE, false), None);
        assert_eq!(
            a.expired(t0 + IDLE, HEADERS, IDLE, false),
            Some(Expiry::Idle)
        );
    }

    #[test]
    fn a_request_in_flight_keeps_its_connection() {
        let t0 = Instant::now();
        let a = Activity::at(t0);
        a.read(5);
        let busy = a.begin();
        assert_eq!(a.expired(t0 + IDLE * 2, HEADERS, IDLE, true), None);
        drop(busy);
        // Idle again from when the answer was done; the request's bytes are forgotten.
        let now = Instant::now();
        assert_eq!(a.expired(now + HEADERS, HEADERS, IDLE, true), None);
        assert_eq!(
            a.expired(now + IDLE, HEADERS, IDLE, true),
            Some(Expiry::Idle)
        );
    }

    #[test]
    fn watches_are_counted_per_user_until_dropped() {
        let w = Watches::default();
        let a = w.open("alice", 2).expect("first");
        let b = w.open("alice", 2).expect("second");
        let e = w.open("alice", 2).expect_err("third");
        assert_eq!(e.code, 429);
        assert!(w.open("bob", 2).is_ok(), "another user has their own count");
        drop(a);
        let _c = w.open("alice", 2).expect("a slot came free");
        drop(b);
        assert_eq!(w.count("alice"), 1);
    }

    #[test]
    fn a_node_identity_may_hold_more_watches_than_a_user() {
        use crate::policy::authn::Caller;
        let caller = |user: &str, system: bool| Caller {
            user: user.into(),
            user_agent: String::new(),
            system,
            grants: vec![],
            claims: None,
        };
        let l = Limits::default();
        assert_eq!(l.watches_for(&caller("system:node:n1", true)), 2000);
        // A user named like a node is not one (a node identity comes from the token file).
        assert_eq!(l.watches_for(&caller("system:node:n1", false)), 200);
        assert_eq!(l.watches_for(&caller("alice", false)), 200);
        assert_eq!(l.watches_for(&caller("system:admin", true)), 200);
    }

    #[test]
    fn in_flight_limits_are_per_kind() {
        let i = Inflight::new(1, 1, 1);
        let r = i.admit(false).expect("read");
        assert_eq!(i.admit(false).expect_err("second read").code, 429);
        let _m = i.admit(true).expect("a mutation has its own places");
        let t = i
            .admit_transfer("alice", false)
            .expect("a transfer has its own places");
        let e = i.admit_transfer("bob", false).expect_err("second transfer");
        assert_eq!((e.code, e.details.retry_after), (429, Some(5)));
        drop(r);
        assert!(i.admit(false).is_ok());
        drop(t);
        assert!(i.admit_transfer("bob", false).is_ok());
    }

    #[test]
    fn no_user_takes_the_transfers_of_others_nor_of_nodes() {
        let t = Transfers::new(16);
        // A user holds at most a quarter.
        let alice: Vec<_> = (0..4)
            .map(|_| t.admit("alice", false).expect("alice's share"))
            .collect();
        let e = t.admit("alice", false).expect_err("past alice's share");
        assert_eq!((e.code, e.details.retry_after), (429, Some(5)));
        assert!(e.message.contains("per user"), "{}", e.message);
        // Users together leave a quarter to nodes and system identities.
        let others: Vec<_> = ["bob", "carol"]
            .iter()
            .flat_map(|u| (0..4).map(|_| t.admit(u, false).expect("another user's share")))
            .collect();
        let e = t
            .admit("dave", false)
            .expect_err("the users' places are taken");
        assert_eq!(e.code, 429);
        let nodes: Vec<_> = (0..4)
            .map(|i| {
                t.admit(&format!("system:node:n{i}"), true)
                    .expect("a node's place is kept")
            })
            .collect();
        // Every place taken: even a node waits.
        assert_eq!(t.admit("system:node:n9", true).expect_err("full").code, 429);
        // A place given back serves again.
        drop(nodes);
        drop(alice);
        assert!(t.admit("alice", false).is_ok());
        assert!(t.admit("dave", false).is_ok());
        drop(others);
    }

    #[test]
    fn a_transfer_is_too_slow_once_a_window_moves_too_little() {
        let rate = MinRate {
            bytes_per_second: 1000,
            window: Duration::from_secs(2),
        };
        let t0 = Instant::now();
        let mut p = Pace::new(rate, t0);
        assert_eq!(p.deadline(), t0 + Duration::from_secs(2));
        p.moved(1500, t0 + Duration::from_secs(1))
            .expect("within the window");
        p.moved(500, t0 + Duration::from_millis(1999))
            .expect("within the window");
        // The first window moved 2000 bytes: enough; the next starts at 2 s.
        p.check(t0 + Duration::from_secs(2))
            .expect("the first window was fast enough");
        assert_eq!(p.deadline(), t0 + Duration::from_secs(4));
        p.moved(1999, t0 + Duration::from_secs(3))
            .expect("within the window");
        let slow = p
            .check(t0 + Duration::from_secs(4))
            .expect_err("1999 < 2000");
        assert_eq!((slow.moved, slow.min), (1999, 2000));
        // A silence of several windows is caught at the first one, whatever comes after.
        let mut p = Pace::new(rate, t0);
        let e = p
            .moved(1 << 30, t0 + Duration::from_secs(10))
            .expect_err("the first window moved nothing");
        assert_eq!(e.moved, 0);
        // No minimum: never too slow.
        let mut p = Pace::new(
            MinRate {
                bytes_per_second: 0,
                ..rate
            },
            t0,
        );
        p.check(t0 + Duration::from_secs(3600)).expect("no minimum");
    }
}
