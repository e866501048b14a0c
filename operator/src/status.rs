//! Building `LoraAdapter.status` from a pass's report: `loadedOn`, the phase, and the `Ready`,
//! `Loaded` and `Degraded` conditions, keeping `lastTransitionTime` and `since` when nothing
//! changed so an unchanged world writes an unchanged status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{LoadedOn, LoraAdapterStatus, Phase, SpecProblem};
use crate::plan::Issue;
use crate::servers::truncate;
use crate::sync::{Outcome, SyncReport};

/// Condition types.
pub const READY: &str = "Ready";
/// The adapter is loaded on at least one pod.
pub const LOADED: &str = "Loaded";
/// Something keeps the adapter off a pod it should be on.
pub const DEGRADED: &str = "Degraded";

/// Longest condition message.
const MAX_MESSAGE: usize = 1000;

/// A condition with `lastTransitionTime` carried over from `prev` when the status is the same.
pub fn condition(
    prev: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: truncate(&message, MAX_MESSAGE),
        observed_generation: generation,
        last_transition_time,
    }
}

/// What kept the adapter from where it should be, worst first: (reason, message parts).
fn problems(report: &SyncReport) -> Vec<(&'static str, String)> {
    let mut failed = Vec::new();
    let mut unreachable = Vec::new();
    let mut mismatch = Vec::new();
    let mut lora_off = Vec::new();
    let mut not_ready = Vec::new();
    for p in &report.pods {
        match &p.outcome {
            Outcome::Failed(m) => failed.push(format!("{}: {m}", p.pod)),
            Outcome::Skipped(_) if !p.selected => {}
            Outcome::Skipped(Issue::Unreachable(m)) => unreachable.push(format!("{}: {m}", p.pod)),
            Outcome::Skipped(Issue::BaseModelMismatch(served)) => {
                mismatch.push(format!("{} serves {served:?}", p.pod))
            }
            Outcome::Skipped(Issue::LoraDisabled) => lora_off.push(p.pod.clone()),
            Outcome::Skipped(Issue::NotReady(why)) => not_ready.push(format!("{} ({why})", p.pod)),
            _ => {}
        }
    }
    for (pod, m) in &report.stale_failures {
        failed.push(format!("{pod}: {m}"));
    }
    let mut out = Vec::new();
    if !failed.is_empty() {
        out.push((
            "LoadFailed",
            format!("server calls failed on {}", failed.join("; ")),
        ));
    }
    if !unreachable.is_empty() {
        out.push((
            "ServerUnreachable",
            format!("no answer from {}", unreachable.join("; ")),
        ));
    }
    if !mismatch.is_empty() {
        out.push((
            "BaseModelMismatch",
            format!("wrong base model: {}", mismatch.join(", ")),
        ));
    }
    if !lora_off.is_empty() {
        out.push((
            "LoraDisabled",
            format!(
                "LoRA serving is off (no --enable-lora) on {}",
                lora_off.join(", ")
            ),
        ));
    }
    if report.shortfall > 0 {
        out.push((
            "InsufficientPods",
            format!("{} replica(s) have no eligible pod", report.shortfall),
        ));
    }
    if !not_ready.is_empty() {
        out.push(("PodsNotReady", format!("waiting for {}", not_ready.join(", "))));
    }
    if report.desired_count == 0 {
        out.push(("NoMatchingPods", "serverSelector selects no pod".to_string()));
    }
    out
}

/// The status after a pass over the pods.
pub fn from_report(
    prev: Option<&LoraAdapterStatus>,
    adapter_name: &str,
    report: &SyncReport,
    generation: Option<i64>,
    now: Timestamp,
) -> LoraAdapterStatus {
    let prev_conditions = prev.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let loaded_on: Vec<LoadedOn> = report
        .holding()
        .map(|p| {
            let before = prev
                .and_then(|s| s.loaded_on.iter().find(|l| l.pod == p.pod && l.pod_ip == p.ip))
                .filter(|_| !p.fresh());
            LoadedOn {
                pod: p.pod.clone(),
                pod_ip: p.ip.clone(),
                since: before.map(|b| b.since.clone()).unwrap_or(Time(now)),
                pinned: p.pinned,
            }
        })
        .collect();
    let loaded = loaded_on.len();
    let problems = problems(report);
    let ready = problems.is_empty() && loaded >= report.desired_count && report.desired_count > 0;
    let (reason, message) = match problems.first() {
        Some((r, _)) => (
            *r,
            problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
        None => ("AllLoaded", String::new()),
    };
    let pods: Vec<&str> = loaded_on.iter().map(|l| l.pod.as_str()).collect();
    let loaded_msg = format!(
        "loaded on {loaded} of {} pod(s){}{}",
        report.desired_count,
        if pods.is_empty() { "" } else { ": " },
        pods.join(", ")
    );
    let phase = if ready {
        Phase::Ready
    } else if loaded > 0 {
        Phase::Degraded
    } else if problems
        .iter()
        .any(|(r, _)| !matches!(*r, "PodsNotReady" | "NoMatchingPods"))
    {
        Phase::Failed
    } else {
        Phase::Pending
    };
    let conditions = vec![
        condition(
            prev_conditions,
            READY,
            ready,
            if ready { "AllLoaded" } else { reason },
            if ready {
                loaded_msg.clone()
            } else {
                message.clone()
            },
            generation,
            now,
        ),
        condition(
            prev_conditions,
            LOADED,
            loaded > 0,
            if loaded > 0 { "Loaded" } else { reason },
            if loaded > 0 { loaded_msg } else { message.clone() },
            generation,
            now,
        ),
        condition(
            prev_conditions,
            DEGRADED,
            !problems.is_empty(),
            if problems.is_empty() { "AsExpected" } else { reason },
            message,
            generation,
            now,
        ),
    ];
    LoraAdapterStatus {
        phase: Some(phase),
        adapter_name: Some(adapter_name.to_string()),
        conditions,
        loaded_count: loaded as i32,
        desired_count: report.desired_count as i32,
        loaded_on,
        observed_generation: generation,
    }
}

/// The status of a spec that cannot be acted on: `Failed`, with the problem in every condition.
/// What is loaded stays loaded (a typo must not unload a serving adapter), so `loadedOn` is kept.
pub fn invalid(
    prev: Option<&LoraAdapterStatus>,
    adapter_name: &str,
    problem: &SpecProblem,
    generation: Option<i64>,
    now: Timestamp,
) -> LoraAdapterStatus {
    let prev_conditions = prev.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let loaded_on = prev.map(|s| s.loaded_on.clone()).unwrap_or_default();
    let (reason, message) = (problem.reason(), problem.message().to_string());
    let loaded = !loaded_on.is_empty();
    let conditions = vec![
        condition(
            prev_conditions,
            READY,
            false,
            reason,
            message.clone(),
            generation,
            now,
        ),
        condition(
            prev_conditions,
            LOADED,
            loaded,
            reason,
            message.clone(),
            generation,
            now,
        ),
        condition(prev_conditions, DEGRADED, true, reason, message, generation, now),
    ];
    LoraAdapterStatus {
        phase: Some(Phase::Failed),
        adapter_name: Some(adapter_name.to_string()),
        conditions,
        loaded_count: loaded_on.len() as i32,
        desired_count: prev.map_or(0, |s| s.desired_count),
        loaded_on,
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::PodReport;

    fn line(pod: &str, outcome: Outcome) -> PodReport {
        PodReport {
            pod: pod.into(),
            ip: format!("10.0.0.{}", pod.len()),
            selected: true,
            outcome,
            pinned: true,
        }
    }

    fn report(lines: Vec<PodReport>, desired: usize) -> SyncReport {
        SyncReport {
            pods: lines,
            desired_count: desired,
            ..Default::default()
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn cond<'a>(s: &'a LoraAdapterStatus, type_: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn all_loaded_is_ready() {
        let r = report(vec![line("a", Outcome::Loaded), line("b", Outcome::Kept)], 2);
        let s = from_report(None, "ad", &r, Some(3), t(100));
        assert_eq!(s.phase, Some(Phase::Ready));
        assert_eq!((s.loaded_count, s.desired_count), (2, 2));
        let ready = cond(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "AllLoaded")
        );
        assert_eq!(ready.message, "loaded on 2 of 2 pod(s): a, b");
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(cond(&s, DEGRADED).status, "False");
        assert_eq!(cond(&s, DEGRADED).reason, "AsExpected");
        assert_eq!(s.loaded_on[0].since, Time(t(100)));
    }

    #[test]
    fn unchanged_worlds_keep_their_times_and_reloads_reset_since() {
        let r = report(vec![line("a", Outcome::Loaded), line("b", Outcome::Loaded)], 2);
        let first = from_report(None, "ad", &r, Some(1), t(100));
        let r = report(
            vec![line("a", Outcome::Kept), line("b", Outcome::Reloaded("x".into()))],
            2,
        );
        let second = from_report(Some(&first), "ad", &r, Some(1), t(200));
        assert_eq!(second.loaded_on[0].since, Time(t(100)), "kept: since stays");
        assert_eq!(second.loaded_on[1].since, Time(t(200)), "reloaded: since resets");
        assert_eq!(cond(&second, READY).last_transition_time, Time(t(100)));
        let r = report(vec![line("a", Outcome::Kept), line("b", Outcome::Kept)], 2);
        let third = from_report(Some(&second), "ad", &r, Some(1), t(300));
        assert_eq!(
            third, second,
            "nothing changed: the same status, nothing to write"
        );
    }

    #[test]
    fn failures_degrade_and_nothing_loaded_fails() {
        let r = report(
            vec![
                line("a", Outcome::Kept),
                line("b", Outcome::Failed("no pin left".into())),
                line("c", Outcome::Skipped(Issue::NotReady("not ready".into()))),
            ],
            3,
        );
        let s = from_report(None, "ad", &r, None, t(1));
        assert_eq!(s.phase, Some(Phase::Degraded));
        let d = cond(&s, DEGRADED);
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "LoadFailed"));
        assert!(
            d.message.contains("b: no pin left") && d.message.contains("c (not ready)"),
            "{}",
            d.message
        );
        assert_eq!(cond(&s, LOADED).status, "True");
        assert_eq!(cond(&s, READY).reason, "LoadFailed");

        let r = report(
            vec![line(
                "a",
                Outcome::Skipped(Issue::BaseModelMismatch("big".into())),
            )],
            1,
        );
        let s = from_report(None, "ad", &r, None, t(1));
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(cond(&s, LOADED).reason, "BaseModelMismatch");
        assert!(cond(&s, READY).message.contains("a serves \"big\""));
    }

    #[test]
    fn waiting_is_pending_not_failed() {
        let r = report(
            vec![line("a", Outcome::Skipped(Issue::NotReady("not ready".into())))],
            1,
        );
        let s = from_report(None, "ad", &r, None, t(1));
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(cond(&s, READY).reason, "PodsNotReady");
        let s = from_report(None, "ad", &report(vec![], 0), None, t(1));
        assert_eq!(
            (s.phase, cond(&s, READY).reason.as_str()),
            (Some(Phase::Pending), "NoMatchingPods")
        );
    }

    #[test]
    fn invalid_specs_fail_and_keep_what_is_loaded() {
        let r = report(vec![line("a", Outcome::Loaded)], 1);
        let before = from_report(None, "ad", &r, Some(1), t(1));
        let p = SpecProblem::UnsupportedSource("s3:// not implemented".into());
        let s = invalid(Some(&before), "ad", &p, Some(2), t(5));
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(s.loaded_on, before.loaded_on);
        let ready = cond(&s, READY);
        assert_eq!(
            (ready.reason.as_str(), ready.message.as_str()),
            ("UnsupportedSource", "s3:// not implemented")
        );
        assert_eq!(ready.last_transition_time, Time(t(5)), "Ready went True -> False");
        assert_eq!(
            cond(&s, LOADED).last_transition_time,
            Time(t(1)),
            "Loaded stayed True"
        );
    }
}
