//! The reconcile loop: the kube-rs [`Controller`] over `LoraAdapter`s and server pods, the
//! finalizer that unloads a deleted adapter everywhere, status and Event writing, and the
//! per-object exponential backoff on errors.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::crd::{LoraAdapter, LoraAdapterStatus, FINALIZER};
use crate::plan::Issue;
use crate::pods::{self, PodTarget};
use crate::servers::{truncate, AdapterServers};
use crate::sync::{self, Outcome, SyncReport};
use crate::{status, Error, Metrics, Result};

/// The field manager of the operator's server-side-apply status patches.
pub const MANAGER: &str = "loraplane-operator";
/// Requeue while pods are not ready or replicas lack a pod.
pub const WAIT_REQUEUE: Duration = Duration::from_secs(15);
/// Requeue after a clean pass, to catch drift nobody announced (an adapter unloaded by hand).
pub const RESYNC: Duration = Duration::from_secs(300);
/// First retry after an error; doubles per consecutive error of the same object.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Talks to the server pods.
    pub servers: Arc<dyn AdapterServers>,
    /// The operator's metrics.
    pub metrics: Metrics,
    /// The server port when a pod has no container port named `http`.
    pub default_port: u16,
    /// Consecutive errors per object (`namespace/name`), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Objects with the finalizer whose adapters are kept loaded (`namespace/name`).
    managed: Mutex<BTreeSet<String>>,
}

impl Context {
    /// A context; `reporter` names the operator in Events.
    pub fn new(
        client: Client,
        reporter: Reporter,
        servers: Arc<dyn AdapterServers>,
        metrics: Metrics,
        default_port: u16,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            servers,
            metrics,
            default_port,
            failures: Mutex::default(),
            managed: Mutex::default(),
        }
    }

    /// The delay before retrying `key` after one more error: 5 s, 10 s, 20 s, ... 300 s.
    fn next_backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().expect("not poisoned");
        let n = failures.entry(key.to_string()).or_insert(0);
        let delay = BACKOFF_BASE.saturating_mul(1u32 << (*n).min(16)).min(BACKOFF_MAX);
        *n = n.saturating_add(1);
        delay
    }

    fn clear_backoff(&self, key: &str) {
        self.failures.lock().expect("not poisoned").remove(key);
    }

    fn set_managed(&self, key: &str, managed: bool) {
        let mut set = self.managed.lock().expect("not poisoned");
        if managed {
            set.insert(key.to_string());
        } else {
            set.remove(key);
        }
        self.metrics.managed_adapters.set(set.len() as i64);
    }

    async fn publish(
        &self,
        adapter: &LoraAdapter,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            // NB: the API server refuses notes over 1 kB.
            note: Some(truncate(&note, 1000)),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &adapter.object_ref(&())).await {
            // NB: an Event that cannot be written must not stop the adapter from loading.
            warn!(adapter = %adapter.name_any(), reason, error = %e, "could not publish an Event");
        }
    }
}

fn key(adapter: &LoraAdapter) -> String {
    format!(
        "{}/{}",
        adapter.namespace().unwrap_or_default(),
        adapter.name_any()
    )
}

/// One reconcile of one `LoraAdapter`: adds the finalizer, converges the servers, or unloads
/// everywhere when the resource is being deleted.
pub async fn reconcile(adapter: Arc<LoraAdapter>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.measure();
    let ns = adapter
        .namespace()
        .ok_or_else(|| Error::Config("a LoraAdapter without a namespace".into()))?;
    let key = key(&adapter);
    let api: Api<LoraAdapter> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, adapter, |event| async {
        match event {
            Finalizer::Apply(a) => apply(&a, &ctx, &api).await,
            Finalizer::Cleanup(a) => cleanup(&a, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        ctx.clear_backoff(&key);
    }
    result
}

/// Retries a failed object after an exponentially growing delay (per object); never gives up.
pub fn error_policy(adapter: Arc<LoraAdapter>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(error);
    let delay = ctx.next_backoff(&key(&adapter));
    warn!(adapter = %key(&adapter), error = %error, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

/// The selected pods as targets, plus pods the last status lists that are no longer selected
/// (they may hold the adapter and must lose it).
async fn targets(
    adapter: &LoraAdapter,
    ctx: &Context,
    selector: Option<&kube::core::Selector>,
) -> Result<Vec<PodTarget>> {
    let ns = adapter.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut out: Vec<PodTarget> = match selector {
        Some(sel) => pods
            .list(&ListParams::default().labels_from(sel))
            .await?
            .items
            .iter()
            .map(|p| pods::target(p, ctx.default_port, true))
            .collect(),
        None => Vec::new(),
    };
    let listed: Vec<String> = adapter
        .status
        .iter()
        .flat_map(|s| s.loaded_on.iter().map(|l| l.pod.clone()))
        .collect();
    for name in listed {
        if out.iter().any(|t| t.name == name) {
            continue;
        }
        if let Some(p) = pods.get_opt(&name).await? {
            out.push(pods::target(&p, ctx.default_port, false));
        }
    }
    Ok(out)
}

async fn patch_status(
    api: &Api<LoraAdapter>,
    adapter: &LoraAdapter,
    status: &LoraAdapterStatus,
) -> Result<()> {
    let patch = Patch::Apply(json!({
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "LoraAdapter",
        "status": status,
    }));
    api.patch_status(&adapter.name_any(), &PatchParams::apply(MANAGER).force(), &patch)
        .await?;
    Ok(())
}

/// The `Apply` side: converge every selected pod, then report.
async fn apply(adapter: &LoraAdapter, ctx: &Context, api: &Api<LoraAdapter>) -> Result<Action> {
    let prev = adapter.status.as_ref();
    let generation = adapter.metadata.generation;
    let name = adapter.adapter_name();
    ctx.set_managed(&key(adapter), true);
    let desired = match adapter.desired() {
        Ok(d) => d,
        Err(problem) => {
            let new = status::invalid(prev, &name, &problem, generation, Timestamp::now());
            if prev != Some(&new) {
                ctx.publish(
                    adapter,
                    EventType::Warning,
                    problem.reason(),
                    "Validate",
                    problem.message().into(),
                )
                .await;
                patch_status(api, adapter, &new).await?;
            }
            // NB: only a spec change can fix the spec; the watch brings it.
            return Ok(Action::await_change());
        }
    };
    let selector = adapter.selector().ok();
    let targets = targets(adapter, ctx, selector.as_ref()).await?;
    let report = sync::converge(ctx.servers.as_ref(), &desired, targets, prev).await;
    publish_report(adapter, ctx, &report, &desired.path).await;
    let new = status::from_report(prev, &desired.name, &report, generation, Timestamp::now());
    warn_if_newly_degraded(adapter, ctx, &new).await;
    if prev != Some(&new) {
        patch_status(api, adapter, &new).await?;
    }
    info!(
        adapter = %key(adapter),
        loaded = new.loaded_count,
        desired = new.desired_count,
        phase = ?new.phase,
        "reconciled"
    );
    let failures = report.failures();
    if let Some((pod, message)) = failures.first() {
        let reason = if report
            .pods
            .iter()
            .any(|p| matches!(p.outcome, Outcome::Failed(_)))
            || !report.stale_failures.is_empty()
        {
            "load_failed"
        } else {
            "server_unreachable"
        };
        return Err(Error::Sync {
            reason,
            count: failures.len(),
            first: format!("{pod}: {message}"),
        });
    }
    let waiting = report.shortfall > 0
        || report
            .pods
            .iter()
            .any(|p| p.selected && matches!(p.outcome, Outcome::Skipped(Issue::NotReady(_))));
    Ok(Action::requeue(if waiting { WAIT_REQUEUE } else { RESYNC }))
}

/// Events for what a pass did: one per kind of change, one Warning for failures.
async fn publish_report(adapter: &LoraAdapter, ctx: &Context, report: &SyncReport, path: &str) {
    let name = adapter.adapter_name();
    let pods_where = |f: &dyn Fn(&Outcome) -> bool| -> Vec<String> {
        report
            .pods
            .iter()
            .filter(|p| f(&p.outcome))
            .map(|p| p.pod.clone())
            .collect()
    };
    let loaded = pods_where(&|o| matches!(o, Outcome::Loaded));
    if !loaded.is_empty() {
        let note = format!(
            "loaded {name} from {path}{} on {}",
            if adapter.spec.pinned { " (pinned)" } else { "" },
            loaded.join(", ")
        );
        ctx.publish(adapter, EventType::Normal, "Loaded", "Load", note)
            .await;
    }
    let reloaded: Vec<String> = report
        .pods
        .iter()
        .filter_map(|p| match &p.outcome {
            Outcome::Reloaded(why) => Some(format!("{} ({why})", p.pod)),
            _ => None,
        })
        .collect();
    if !reloaded.is_empty() {
        let note = format!("reloaded {name} on {}", reloaded.join(", "));
        ctx.publish(adapter, EventType::Normal, "Reloaded", "Reload", note)
            .await;
    }
    let unloaded = pods_where(&|o| matches!(o, Outcome::Unloaded));
    if !unloaded.is_empty() {
        let note = format!("unloaded {name} from {}", unloaded.join(", "));
        ctx.publish(adapter, EventType::Normal, "Unloaded", "Unload", note)
            .await;
    }
    let failures = report.failures();
    if !failures.is_empty() {
        let list: Vec<String> = failures.iter().map(|(p, m)| format!("{p}: {m}")).collect();
        let note = format!("{name}: {}", list.join("; "));
        ctx.publish(adapter, EventType::Warning, "SyncFailed", "Load", note)
            .await;
    }
}

/// A Warning when the adapter becomes degraded for a reason no server call reported (a wrong
/// base model, LoRA off, too few pods), once per change rather than once per pass.
async fn warn_if_newly_degraded(adapter: &LoraAdapter, ctx: &Context, new: &LoraAdapterStatus) {
    let degraded = |s: &LoraAdapterStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == status::DEGRADED && c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let Some((reason, message)) = degraded(new) else {
        return;
    };
    if !matches!(
        reason.as_str(),
        "BaseModelMismatch" | "LoraDisabled" | "InsufficientPods"
    ) {
        return;
    }
    if adapter.status.as_ref().and_then(degraded) != Some((reason.clone(), message.clone())) {
        ctx.publish(adapter, EventType::Warning, &reason, "Place", message)
            .await;
    }
}

/// The `Cleanup` side: unload the adapter (under its current and last names) from every pod
/// that has it; the finalizer goes only when that worked.
async fn cleanup(adapter: &LoraAdapter, ctx: &Context) -> Result<Action> {
    let mut names = vec![adapter.adapter_name()];
    if let Some(old) = adapter.status.as_ref().and_then(|s| s.adapter_name.clone()) {
        if !names.contains(&old) {
            names.push(old);
        }
    }
    let must_reach: BTreeSet<String> = adapter
        .status
        .iter()
        .flat_map(|s| s.loaded_on.iter().map(|l| l.pod.clone()))
        .collect();
    let selector = adapter.selector().ok();
    let targets = targets(adapter, ctx, selector.as_ref()).await?;
    let report = sync::unload_everywhere(ctx.servers.as_ref(), &names, targets, &must_reach).await;
    publish_report(adapter, ctx, &report, "").await;
    let failures = report.failures();
    if let Some((pod, message)) = failures.first() {
        return Err(Error::Sync {
            reason: "unload_failed",
            count: failures.len(),
            first: format!("{pod}: {message}"),
        });
    }
    ctx.set_managed(&key(adapter), false);
    info!(adapter = %key(adapter), "unloaded everywhere; releasing the finalizer");
    Ok(Action::await_change())
}

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Watch one namespace (`None`: all).
    pub namespace: Option<String>,
    /// Only pods matching this label selector are watched (`None`: every pod in scope).
    pub pod_selector: Option<String>,
}

/// Runs the controller until a shutdown signal.
pub async fn run(ctx: Arc<Context>, config: RunConfig) {
    let client = ctx.client.clone();
    let (adapters, pods): (Api<LoraAdapter>, Api<Pod>) = match &config.namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let mut pod_watch = watcher::Config::default();
    if let Some(sel) = &config.pod_selector {
        pod_watch = pod_watch.labels(sel);
    }
    let controller = Controller::new(adapters, watcher::Config::default());
    let store = controller.store();
    controller
        .with_config(ControllerConfig::default().concurrency(8))
        // NB: a pod event (ready, restarted, relabelled, deleted) wakes every adapter that
        // selects it or lists it in its status; the reconcile then reads the servers.
        .watches(pods, pod_watch, move |pod: Pod| {
            store
                .state()
                .into_iter()
                .filter(|a| pods::concerns(a, &pod))
                .map(|a| ObjectRef::from_obj(a.as_ref()))
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "controller");
            }
        })
        .await;
}

#[cfg(test)]
mod tests;
