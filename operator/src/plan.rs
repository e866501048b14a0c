//! Desired versus actual, with no I/O: given what each selected pod's server reports, which pods
//! should hold the adapter (placement by free slots for `replicas: N`, stable across
//! reconciles) and what to do on each pod (keep, load, reload, unload, or skip and say why).

use std::cmp::Reverse;
use std::collections::BTreeSet;

use crate::crd::{same_path, Desired};
use crate::pods::PodTarget;
use crate::servers::ServerState;

/// What the operator learned about one pod before acting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// The pod cannot be asked (not ready, no IP, terminating).
    NotReady(String),
    /// The pod is ready but its server did not answer `/get_server_info` properly.
    Unreachable(String),
    /// The server's report.
    Serving(ServerState),
}

/// One pod and what was observed there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// The pod.
    pub target: PodTarget,
    /// Its server's state.
    pub observed: Observed,
}

/// Why a selected pod cannot hold the adapter now; each maps to a condition reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Issue {
    /// Not ready / no IP / terminating: retried later.
    NotReady(String),
    /// The server did not answer.
    Unreachable(String),
    /// The server serves another base model (its name).
    BaseModelMismatch(String),
    /// The server runs without LoRA (`--enable-lora` missing).
    LoraDisabled,
}

/// The step for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Loaded as desired: nothing to do.
    Keep,
    /// Not loaded: load it.
    Load,
    /// Loaded with another path or pin: unload, then load (the server refuses to load a name it
    /// has). The string says what changed.
    Reload(String),
    /// Loaded but this pod is not (or no longer) chosen: unload it.
    Unload,
    /// Not loaded and not chosen: nothing to do.
    Absent,
    /// Cannot act on this pod.
    Skip(Issue),
}

/// The decisions for one adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// One decision per pod, in the order of the views.
    pub decisions: Vec<Decision>,
    /// Pods that also hold the adapter under its previous name (to unload first).
    pub stale: Vec<usize>,
    /// Pods the adapter should be on (`replicas`, else the selected pods).
    pub desired_count: usize,
    /// Replicas that no eligible pod could take.
    pub shortfall: usize,
}

/// The pods that should hold the adapter: every eligible selected pod, or with `replicas: N`
/// N of them, preferring pods with room (for a pinned adapter: a pin left), then pods that hold
/// it already or held it at the last reconcile (`sticky`), then most free slots, then name.
pub fn choose(desired: &Desired, views: &[PodView], sticky: &BTreeSet<String>) -> BTreeSet<String> {
    let mut candidates: Vec<(&PodView, &ServerState)> = views
        .iter()
        .filter(|v| v.target.selected)
        .filter_map(|v| match &v.observed {
            Observed::Serving(s) if eligible(desired, s).is_ok() => Some((v, s)),
            _ => None,
        })
        .collect();
    let Some(n) = desired.replicas else {
        return candidates.iter().map(|(v, _)| v.target.name.clone()).collect();
    };
    candidates.sort_by_key(|(v, s)| {
        let here = s.find(&desired.name);
        let room = !desired.pinned || s.can_pin() || here.is_some_and(|a| a.pinned);
        let holds = here.is_some() || sticky.contains(&v.target.name);
        // NB: a slot the adapter already takes here is its own, so it counts as free.
        let free = s.free_slots() + i64::from(here.is_some());
        (
            Reverse(room),
            Reverse(holds),
            Reverse(free),
            v.target.name.clone(),
        )
    });
    candidates
        .into_iter()
        .take(n)
        .map(|(v, _)| v.target.name.clone())
        .collect()
}

/// Whether a server can take the adapter at all.
fn eligible(desired: &Desired, s: &ServerState) -> Result<(), Issue> {
    if !s.lora_enabled {
        return Err(Issue::LoraDisabled);
    }
    if s.served_model_name != desired.base_model {
        return Err(Issue::BaseModelMismatch(s.served_model_name.clone()));
    }
    Ok(())
}

/// Decides every pod's step. `sticky`: pods listed in the last status; `old_name`: the name the
/// adapter had at the last reconcile, when it changed.
pub fn plan(desired: &Desired, views: &[PodView], sticky: &BTreeSet<String>, old_name: Option<&str>) -> Plan {
    let chosen = choose(desired, views, sticky);
    let decisions = views
        .iter()
        .map(|v| {
            let s = match &v.observed {
                Observed::NotReady(why) => return Decision::Skip(Issue::NotReady(why.clone())),
                Observed::Unreachable(why) => return Decision::Skip(Issue::Unreachable(why.clone())),
                Observed::Serving(s) => s,
            };
            let here = s.find(&desired.name);
            if v.target.selected {
                if let Err(issue) = eligible(desired, s) {
                    // NB: an adapter of the same name on a pod serving another model is not
                    // ours to touch.
                    return Decision::Skip(issue);
                }
            }
            match (chosen.contains(&v.target.name), here) {
                (true, None) => Decision::Load,
                (true, Some(a)) => {
                    let mut changes = Vec::new();
                    if !same_path(&a.path, &desired.path) {
                        changes.push(format!("path {} -> {}", a.path, desired.path));
                    }
                    if a.pinned != desired.pinned {
                        changes.push(format!("pinned {} -> {}", a.pinned, desired.pinned));
                    }
                    if changes.is_empty() {
                        Decision::Keep
                    } else {
                        Decision::Reload(changes.join(", "))
                    }
                }
                (false, Some(_)) => Decision::Unload,
                (false, None) => Decision::Absent,
            }
        })
        .collect();
    let stale = match old_name.filter(|o| *o != desired.name) {
        Some(old) => views
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(&v.observed, Observed::Serving(s) if s.find(old).is_some()))
            .map(|(i, _)| i)
            .collect(),
        None => Vec::new(),
    };
    let selected = views.iter().filter(|v| v.target.selected).count();
    let desired_count = desired.replicas.unwrap_or(selected);
    Plan {
        decisions,
        stale,
        desired_count,
        shortfall: desired.replicas.map_or(0, |n| n.saturating_sub(chosen.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::servers::ServedAdapter;

    fn desired(pinned: bool, replicas: Option<usize>) -> Desired {
        Desired {
            name: "ad".into(),
            path: "/a/ad".into(),
            pinned,
            base_model: "tiny".into(),
            replicas,
        }
    }

    fn serving(name: &str, slots: usize, loaded: &[(&str, &str, bool)]) -> PodView {
        PodView {
            target: PodTarget {
                name: name.into(),
                ip: "10.0.0.1".into(),
                endpoint: Ok(format!("http://{name}:1")),
                selected: true,
            },
            observed: Observed::Serving(ServerState {
                served_model_name: "tiny".into(),
                lora_enabled: true,
                max_loras_per_batch: slots,
                loaded: loaded
                    .iter()
                    .map(|(n, p, pin)| ServedAdapter {
                        name: n.to_string(),
                        path: p.to_string(),
                        pinned: *pin,
                    })
                    .collect(),
            }),
        }
    }

    fn with(mut v: PodView, observed: Observed) -> PodView {
        v.observed = observed;
        v
    }

    fn names(s: &BTreeSet<String>) -> Vec<&str> {
        s.iter().map(String::as_str).collect()
    }

    #[test]
    fn unset_replicas_means_every_eligible_selected_pod() {
        let views = vec![
            serving("a", 4, &[]),
            serving("b", 4, &[("ad", "/a/ad/", false)]),
            with(serving("c", 4, &[]), Observed::NotReady("not ready".into())),
        ];
        let p = plan(&desired(false, None), &views, &BTreeSet::new(), None);
        assert_eq!(
            p.decisions,
            [
                Decision::Load,
                Decision::Keep,
                Decision::Skip(Issue::NotReady("not ready".into()))
            ]
        );
        assert_eq!((p.desired_count, p.shortfall), (3, 0));
    }

    #[test]
    fn changed_path_or_pin_reloads() {
        let views = vec![
            serving("a", 4, &[("ad", "/old", false)]),
            serving("b", 4, &[("ad", "/a/ad", true)]),
        ];
        let p = plan(&desired(false, None), &views, &BTreeSet::new(), None);
        assert_eq!(
            p.decisions,
            [
                Decision::Reload("path /old -> /a/ad".into()),
                Decision::Reload("pinned true -> false".into())
            ]
        );
    }

    #[test]
    fn replicas_pick_most_free_slots_then_name() {
        let views = vec![
            serving("a", 4, &[("x", "/x", false), ("y", "/y", false)]),
            serving("b", 4, &[]),
            serving("c", 4, &[("x", "/x", false)]),
            serving("d", 4, &[]),
        ];
        let chosen = choose(&desired(false, Some(2)), &views, &BTreeSet::new());
        assert_eq!(names(&chosen), ["b", "d"]);
        let chosen = choose(&desired(false, Some(3)), &views, &BTreeSet::new());
        assert_eq!(names(&chosen), ["b", "c", "d"]);
    }

    #[test]
    fn placements_stay_put_and_extra_copies_leave() {
        // `a` is the fullest pod but holds the adapter: it keeps it. `c` held it at the last
        // reconcile (its server restarted empty): it gets it back. `d` has it but is not chosen.
        let views = vec![
            serving("a", 4, &[("x", "/x", false), ("ad", "/a/ad", false)]),
            serving("b", 4, &[]),
            serving("c", 4, &[("x", "/x", false)]),
            serving(
                "d",
                4,
                &[("x", "/x", false), ("y", "/y", false), ("ad", "/a/ad", false)],
            ),
        ];
        let sticky: BTreeSet<String> = ["c".to_string()].into();
        let p = plan(&desired(false, Some(2)), &views, &sticky, None);
        assert_eq!(
            p.decisions,
            [Decision::Keep, Decision::Absent, Decision::Load, Decision::Unload]
        );
        assert_eq!((p.desired_count, p.shortfall), (2, 0));
    }

    #[test]
    fn pinned_adapters_go_where_a_pin_is_left() {
        // 2 slots: one pin at most. `a` has its pin taken; `b` is fuller but can pin.
        let views = vec![
            serving("a", 2, &[("p", "/p", true)]),
            serving("b", 2, &[("x", "/x", false)]),
        ];
        assert_eq!(
            names(&choose(&desired(true, Some(1)), &views, &BTreeSet::new())),
            ["b"]
        );
        assert_eq!(
            names(&choose(&desired(false, Some(1)), &views, &BTreeSet::new())),
            ["a"]
        );
    }

    #[test]
    fn wrong_model_and_lora_off_are_skipped_and_short() {
        let mut other = serving("a", 4, &[("ad", "/a/ad", false)]);
        if let Observed::Serving(s) = &mut other.observed {
            s.served_model_name = "big".into();
        }
        let mut off = serving("b", 4, &[]);
        if let Observed::Serving(s) = &mut off.observed {
            s.lora_enabled = false;
        }
        let down = with(serving("c", 4, &[]), Observed::Unreachable("refused".into()));
        let p = plan(
            &desired(false, Some(2)),
            &[other, off, down],
            &BTreeSet::new(),
            None,
        );
        assert_eq!(
            p.decisions,
            [
                Decision::Skip(Issue::BaseModelMismatch("big".into())),
                Decision::Skip(Issue::LoraDisabled),
                Decision::Skip(Issue::Unreachable("refused".into())),
            ]
        );
        assert_eq!(p.shortfall, 2);
    }

    #[test]
    fn unselected_pods_only_lose_the_adapter_and_renames_unload_the_old_name() {
        let mut gone = serving("old", 4, &[("ad", "/a/ad", false), ("before", "/a/ad", false)]);
        gone.target.selected = false;
        let views = vec![serving("a", 4, &[("before", "/a/ad", false)]), gone];
        let p = plan(&desired(false, None), &views, &BTreeSet::new(), Some("before"));
        assert_eq!(p.decisions, [Decision::Load, Decision::Unload]);
        assert_eq!(p.stale, [0, 1]);
        assert_eq!(p.desired_count, 1, "only selected pods count");
        let p = plan(&desired(false, None), &views, &BTreeSet::new(), Some("ad"));
        assert!(p.stale.is_empty(), "same name: nothing stale");
    }
}
