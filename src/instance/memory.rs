//! The memory budget: what instances hold, and what to give up so another one fits. Pure: the
//! registry describes its instances as [`Holder`]s and acts on the [`Step`] it gets back, one
//! step at a time, re-planning after each (a drain can take a while, and the world changes).
//!
//! Weights are counted once per [`WeightsKey`], whoever holds them (instances running on them,
//! or parked ones keeping them); contexts (KV cache and compute buffers) once per running
//! instance. To make room the planner first frees parked weights nobody else uses, then parks
//! running instances (their context goes, their weights stay until needed), least recently used
//! and cheapest to bring back first, never an instance that is not evictable.

use std::time::Duration;

use serde::Serialize;

use crate::engine::weights::WeightsKey;
use crate::models::memory::Footprint;

/// What an instance holds now.
#[derive(Debug, Clone)]
pub struct Holder {
    pub name: String,
    pub state: Held,
    pub key: Option<WeightsKey>,
    /// None when it cannot be known (a model not yet downloaded): counted as nothing.
    pub footprint: Option<Footprint>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Held {
    /// Running, starting or stopping: weights and a context.
    Active { evictable: bool, starting: bool, busy: bool, idle_for: Duration, resident_for: Duration },
    /// Weights only, since `for` ago.
    Parked { idle_for: Duration },
}

/// The next thing to do for `want` to fit.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Fits,
    /// Free a parked instance's weights (it becomes `stopped`).
    Release(String),
    /// Park a running instance (drained first).
    Park(String),
    /// Nothing more can be given up; the arithmetic, for the error's details.
    Refuse(String),
    /// Room could be made only by parking instances that are serving (or only just started):
    /// a patient start waits for them (see [`Urgency`]).
    Wait,
}

/// How a start may make room.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Urgency {
    /// A user's start: every evictable instance may give way (a busy one is drained first).
    Now,
    /// A request's on-demand start: only instances that are idle and have been resident for
    /// `min_resident` give way; else it waits, so that interleaved requests for models that do
    /// not fit together are served in runs of one model instead of a swap each.
    Patient { min_resident: Duration },
}

/// The running instance that should give way next, if any may; `Err(())` when some could but
/// `urgency` says to wait for them.
pub fn running_victim<'h>(holders: &'h [Holder], name: &str, urgency: Urgency) -> Result<Option<&'h Holder>, ()> {
    let mut later = false;
    let best = holders
        .iter()
        .filter(|h| h.name != name)
        .filter_map(|h| match h.state {
            Held::Active { evictable: true, starting, busy, idle_for, resident_for } => {
                let now = !starting
                    && match urgency {
                        Urgency::Now => true,
                        Urgency::Patient { min_resident } => !busy && resident_for >= min_resident,
                    };
                // One still loading (or stopping), busy or just started may give way later.
                later |= !now;
                now.then(|| (h, !busy, score(idle_for, &h.footprint)))
            }
            _ => None,
        })
        // An idle instance before a busy one (which is drained, never cut).
        .max_by(|a, b| (a.1, a.2).partial_cmp(&(b.1, b.2)).unwrap_or(std::cmp::Ordering::Equal));
    match best {
        Some((h, ..)) => Ok(Some(h)),
        // A user's start does not wait: what cannot give way now is refused with the reason.
        None if later && matches!(urgency, Urgency::Patient { .. }) => Err(()),
        None => Ok(None),
    }
}

/// Higher is a better victim: long unused, cheap to bring back.
fn score(idle: Duration, f: &Option<Footprint>) -> f64 {
    let reload_gib = f.map_or(0.0, |f| f.weights as f64 / (1u64 << 30) as f64);
    idle.as_secs_f64() / (1.0 + reload_gib)
}

/// The budget's state, as `GET /api/system/memory` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BudgetUsage {
    pub budget: u64,
    pub used: u64,
    pub weights: u64,
    pub contexts: u64,
}

pub fn usage(budget: u64, holders: &[Holder]) -> BudgetUsage {
    let (weights, contexts) = held(holders);
    BudgetUsage { budget, used: weights + contexts, weights, contexts }
}

/// Bytes of distinct weights and of contexts held.
fn held(holders: &[Holder]) -> (u64, u64) {
    let mut keys: Vec<&WeightsKey> = Vec::new();
    let (mut weights, mut contexts) = (0, 0);
    for h in holders {
        let Some(f) = h.footprint else { continue };
        if matches!(h.state, Held::Active { .. }) {
            contexts += f.context();
        }
        match &h.key {
            Some(k) if keys.contains(&k) => {}
            Some(k) => {
                keys.push(k);
                weights += f.weights;
            }
            None => weights += f.weights,
        }
    }
    (weights, contexts)
}

/// Whether `key` is held by someone other than `except`.
fn key_held(holders: &[Holder], key: &Option<WeightsKey>, except: &str) -> bool {
    key.is_some() && holders.iter().any(|h| h.name != except && h.key == *key)
}

/// The cost of starting `name` (not among `holders` as active) with `footprint` and `key`.
pub fn cost(holders: &[Holder], name: &str, key: &Option<WeightsKey>, footprint: Footprint) -> u64 {
    let shared = key.is_some() && holders.iter().any(|h| h.key == *key && h.name != name)
        || holders.iter().any(|h| h.name == name && matches!(h.state, Held::Parked { .. }));
    footprint.context() + if shared { 0 } else { footprint.weights }
}

pub fn plan(
    budget: u64,
    holders: &[Holder],
    name: &str,
    key: &Option<WeightsKey>,
    footprint: Footprint,
    urgency: Urgency,
) -> Step {
    let (weights, contexts) = held(holders);
    let need = cost(holders, name, key, footprint);
    if weights + contexts + need <= budget {
        return Step::Fits;
    }
    let parked = holders
        .iter()
        .filter(|h| h.name != name && !key_held(holders, &h.key, &h.name) && h.key != *key)
        .filter_map(|h| match h.state {
            Held::Parked { idle_for } => Some((h, score(idle_for, &h.footprint))),
            Held::Active { .. } => None,
        })
        .max_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((h, _)) = parked {
        return Step::Release(h.name.clone());
    }
    match running_victim(holders, name, urgency) {
        Ok(Some(h)) => Step::Park(h.name.clone()),
        Ok(None) => Step::Refuse(explain(budget, holders, name, need, footprint, weights + contexts)),
        Err(()) => Step::Wait,
    }
}

fn explain(budget: u64, holders: &[Holder], name: &str, need: u64, f: Footprint, used: u64) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    let shared = if need < f.total() { ", weights already loaded" } else { "" };
    let mut held: Vec<String> = holders
        .iter()
        .filter(|h| h.name != name)
        .map(|h| {
            let bytes = h.footprint.map_or(0, |f| match h.state {
                Held::Active { .. } => f.total(),
                Held::Parked { .. } => f.weights,
            });
            let why = match h.state {
                Held::Active { evictable: false, .. } => "running, evictable: false",
                Held::Active { starting: true, .. } => "starting",
                Held::Active { .. } => "running",
                Held::Parked { .. } => "parked, its weights in use",
            };
            format!("'{}' {} ({why})", h.name, mib(bytes))
        })
        .collect();
    if held.is_empty() {
        held.push("nothing".into());
    }
    format!(
        "'{name}' needs {} (weights {}, KV cache {}, compute {}{shared}); memory_budget is {}, {} in use by {}, \
         so {} more would be needed and nothing else can be parked or freed",
        mib(need),
        mib(f.weights),
        mib(f.kv),
        mib(f.compute),
        mib(budget),
        mib(used),
        held.join(", "),
        mib((used + need).saturating_sub(budget)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const MIB: u64 = 1 << 20;

    fn key(p: &str) -> Option<WeightsKey> {
        Some(WeightsKey { path: PathBuf::from(p), n_gpu_layers: 0, rpc_servers: vec![], lora: vec![], process: None })
    }

    fn fp(weights: u64, kv: u64) -> Footprint {
        Footprint { weights: weights * MIB, kv: kv * MIB, compute: 0 }
    }

    fn active(name: &str, k: &str, idle_secs: u64) -> Holder {
        Holder {
            name: name.into(),
            state: Held::Active {
                evictable: true,
                starting: false,
                busy: false,
                idle_for: Duration::from_secs(idle_secs),
                resident_for: Duration::from_secs(idle_secs + 1),
            },
            key: key(k),
            footprint: Some(fp(300, 100)),
        }
    }

    fn parked(name: &str, k: &str, idle_secs: u64) -> Holder {
        Holder {
            name: name.into(),
            state: Held::Parked { idle_for: Duration::from_secs(idle_secs) },
            key: key(k),
            footprint: Some(fp(300, 100)),
        }
    }

    #[test]
    fn shared_weights_count_once_and_cost_nothing_to_share() {
        let holders = vec![active("a", "/m", 0), active("b", "/m", 0)];
        let u = usage(u64::MAX, &holders);
        assert_eq!((u.weights, u.contexts), (300 * MIB, 200 * MIB));
        assert_eq!(cost(&holders, "c", &key("/m"), fp(300, 100)), 100 * MIB);
        assert_eq!(cost(&holders, "c", &key("/other"), fp(300, 100)), 400 * MIB);
        assert_eq!(plan(600 * MIB, &holders, "c", &key("/m"), fp(300, 100), Urgency::Now), Step::Fits);
    }

    #[test]
    fn parked_weights_are_freed_before_running_instances_are_parked() {
        let holders = vec![active("a", "/a", 1000), parked("b", "/b", 10)];
        assert_eq!(plan(800 * MIB, &holders, "c", &key("/c"), fp(300, 100), Urgency::Now), Step::Release("b".into()));
        // Once b is gone, a (least recently used) is parked.
        let holders = vec![active("a", "/a", 1000), active("d", "/d", 5)];
        assert_eq!(plan(800 * MIB, &holders, "c", &key("/c"), fp(300, 100), Urgency::Now), Step::Park("a".into()));
    }

    #[test]
    fn a_parked_instance_restarting_needs_only_its_context() {
        let holders = vec![parked("a", "/a", 50)];
        assert_eq!(cost(&holders, "a", &key("/a"), fp(300, 100)), 100 * MIB);
        assert_eq!(plan(400 * MIB, &holders, "a", &key("/a"), fp(300, 100), Urgency::Now), Step::Fits);
        // Weights shared with the one starting are never the ones released.
        let holders = vec![parked("a", "/a", 50), parked("b", "/b", 1)];
        assert_eq!(plan(500 * MIB, &holders, "c", &key("/a"), fp(300, 100), Urgency::Now), Step::Release("b".into()));
    }

    #[test]
    fn a_patient_start_waits_for_busy_or_fresh_instances_and_a_user_start_does_not() {
        let patient = Urgency::Patient { min_resident: Duration::from_secs(5) };
        let mut busy = active("busy", "/x", 100);
        busy.state = Held::Active {
            evictable: true,
            starting: false,
            busy: true,
            idle_for: Duration::ZERO,
            resident_for: Duration::from_secs(100),
        };
        let mut fresh = active("fresh", "/y", 0);
        fresh.state = Held::Active {
            evictable: true,
            starting: false,
            busy: false,
            idle_for: Duration::from_secs(1),
            resident_for: Duration::from_secs(1),
        };
        let holders = vec![busy, fresh];
        assert_eq!(plan(800 * MIB, &holders, "c", &key("/c"), fp(300, 100), patient), Step::Wait);
        assert_eq!(plan(800 * MIB, &holders, "c", &key("/c"), fp(300, 100), Urgency::Now), Step::Park("fresh".into()));
        // Once the busy one is done and has had its time, it goes first (least recently used).
        let holders = vec![active("done", "/x", 100), holders[1].clone()];
        assert_eq!(plan(800 * MIB, &holders, "c", &key("/c"), fp(300, 100), patient), Step::Park("done".into()));
    }

    #[test]
    fn idle_before_busy_and_never_the_unevictable() {
        let mut busy = active("busy", "/x", 1000);
        busy.state = Held::Active {
            evictable: true,
            starting: false,
            busy: true,
            idle_for: Duration::from_secs(1000),
            resident_for: Duration::from_secs(1000),
        };
        let idle = active("idle", "/y", 1);
        assert_eq!(
            plan(900 * MIB, &[busy.clone(), idle], "c", &key("/c"), fp(300, 100), Urgency::Now),
            Step::Park("idle".into())
        );
        let mut pinned = active("pinned", "/p", 1000);
        pinned.state = Held::Active {
            evictable: false,
            starting: false,
            busy: false,
            idle_for: Duration::from_secs(1000),
            resident_for: Duration::from_secs(1000),
        };
        match plan(500 * MIB, &[pinned], "c", &key("/c"), fp(300, 100), Urgency::Now) {
            Step::Refuse(why) => {
                assert!(why.contains("'c' needs 400.0 MiB"), "{why}");
                assert!(why.contains("memory_budget is 500.0 MiB, 400.0 MiB in use"), "{why}");
                assert!(why.contains("'pinned' 400.0 MiB (running, evictable: false)"), "{why}");
                assert!(why.contains("300.0 MiB more would be needed"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }
}
