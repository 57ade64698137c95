//! Loopback ports for tests, outside the kernel's ephemeral range.
//!
//! A port the kernel hands out for binding port 0, or for an outgoing connection, comes from
//! its ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`): one picked there, released
//! and bound again later by a server under test may be taken meanwhile by any connection on the
//! machine. These come from [`TEST_PORTS`] less that range instead. Each is bound before it is
//! handed out (one in use is passed over); a process starts at a random place in the range and
//! moves on by one port per port it takes, so concurrent test binaries and the tests of one
//! binary rarely pick the same. A server started on one should still be started again on
//! another when it finds it taken ("address already in use").

use std::net::TcpListener;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the tests' ports are taken from: below the kernel's usual ephemeral range
/// (32768-60999) and clear of the ports Stratus itself listens on.
pub const TEST_PORTS: std::ops::Range<u16> = 20000..30000;

/// The ports of [`TEST_PORTS`] outside the kernel's ephemeral range ([`outside`]).
fn candidates() -> &'static [u16] {
    static PORTS: OnceLock<Vec<u16>> = OnceLock::new();
    PORTS.get_or_init(|| outside(TEST_PORTS, ephemeral_range()))
}

/// The ports of `range` outside `ephemeral` (first, last, inclusive; all of `range` when it is
/// not known, or should it cover them all: binding first and retrying still keep tests
/// apart).
pub fn outside(range: std::ops::Range<u16>, ephemeral: Option<(u16, u16)>) -> Vec<u16> {
    let ports: Vec<u16> = range
        .clone()
        .filter(|p| ephemeral.is_none_or(|(lo, hi)| *p < lo || *p > hi))
        .collect();
    if ports.is_empty() {
        range.collect()
    } else {
        ports
    }
}

/// The kernel's ephemeral port range (first, last), when it can be read.
pub fn ephemeral_range() -> Option<(u16, u16)> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

/// A loopback port of [`candidates`] bound now, held by the listener answered with it.
pub fn reserve_port() -> (u16, TcpListener) {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        // A random start (std's hasher keys are random per process) with the pid mixed in.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        AtomicU32::new(h.finish() as u32)
    });
    let ports = candidates();
    for _ in 0..ports.len() {
        let port = ports[next.fetch_add(1, Ordering::Relaxed) as usize % ports.len()];
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return (port, l);
        }
    }
    panic!("every port of {TEST_PORTS:?} outside the ephemeral range is in use");
}

/// A loopback port outside the ephemeral range on which nothing listens (bound and released).
pub fn free_port() -> u16 {
    reserve_port().0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ephemeral_range_is_left_out_of_the_test_ports() {
        // Overlapping the start, the end, the middle; covering all; apart; unknown.
        assert_eq!(
            outside(100..110, Some((105, 200))),
            (100..105).collect::<Vec<_>>()
        );
        assert_eq!(
            outside(100..110, Some((50, 103))),
            (104..110).collect::<Vec<_>>()
        );
        assert_eq!(outside(100..110, Some((102, 107))), [100, 101, 108, 109]);
        assert_eq!(
            outside(100..110, Some((100, 109))),
            (100..110).collect::<Vec<_>>()
        );
        assert_eq!(
            outside(100..110, Some((110, 200))),
            (100..110).collect::<Vec<_>>()
        );
        assert_eq!(outside(100..110, None), (100..110).collect::<Vec<_>>());
        // Ports past u16's half and at its end.
        assert_eq!(outside(65530..65535, Some((32768, 65533))), [65534]);
    }

    #[test]
    fn ports_are_outside_the_ephemeral_range_and_never_handed_out_twice_while_held() {
        let ephemeral = ephemeral_range().expect("the kernel's ephemeral range");
        let held: Vec<(u16, TcpListener)> = (0..64).map(|_| reserve_port()).collect();
        let mut ports: Vec<u16> = held.iter().map(|(p, _)| *p).collect();
        let allowed = outside(TEST_PORTS, Some(ephemeral));
        for p in &ports {
            assert!(
                allowed.contains(p),
                "{p} not of {TEST_PORTS:?} less {ephemeral:?}"
            );
        }
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), held.len(), "a port handed out twice");
    }

    #[test]
    fn a_port_in_use_is_passed_over() {
        let (taken, _held) = reserve_port();
        // As many as there are candidates: the range comes round to `taken` at least once.
        for _ in 0..candidates().len() {
            let (p, _) = reserve_port();
            assert_ne!(p, taken);
        }
    }
}
