//! A Server's Ports as its guest's network interfaces: what its Ports resolve to on this node
//! ([`Resolved`]), and the pure [`plan`] that turns those and the interfaces the domain has
//! into attach and detach steps, so that a port added to or removed from a running Server is
//! plugged in or out live, and an interface plugged in or out behind Stratus's back is put
//! right; and [`Replugs`], which spaces the re-plugs of an interface a guest keeps losing by
//! exponential backoff.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};

use super::driver::{AttachedInterface, InterfaceSpec};

/// A Port ready to be plugged into the guest: placed on this node, bound to this Server, its
/// MAC and tap device known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The Port's name.
    pub port: String,
    /// The interface the hypervisor makes for it.
    pub nic: InterfaceSpec,
}

/// What the Ports a Server names resolve to on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Those the guest can have now, in `spec.networks` order.
    pub ready: Vec<Wanted>,
    /// Why each of the others is not plugged in yet.
    pub waiting: Vec<String>,
    /// The MACs of named Ports that were read but are not ready here (being moved, not bound
    /// yet): an interface of theirs stays.
    pub keep: Vec<String>,
    /// Whether a named Port could not be read (not placed here yet, or gone): which interface
    /// is its is then unknown, so only an interface of the wrong tap for a ready Port's MAC goes.
    pub unknown: bool,
}

/// One change to a guest's interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Plug this Port's interface in.
    Attach(Wanted),
    /// Unplug the interface of this MAC: no Port of the Server's is it (any more), or it is a
    /// Port's MAC on another tap device than the Port's.
    Detach(String),
}

fn same_mac(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// The changes that bring a guest's `attached` interfaces to the Ports `resolved`:
///
/// - an interface is detached when no ready Port is it and it is neither a kept Port's MAC
///   nor possibly an unreadable Port's (see [`Resolved::unknown`]); an interface with a ready
///   Port's MAC on another tap device is detached whatever else holds, and the Port's own
///   attached on a later pass, once the guest let the other go;
/// - every ready Port whose MAC no interface has is attached, in `spec.networks` order.
///
/// A guest that already has what is asked gets no step.
pub fn plan(resolved: &Resolved, attached: &[AttachedInterface]) -> Vec<Step> {
    let mut steps = Vec::new();
    for a in attached {
        let ours = resolved.ready.iter().find(|w| same_mac(&w.nic.mac, &a.mac));
        let goes = match ours {
            Some(w) => !a.is(&w.nic) && a.tap.is_some(),
            None => !resolved.unknown && !resolved.keep.iter().any(|k| same_mac(k, &a.mac)),
        };
        if goes {
            steps.push(Step::Detach(a.mac.clone()));
        }
    }
    for w in &resolved.ready {
        if !attached.iter().any(|a| same_mac(&a.mac, &w.nic.mac)) {
            steps.push(Step::Attach(w.clone()));
        }
    }
    steps
}

/// The wait after an interface is plugged in before it is plugged in again, the first time.
pub const REPLUG_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two re-plugs of one interface.
pub const REPLUG_CAP: Duration = Duration::from_secs(300);
/// How long an interface must be seen plugged in after its last plug for its losses to be
/// forgotten (its next loss is then re-plugged after [`REPLUG_FIRST`] again).
pub const REPLUG_SETTLED: Duration = Duration::from_secs(60);

/// One interface the agent plugged in.
#[derive(Debug)]
struct Plugged {
    /// When it was last plugged in.
    at: Instant,
    /// When it may be plugged in again.
    not_before: Instant,
    /// The waits before the next re-plugs.
    delays: ExponentialBackoff,
    /// Re-plugs since it last held.
    replugs: u32,
    /// Whether the wait for the current `not_before` was told.
    told: bool,
}

impl Plugged {
    fn new(now: Instant) -> Self {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(REPLUG_FIRST)
            .with_max_delay(REPLUG_CAP)
            .with_factor(2.0)
            .without_max_times()
            .build();
        let first = delays.next().unwrap_or(REPLUG_FIRST);
        Self {
            at: now,
            not_before: now + first,
            delays,
            replugs: 0,
            told: false,
        }
    }
}

/// What [`Replugs::admit`] says of a pass's attach steps, for the Events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A Port's interface the guest lost is plugged in again: the `count`th time in a row,
    /// the next no sooner than `next` after.
    Replugged {
        /// The Port.
        port: String,
        /// Re-plugs in a row.
        count: u32,
        /// The wait before another.
        next: Duration,
    },
    /// A Port's interface the guest lost again is left out for `wait` more.
    Held {
        /// The Port.
        port: String,
        /// How long until it is plugged in again.
        wait: Duration,
    },
}

/// The interfaces this agent plugged into guests, per Server uid and MAC: an interface lost
/// again soon after its plug is plugged in again only after a wait that doubles each time
/// ([`REPLUG_FIRST`] up to [`REPLUG_CAP`]), so a guest that keeps unplugging its NIC costs
/// the hypervisor a few calls, not one per pass. The clock is the caller's.
#[derive(Debug, Default)]
pub struct Replugs(Mutex<HashMap<(String, String), Plugged>>);

/// The node's [`Replugs`]: one per agent process (the keys are Server uids, unique to a
/// Server whichever node holds it).
pub fn replugs() -> &'static Replugs {
    static REPLUGS: LazyLock<Replugs> = LazyLock::new(Replugs::default);
    &REPLUGS
}

impl Replugs {
    /// Of the `steps` [`plan`] gives for the guest of Server `uid` whose interfaces are
    /// `attached` now: those to take now (a detach, a first plug, a re-plug whose wait is
    /// over), and what to tell. Forgets the interfaces no ready Port has, and the losses of
    /// those that held for [`REPLUG_SETTLED`].
    pub fn admit(
        &self,
        uid: &str,
        resolved: &Resolved,
        attached: &[AttachedInterface],
        steps: Vec<Step>,
        now: Instant,
    ) -> (Vec<Step>, Vec<Notice>) {
        let Ok(mut map) = self.0.lock() else {
            // A poisoned map only loses the spacing, never a step.
            return (steps, Vec::new());
        };
        map.retain(|(u, mac), p| {
            if u != uid {
                return true;
            }
            if attached.iter().any(|a| same_mac(&a.mac, mac))
                && now.saturating_duration_since(p.at) >= REPLUG_SETTLED
            {
                *p = Plugged::new(p.at);
            }
            resolved.ready.iter().any(|w| same_mac(&w.nic.mac, mac))
        });
        let mut take = Vec::new();
        let mut notices = Vec::new();
        for step in steps {
            let Step::Attach(w) = &step else {
                take.push(step);
                continue;
            };
            let key = (uid.to_owned(), w.nic.mac.to_ascii_lowercase());
            let Some(p) = map.get_mut(&key) else {
                map.insert(key, Plugged::new(now));
                take.push(step);
                continue;
            };
            if now < p.not_before {
                if !p.told {
                    p.told = true;
                    notices.push(Notice::Held {
                        port: w.port.clone(),
                        wait: p.not_before - now,
                    });
                }
                continue;
            }
            let next = p.delays.next().unwrap_or(REPLUG_CAP);
            p.replugs += 1;
            p.at = now;
            p.not_before = now + next;
            p.told = false;
            notices.push(Notice::Replugged {
                port: w.port.clone(),
                count: p.replugs,
                next,
            });
            take.push(step);
        }
        (take, notices)
    }
}

impl Notice {
    /// The Event's reason and note.
    pub fn event(&self) -> (&'static str, String) {
        match self {
            Self::Replugged { port, count, next } => (
                "InterfaceReplugged",
                format!(
                    "the guest lost the interface of port \"{port}\" again; plugged it in again ({count} in a row; the next no sooner than {}s after)",
                    next.as_secs()
                ),
            ),
            Self::Held { port, wait } => (
                "InterfaceReplugBackoff",
                format!(
                    "the guest keeps losing the interface of port \"{port}\"; plugging it in again in {}s",
                    wait.as_secs().max(1)
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::compute::driver::conformance;
    use crate::compute::driver::fake::FakeDomains;
    use crate::compute::driver::{DomainDriver, DomainState};

    fn wanted(port: &str, n: u8) -> Wanted {
        Wanted {
            port: port.into(),
            nic: InterfaceSpec {
                mac: format!("fa:16:3e:00:00:{n:02x}"),
                tap: format!("tap0000000{n:02x}"),
                mtu: Some(1450),
            },
        }
    }

    fn ready(w: &[Wanted]) -> Resolved {
        Resolved {
            ready: w.to_vec(),
            ..Resolved::default()
        }
    }

    fn had(w: &Wanted) -> AttachedInterface {
        AttachedInterface {
            mac: w.nic.mac.clone(),
            tap: Some(w.nic.tap.clone()),
            mtu: w.nic.mtu,
        }
    }

    /// Runs `plan` against the fake hypervisor's domain until it asks nothing more (a few
    /// passes at most), as the agent's passes do; answers the steps taken.
    fn converge(d: &FakeDomains, name: &str, r: &Resolved) -> Vec<Step> {
        let mut done = Vec::new();
        for _ in 0..3 {
            let steps = plan(r, &d.interfaces(name).expect("interfaces"));
            if steps.is_empty() {
                return done;
            }
            for s in &steps {
                match s {
                    Step::Attach(w) => d.attach_interface(name, &w.nic).expect("attach"),
                    Step::Detach(mac) => d.detach_interface(name, mac).expect("detach"),
                }
            }
            done.extend(steps);
        }
        panic!("no fixed point: {done:?}");
    }

    #[test]
    fn a_guest_with_its_ports_gets_no_step() {
        let (a, b) = (wanted("web-0", 1), wanted("web-1", 2));
        assert!(plan(&ready(&[a.clone(), b.clone()]), &[had(&a), had(&b)]).is_empty());
        // libvirt writes MACs in lower case; a Port's may be in capitals.
        let mut upper = a.clone();
        upper.nic.mac = upper.nic.mac.to_ascii_uppercase();
        assert!(plan(&ready(&[upper]), &[had(&a)]).is_empty());
        // An MTU read back differently is no reason to unplug a running guest's interface.
        let mut other_mtu = had(&a);
        other_mtu.mtu = None;
        assert!(plan(&ready(&[a]), &[other_mtu]).is_empty());
    }

    #[test]
    fn a_port_added_is_attached_and_one_removed_detached() {
        let (a, b, c) = (wanted("web-0", 1), wanted("web-1", 2), wanted("mine", 3));
        assert_eq!(
            plan(&ready(&[a.clone(), b.clone(), c.clone()]), &[had(&a)]),
            [Step::Attach(b.clone()), Step::Attach(c.clone())]
        );
        assert_eq!(
            plan(
                &ready(&[a.clone(), c.clone()]),
                &[had(&a), had(&b), had(&c)]
            ),
            [Step::Detach(b.nic.mac.clone())]
        );
        // Every port taken away: every interface goes.
        assert_eq!(
            plan(&Resolved::default(), &[had(&a), had(&b)]),
            [
                Step::Detach(a.nic.mac.clone()),
                Step::Detach(b.nic.mac.clone())
            ]
        );
    }

    #[test]
    fn an_interface_nobody_can_tell_is_not_a_ports_stays() {
        let (a, b) = (wanted("web-0", 1), wanted("web-1", 2));
        let stranger = AttachedInterface {
            mac: "52:54:00:12:34:56".into(),
            tap: Some("vnet0".into()),
            mtu: None,
        };
        let both = [had(&a), had(&b), stranger.clone()];
        // Every Port read: the interface plugged in behind Stratus's back goes.
        assert_eq!(
            plan(&ready(&[a.clone(), b.clone()]), &both),
            [Step::Detach(stranger.mac.clone())]
        );
        // A Port that could not be read might be it: nothing goes, the ready ones still come.
        let mut r = ready(std::slice::from_ref(&a));
        r.unknown = true;
        assert!(plan(&r, &both).is_empty());
        let c = wanted("web-2", 3);
        r.ready.push(c.clone());
        assert_eq!(plan(&r, &both), [Step::Attach(c)]);
        // A Port read but not ready here (being moved): its interface stays.
        let mut r = ready(std::slice::from_ref(&a));
        r.keep.push(b.nic.mac.to_ascii_uppercase());
        r.waiting
            .push("port \"web-1\" is not placed on node n1 yet".into());
        assert_eq!(
            plan(&r, &both),
            [Step::Detach(stranger.mac.clone())],
            "only the stranger goes"
        );
    }

    #[test]
    fn a_ports_mac_on_another_tap_is_unplugged_then_plugged_in_right() {
        let a = wanted("web-0", 1);
        let mut wrong = had(&a);
        wrong.tap = Some("vnet7".into());
        let mut r = ready(std::slice::from_ref(&a));
        r.unknown = true;
        assert_eq!(
            plan(&r, &[wrong.clone()]),
            [Step::Detach(a.nic.mac.clone())]
        );
        // Not attached again while the guest still has the other one.
        assert!(!plan(&r, &[wrong]).contains(&Step::Attach(a.clone())));
        assert_eq!(plan(&r, &[]), [Step::Attach(a)]);
    }

    /// An interface plugged in behind the agent's back, that no Port is.
    fn stranger() -> AttachedInterface {
        AttachedInterface {
            mac: "52:54:00:aa:bb:cc".into(),
            tap: Some("vnet3".into()),
            mtu: None,
        }
    }

    fn ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).expect("milliseconds")
    }

    /// One agent pass over the fake hypervisor's domain at `now`: plan, admit, take.
    fn pass(
        r: &Replugs,
        d: &FakeDomains,
        name: &str,
        want: &Resolved,
        now: Instant,
    ) -> (Vec<Step>, Vec<Notice>) {
        let had = d.interfaces(name).expect("interfaces");
        let (steps, notices) = r.admit("u1", want, &had, plan(want, &had), now);
        for s in &steps {
            match s {
                Step::Attach(w) => d.attach_interface(name, &w.nic).expect("attach"),
                Step::Detach(mac) => d.detach_interface(name, mac).expect("detach"),
            }
        }
        (steps, notices)
    }

    #[test]
    fn a_guest_that_keeps_unplugging_its_nic_is_replugged_with_backoff() {
        let d = FakeDomains::default();
        let mut spec = conformance::spec(
            "stratus-replug-1",
            "0b2f0c4e-0000-4000-8000-0000000000b1",
            Path::new("/nonexistent"),
        );
        let a = wanted("web-0", 1);
        spec.interfaces = Vec::new();
        d.define(&spec).expect("define");
        d.start(&spec.name).expect("start");
        let name = spec.name.as_str();
        let want = ready(std::slice::from_ref(&a));
        let r = Replugs::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        // The first plug is at once, with nothing to tell.
        assert_eq!(
            pass(&r, &d, name, &want, at(0)),
            (vec![Step::Attach(a.clone())], vec![])
        );
        // Lost at once, again and again: each re-plug waits twice as long as the last.
        let mut now = 0;
        let mut waits = Vec::new();
        for count in 1..=9 {
            d.unplug(name, &a.nic.mac);
            // Too soon: held, told once.
            let (steps, notices) = pass(&r, &d, name, &want, at(now + 1));
            assert!(steps.is_empty(), "{steps:?}");
            let Some(Notice::Held { wait, .. }) = notices.first() else {
                panic!("not told: {notices:?}");
            };
            waits.push(wait.as_millis() + 1);
            assert_eq!(pass(&r, &d, name, &want, at(now + 2)), (vec![], vec![]));
            now += ms(*wait) + 1;
            let (steps, notices) = pass(&r, &d, name, &want, at(now));
            assert_eq!(steps, [Step::Attach(a.clone())]);
            assert!(
                matches!(&notices[..], [Notice::Replugged { count: c, .. }] if *c == count),
                "{notices:?}"
            );
        }
        assert_eq!(
            waits,
            [
                1000, 2000, 4000, 8000, 16_000, 32_000, 64_000, 128_000, 256_000
            ]
        );
        // Capped.
        d.unplug(name, &a.nic.mac);
        let (_, notices) = pass(&r, &d, name, &want, at(now + 1));
        assert_eq!(
            notices,
            [Notice::Held {
                port: "web-0".into(),
                wait: REPLUG_CAP - Duration::from_millis(1)
            }]
        );
        // Plugged in and seen holding for a minute: its losses are forgotten.
        now += ms(REPLUG_CAP);
        assert_eq!(pass(&r, &d, name, &want, at(now)).0.len(), 1);
        now += ms(REPLUG_SETTLED);
        assert_eq!(pass(&r, &d, name, &want, at(now)), (vec![], vec![]));
        d.unplug(name, &a.nic.mac);
        assert_eq!(
            pass(&r, &d, name, &want, at(now + 1)),
            (
                vec![Step::Attach(a.clone())],
                vec![Notice::Replugged {
                    port: "web-0".into(),
                    count: 1,
                    next: 2 * REPLUG_FIRST
                }]
            )
        );
        // A Port taken out of the server is forgotten: added again, it is plugged in at once.
        assert_eq!(
            pass(&r, &d, name, &Resolved::default(), at(now + 2)).0,
            [Step::Detach(a.nic.mac.clone())]
        );
        assert_eq!(
            pass(&r, &d, name, &want, at(now + 3)).0,
            [Step::Attach(a.clone())]
        );
        // Detaches are never held.
        d.plug(name, stranger());
        assert_eq!(
            pass(&r, &d, name, &want, at(now + 4)).0,
            [Step::Detach("52:54:00:aa:bb:cc".into())]
        );
    }

    #[test]
    fn drift_on_the_fake_hypervisor_is_put_right_and_then_left_alone() {
        let d = FakeDomains::default();
        let mut spec = conformance::spec(
            "stratus-hotplug-1",
            "0b2f0c4e-0000-4000-8000-0000000000a1",
            Path::new("/nonexistent"),
        );
        let (a, b) = (wanted("web-0", 1), wanted("web-1", 2));
        spec.interfaces = vec![a.nic.clone()];
        d.define(&spec).expect("define");
        d.start(&spec.name).expect("start");
        assert_eq!(d.interfaces(&spec.name).expect("interfaces"), [had(&a)]);
        let name = spec.name.as_str();
        // A port added to the running server: plugged in, the guest left running.
        let both = ready(&[a.clone(), b.clone()]);
        assert_eq!(converge(&d, name, &both), [Step::Attach(b.clone())]);
        assert_eq!(d.interfaces(name).expect("interfaces"), [had(&a), had(&b)]);
        assert_eq!(
            d.lookup(name).expect("lookup").map(|i| i.state),
            Some(DomainState::Running)
        );
        // Unplugged behind the agent's back: plugged in again.
        d.unplug(name, &b.nic.mac);
        assert_eq!(converge(&d, name, &both), [Step::Attach(b.clone())]);
        // One plugged in that no port names: unplugged.
        d.plug(name, stranger());
        assert_eq!(
            converge(&d, name, &both),
            [Step::Detach("52:54:00:aa:bb:cc".into())]
        );
        // The port taken out of the server: unplugged; then nothing more to do.
        assert_eq!(
            converge(&d, name, &ready(std::slice::from_ref(&a))),
            [Step::Detach(b.nic.mac.clone())]
        );
        assert!(converge(&d, name, &ready(std::slice::from_ref(&a))).is_empty());
        assert_eq!(d.interfaces(name).expect("interfaces"), [had(&a)]);
        // A failing hypervisor call fails the step, and leaves the guest as it was.
        d.fail(crate::compute::driver::fake::Verb::Interface, 1);
        assert!(d.attach_interface(name, &b.nic).is_err());
        assert_eq!(d.interfaces(name).expect("interfaces"), [had(&a)]);
    }
}
