//! What to do next for a Volume or VolumeSnapshot placed on one of the node's pools: a pure
//! function of the object (its finalizer stage, what it asks, what the agent recorded) and of
//! what the pool holds, with no I/O.

use stratus_runtime::finalizer::Stage;

use crate::driver::InUseGrowth;

/// What the agent needs to know of a Volume or VolumeSnapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intent {
    /// Where it stands with the agent's finalizer.
    pub stage: Stage,
    /// The size it asks for, in bytes (a snapshot: its volume's, known once it is made).
    pub size: Option<u64>,
    /// Whether the agent recorded it as made before (a volume's `status.sizeGiB`, a
    /// snapshot's `status.createdAt`): missing data is then drift, never made again empty.
    pub made: bool,
    /// Whether a Server holds it (`status.attachedTo`).
    pub attached: bool,
    /// Whether its store grows a volume a guest holds ([`crate::driver::Backend::grows_in_use`]).
    pub grows_in_use: InUseGrowth,
}

/// The next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing of it is ours (deleted before the agent started on it).
    Nothing,
    /// Add the finalizer before anything is made.
    AddFinalizer,
    /// Make its data (from its source).
    Create,
    /// Grow it to this many bytes.
    Extend(u64),
    /// Grow it to this many bytes while a Server holds it, where it is
    /// ([`crate::driver::Backend::extend_held`]): a store that could grow it only by moving
    /// it refuses, and it grows once detached.
    ExtendInPlace(u64),
    /// It asks for more than it has while a Server holds it, and its store cannot grow it
    /// under a guest: it grows once detached.
    GrowWhenDetached,
    /// It is as asked: report it (its device path, size, Available).
    Report,
    /// It was made and its data is gone from the pool (removed behind the agent's back):
    /// report it, never make it again empty.
    Missing,
    /// It is deleted while a Server holds it: wait for the detach.
    WaitDetach,
    /// It is deleted: remove its data.
    Delete,
    /// It is deleted and its data is gone: release the finalizer.
    Release,
}

/// Whether [`plan`]'s step for an object at finalizer `stage` depends on what its pool holds
/// of it: not while its finalizer is still to be added, nor once it is gone, so those passes
/// need not ask the pool (an LVM pool's listing is an lvm2 command, some 50 ms).
pub fn needs_observed(stage: Stage) -> bool {
    !matches!(stage, Stage::Adopt | Stage::Gone)
}

/// The step for `intent` when the pool holds `observed` bytes of it (`None`: nothing).
pub fn plan(intent: Intent, observed: Option<u64>) -> Step {
    match intent.stage {
        Stage::Gone => Step::Nothing,
        Stage::Cleanup if intent.attached => Step::WaitDetach,
        Stage::Cleanup if observed.is_some() => Step::Delete,
        Stage::Cleanup => Step::Release,
        Stage::Adopt => Step::AddFinalizer,
        Stage::Live => match (observed, intent.size) {
            (None, _) if intent.made => Step::Missing,
            (None, _) => Step::Create,
            (Some(have), Some(want)) if have < want && intent.attached => {
                match intent.grows_in_use {
                    InUseGrowth::Always => Step::Extend(want),
                    InUseGrowth::WhenSpaceFollows => Step::ExtendInPlace(want),
                    InUseGrowth::Never => Step::GrowWhenDetached,
                }
            }
            (Some(have), Some(want)) if have < want => Step::Extend(want),
            (Some(_), _) => Step::Report,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn intent(stage: Stage, size: Option<u64>, made: bool, attached: bool) -> Intent {
        Intent {
            stage,
            size,
            made,
            attached,
            grows_in_use: InUseGrowth::Always,
        }
    }

    #[test]
    fn every_case_has_its_step() {
        use Stage::*;
        let g1 = Some(GIB);
        let g2 = Some(2 * GIB);
        let table = [
            // (stage, size, made, attached), observed => step
            ((Gone, g1, true, false), Some(GIB), Step::Nothing),
            ((Gone, g1, false, false), None, Step::Nothing),
            ((Adopt, g1, false, false), None, Step::AddFinalizer),
            ((Adopt, g1, true, false), Some(GIB), Step::AddFinalizer),
            ((Live, g1, false, false), None, Step::Create),
            // Made before, and gone: drift, never made again empty.
            ((Live, g1, true, false), None, Step::Missing),
            ((Live, g1, true, true), None, Step::Missing),
            // A create that completed before the agent died: reported, not made again.
            ((Live, g1, false, false), Some(GIB), Step::Report),
            ((Live, g1, true, false), Some(GIB), Step::Report),
            ((Live, g2, true, false), Some(GIB), Step::Extend(2 * GIB)),
            ((Live, g2, true, true), Some(GIB), Step::Extend(2 * GIB)),
            // Never shrunk: a smaller size asked is what the API refuses; the volume stays.
            ((Live, g1, true, false), Some(2 * GIB), Step::Report),
            // A snapshot's size is its volume's: not known before it is made.
            ((Live, None, false, false), None, Step::Create),
            ((Live, None, true, false), Some(GIB), Step::Report),
            ((Cleanup, g1, true, false), Some(GIB), Step::Delete),
            ((Cleanup, g1, true, true), Some(GIB), Step::WaitDetach),
            ((Cleanup, g1, true, true), None, Step::WaitDetach),
            ((Cleanup, g1, true, false), None, Step::Release),
            ((Cleanup, g1, false, false), None, Step::Release),
        ];
        for ((stage, size, made, attached), observed, step) in table {
            assert_eq!(
                plan(intent(stage, size, made, attached), observed),
                step,
                "{stage:?} size {size:?} made {made} attached {attached}, observed {observed:?}"
            );
        }
    }

    #[test]
    fn a_step_that_needs_no_look_at_the_pool_is_the_same_whatever_it_holds() {
        use Stage::*;
        for stage in [Gone, Adopt, Live, Cleanup] {
            let mut steps = Vec::new();
            for (made, attached) in [(false, false), (true, false), (true, true)] {
                for observed in [None, Some(GIB), Some(2 * GIB)] {
                    steps.push(plan(intent(stage, Some(2 * GIB), made, attached), observed));
                }
            }
            steps.dedup();
            // A stage whose step can differ with what the pool holds is looked at.
            assert_eq!(
                steps.len() > 1,
                needs_observed(stage),
                "{stage:?}: {steps:?}"
            );
        }
    }

    #[test]
    fn a_store_that_cannot_grow_a_held_volume_grows_it_once_detached() {
        let held = |attached: bool| Intent {
            grows_in_use: InUseGrowth::Never,
            ..intent(Stage::Live, Some(2 * GIB), true, attached)
        };
        assert_eq!(plan(held(true), Some(GIB)), Step::GrowWhenDetached);
        assert_eq!(plan(held(false), Some(GIB)), Step::Extend(2 * GIB));
        // Nothing else changes: as asked, it is reported; gone, it is missing.
        assert_eq!(plan(held(true), Some(2 * GIB)), Step::Report);
        assert_eq!(plan(held(true), None), Step::Missing);
    }

    #[test]
    fn a_store_that_grows_in_place_grows_a_held_volume_only_there() {
        let of = |attached: bool| Intent {
            grows_in_use: InUseGrowth::WhenSpaceFollows,
            ..intent(Stage::Live, Some(2 * GIB), true, attached)
        };
        // Held: grown where it is, or not at all (never moved under the guest).
        assert_eq!(plan(of(true), Some(GIB)), Step::ExtendInPlace(2 * GIB));
        // Detached: it may move.
        assert_eq!(plan(of(false), Some(GIB)), Step::Extend(2 * GIB));
        assert_eq!(plan(of(true), Some(2 * GIB)), Step::Report);
        assert_eq!(plan(of(true), None), Step::Missing);
        // Being deleted while held: it waits for the detach, whatever the store.
        let going = Intent {
            stage: Stage::Cleanup,
            ..of(true)
        };
        assert_eq!(plan(going, Some(GIB)), Step::WaitDetach);
    }
}
