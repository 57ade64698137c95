//! Maps of per-source and per-name counters kept in memory with a bound on their size.
//!
//! A flood of made-up user names or of source addresses (an IPv6 attacker holds many /64s)
//! must neither grow memory without bound nor, once the bound is reached, wipe the entries
//! that hold a refusal: clearing the map would hand a locked-out name or a throttled address
//! a fresh count. So the map is trimmed: entries worth nothing go first, then the ones that
//! matter least, and what refuses someone is dropped last.

use std::collections::HashMap;
use std::hash::Hash;

/// Makes room in `map` for one more entry when it holds `cap` or more.
///
/// Entries for which `worthless` holds (expired, refilled) are dropped first, then the entries
/// ranked lowest by `rank` until a tenth of `cap` is free, so that a flood pays for one trim
/// per tenth of the map, not one per entry.
pub fn make_room<K, V, R>(
    map: &mut HashMap<K, V>,
    cap: usize,
    worthless: impl Fn(&V) -> bool,
    rank: impl Fn(&V) -> R,
) where
    K: Hash + Eq + Clone,
    R: Ord,
{
    if map.len() < cap {
        return;
    }
    map.retain(|_, v| !worthless(v));
    // Trimmed to nine tenths whatever the sweep freed, so that a map at its bound with a
    // few worthless entries does not cost a sweep of it on every insert.
    let keep = cap - cap / 10;
    let excess = map.len() - keep.min(map.len());
    if excess == 0 {
        return;
    }
    let mut ranked: Vec<(R, K)> = map.iter().map(|(k, v)| (rank(v), k.clone())).collect();
    ranked.select_nth_unstable_by(excess - 1, |a, b| a.0.cmp(&b.0));
    for (_, k) in ranked.into_iter().take(excess) {
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worthless_entries_go_first_then_the_lowest_ranked_and_never_below_nine_tenths() {
        // Values: (worthless?, rank).
        let mut m: HashMap<u32, (bool, u32)> = (0..100).map(|i| (i, (i % 2 == 0, i))).collect();
        make_room(&mut m, 100, |v| v.0, |v| v.1);
        assert_eq!(
            m.len(),
            50,
            "the worthless half went, which leaves room enough"
        );
        assert!(m.values().all(|v| !v.0));

        // One worthless entry: it goes, and the lowest ranked too down to nine tenths.
        let mut m: HashMap<u32, (bool, u32)> = (0..100).map(|i| (i, (i == 50, i))).collect();
        make_room(&mut m, 100, |v| v.0, |v| v.1);
        assert_eq!(m.len(), 90);
        assert!(!m.contains_key(&50) && !m.contains_key(&0) && m.contains_key(&10));

        let mut m: HashMap<u32, (bool, u32)> = (0..100).map(|i| (i, (false, i))).collect();
        make_room(&mut m, 100, |v| v.0, |v| v.1);
        assert_eq!(m.len(), 90);
        assert!((0..10).all(|i| !m.contains_key(&i)), "the ten lowest went");
        assert!((10..100).all(|i| m.contains_key(&i)));

        let mut m: HashMap<u32, (bool, u32)> = (0..5).map(|i| (i, (false, i))).collect();
        make_room(&mut m, 100, |v| v.0, |v| v.1);
        assert_eq!(m.len(), 5, "below the bound nothing goes");
    }
}
