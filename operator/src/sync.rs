//! The pod-facing half of a reconcile: read every pod's server, plan, then load, reload and
//! unload so the servers match the plan, and report per pod what happened. No Kubernetes API
//! call happens here, so it runs the same against real servers on 127.0.0.1 in tests.

use std::collections::BTreeSet;

use futures::stream::{self, StreamExt};

use crate::crd::{Desired, LoraAdapterStatus};
use crate::plan::{plan, Decision, Issue, Observed, PodView};
use crate::pods::PodTarget;
use crate::servers::{AdapterServers, ServedAdapter};

/// Servers asked at once.
const CONCURRENCY: usize = 16;

/// What happened on one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Already loaded as desired.
    Kept,
    /// Loaded now.
    Loaded,
    /// Unloaded and loaded again; the string says what changed.
    Reloaded(String),
    /// Unloaded now.
    Unloaded,
    /// Not loaded, and not wanted.
    Absent,
    /// Could not act (see the issue); retried later.
    Skipped(Issue),
    /// A server call failed (its message).
    Failed(String),
}

/// One pod's line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodReport {
    /// The pod's name.
    pub pod: String,
    /// Its IP.
    pub ip: String,
    /// Selected by the adapter (false: only listed in its last status).
    pub selected: bool,
    /// What happened.
    pub outcome: Outcome,
    /// Pinned there (when it holds the adapter).
    pub pinned: bool,
}

impl PodReport {
    /// The adapter is on this pod now.
    pub fn holds(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Kept | Outcome::Loaded | Outcome::Reloaded(_)
        )
    }

    /// The adapter was (re)loaded on this pod by this reconcile.
    pub fn fresh(&self) -> bool {
        matches!(self.outcome, Outcome::Loaded | Outcome::Reloaded(_))
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// One line per pod, in the order the pods were given.
    pub pods: Vec<PodReport>,
    /// Pods the adapter should be on.
    pub desired_count: usize,
    /// Replicas no eligible pod could take.
    pub shortfall: usize,
    /// Failures unloading the adapter's previous name: (pod, message).
    pub stale_failures: Vec<(String, String)>,
}

impl SyncReport {
    /// Pods that hold the adapter.
    pub fn holding(&self) -> impl Iterator<Item = &PodReport> {
        self.pods.iter().filter(|p| p.holds())
    }

    /// Server calls that failed, (pod, message), including unreachable selected pods.
    pub fn failures(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .pods
            .iter()
            .filter_map(|p| match &p.outcome {
                Outcome::Failed(m) => Some((p.pod.clone(), m.clone())),
                Outcome::Skipped(Issue::Unreachable(m)) if p.selected => Some((p.pod.clone(), m.clone())),
                _ => None,
            })
            .collect();
        out.extend(self.stale_failures.iter().cloned());
        out
    }
}

/// Reads every ready pod's server (concurrently).
pub async fn observe(servers: &dyn AdapterServers, targets: Vec<PodTarget>) -> Vec<PodView> {
    let futures: Vec<_> = targets
        .into_iter()
        .map(|target| async move {
            let observed = match &target.endpoint {
                Err(why) => Observed::NotReady(why.clone()),
                Ok(ep) => match servers.state(ep).await {
                    Ok(s) => Observed::Serving(s),
                    Err(e) => Observed::Unreachable(e.to_string()),
                },
            };
            PodView { target, observed }
        })
        .collect();
    // NB: futures are built first and then streamed: a stream of borrowing closures is not
    // provably Send for every lifetime, which the controller needs.
    stream::iter(futures).buffered(CONCURRENCY).collect().await
}

/// Makes the servers match `desired`: reads them, plans, acts, reports. `prev` (the last
/// status) keeps placements stable and names the adapter's previous name.
pub async fn converge(
    servers: &dyn AdapterServers,
    desired: &Desired,
    targets: Vec<PodTarget>,
    prev: Option<&LoraAdapterStatus>,
) -> SyncReport {
    let views = observe(servers, targets).await;
    let sticky: BTreeSet<String> = prev
        .map(|s| s.loaded_on.iter().map(|l| l.pod.clone()).collect())
        .unwrap_or_default();
    let old_name = prev.and_then(|s| s.adapter_name.as_deref());
    let p = plan(desired, &views, &sticky, old_name);
    let stale: BTreeSet<usize> = p.stale.iter().copied().collect();
    let futures: Vec<_> = views
        .iter()
        .zip(p.decisions)
        .enumerate()
        .map(|(i, (view, decision))| {
            let old = old_name.filter(|_| stale.contains(&i));
            act(servers, desired, view, decision, old)
        })
        .collect();
    let results: Vec<(PodReport, Option<String>)> =
        stream::iter(futures).buffered(CONCURRENCY).collect().await;
    let mut report = SyncReport {
        desired_count: p.desired_count,
        shortfall: p.shortfall,
        ..Default::default()
    };
    for (line, stale_failure) in results {
        if let Some(m) = stale_failure {
            report.stale_failures.push((line.pod.clone(), m));
        }
        report.pods.push(line);
    }
    report
}

/// Carries out one pod's decision; also unloads the adapter's previous name there (`old`).
async fn act(
    servers: &dyn AdapterServers,
    desired: &Desired,
    view: &PodView,
    decision: Decision,
    old: Option<&str>,
) -> (PodReport, Option<String>) {
    let t = &view.target;
    let mut line = PodReport {
        pod: t.name.clone(),
        ip: t.ip.clone(),
        selected: t.selected,
        outcome: Outcome::Absent,
        pinned: desired.pinned,
    };
    let Ok(ep) = t.endpoint.as_deref() else {
        line.outcome = match decision {
            Decision::Skip(issue) => Outcome::Skipped(issue),
            _ => Outcome::Skipped(Issue::NotReady("no endpoint".into())),
        };
        return (line, None);
    };
    // NB: the old name goes first, so its slot is free for the new one.
    let mut stale_failure = None;
    if let Some(old) = old {
        if let Err(e) = servers.unload(ep, old).await {
            stale_failure = Some(format!("unloading previous name {old:?}: {e}"));
        }
    }
    let adapter = ServedAdapter {
        name: desired.name.clone(),
        path: desired.path.clone(),
        pinned: desired.pinned,
    };
    line.outcome = match decision {
        Decision::Keep => Outcome::Kept,
        Decision::Absent => Outcome::Absent,
        Decision::Skip(issue) => Outcome::Skipped(issue),
        Decision::Load => match servers.load(ep, &adapter).await {
            Ok(()) => Outcome::Loaded,
            Err(e) => Outcome::Failed(e.to_string()),
        },
        Decision::Reload(why) => match servers.unload(ep, &desired.name).await {
            Err(e) => Outcome::Failed(format!("unloading to reload ({why}): {e}")),
            Ok(()) => match servers.load(ep, &adapter).await {
                Ok(()) => Outcome::Reloaded(why),
                Err(e) => Outcome::Failed(format!("reloading ({why}): {e}")),
            },
        },
        Decision::Unload => match servers.unload(ep, &desired.name).await {
            Ok(()) => Outcome::Unloaded,
            Err(e) => Outcome::Failed(e.to_string()),
        },
    };
    if let (Outcome::Kept, Observed::Serving(s)) = (&line.outcome, &view.observed) {
        line.pinned = s.find(&desired.name).is_some_and(|a| a.pinned);
    }
    (line, stale_failure)
}

/// Unloads every name in `names` from every pod that has it (deletion). Pods that are not ready
/// are skipped: they cannot be asked, and a restarted server comes back empty. A ready pod that
/// does not answer fails the pass only if `must_reach` names it (the last status said it held
/// the adapter); otherwise it is skipped (it may not be a loraplane server at all).
pub async fn unload_everywhere(
    servers: &dyn AdapterServers,
    names: &[String],
    targets: Vec<PodTarget>,
    must_reach: &BTreeSet<String>,
) -> SyncReport {
    let views = observe(servers, targets).await;
    let futures: Vec<_> = views
        .into_iter()
        .map(|view| async move {
            let t = view.target;
            // NB: in cleanup, only pods that must be reached count as failures.
            let selected = must_reach.contains(&t.name);
            let outcome = match (&view.observed, t.endpoint.as_deref()) {
                (Observed::NotReady(why), _) => Outcome::Skipped(Issue::NotReady(why.clone())),
                (Observed::Unreachable(m), _) if must_reach.contains(&t.name) => Outcome::Failed(m.clone()),
                (Observed::Unreachable(m), _) => Outcome::Skipped(Issue::Unreachable(m.clone())),
                (Observed::Serving(s), Ok(ep)) => {
                    let mut outcome = Outcome::Absent;
                    for name in names.iter().filter(|n| s.find(n).is_some()) {
                        outcome = match servers.unload(ep, name).await {
                            Ok(()) => Outcome::Unloaded,
                            Err(e) => {
                                outcome = Outcome::Failed(e.to_string());
                                break;
                            }
                        };
                    }
                    outcome
                }
                (Observed::Serving(_), Err(why)) => Outcome::Skipped(Issue::NotReady(why.to_string())),
            };
            PodReport {
                pod: t.name,
                ip: t.ip,
                selected,
                outcome,
                pinned: false,
            }
        })
        .collect();
    let pods = stream::iter(futures).buffered(CONCURRENCY).collect().await;
    SyncReport {
        pods,
        ..Default::default()
    }
}
