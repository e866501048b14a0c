//! Reconcile scenarios against a mock API server (every request checked, in order, with
//! nothing extra) and fake servers (every load and unload checked).

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;

use super::{error_policy, reconcile, BACKOFF_BASE, RESYNC, WAIT_REQUEUE};
use crate::crd::{LoraAdapter, Phase};
use crate::fixtures::{loaded_on, pod, verified, Expect, FakeServer, FakeServers};
use crate::status::{DEGRADED, LOADED, READY};
use crate::{Context, LoraAdapterStatus};

fn cond<'a>(s: &'a LoraAdapterStatus, t: &str) -> (&'a str, &'a str, &'a str) {
    let c = s.conditions.iter().find(|c| c.type_ == t).expect("condition");
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

fn two_servers() -> Arc<FakeServers> {
    let servers = Arc::new(FakeServers::default());
    servers.add("10.0.0.1", FakeServer::tiny());
    servers.add("10.0.0.2", FakeServer::tiny());
    servers
}

fn two_pods() -> Vec<k8s_openapi::api::core::v1::Pod> {
    vec![pod("srv-a", "10.0.0.1", true), pod("srv-b", "10.0.0.2", true)]
}

#[tokio::test]
async fn a_new_adapter_gets_the_finalizer_first_and_nothing_else() {
    let servers = two_servers();
    let (ctx, api, _) = Context::test(servers.clone());
    let a = LoraAdapter::test();
    let mock = api.run(a.clone(), vec![Expect::FinalizerAdd]);
    let action = reconcile(Arc::new(a), ctx).await.expect("reconcile");
    assert_eq!(action, Action::await_change());
    verified(mock).await;
    assert!(servers.changes().is_empty());
}

#[tokio::test]
async fn apply_loads_on_every_selected_pod_then_reports() {
    let servers = two_servers();
    let (ctx, api, registry) = Context::test(servers.clone());
    let a = LoraAdapter::test().finalized();
    let mock = api.run(
        a.clone(),
        vec![
            Expect::ListPods(two_pods()),
            Expect::Event(
                "Normal",
                "Loaded",
                "loaded ad from /adapters/ad on srv-a, srv-b".into(),
            ),
            Expect::Status(Box::new(|s| {
                assert_eq!(s.phase, Some(Phase::Ready));
                assert_eq!((s.loaded_count, s.desired_count), (2, 2));
                assert_eq!(s.adapter_name.as_deref(), Some("ad"));
                assert_eq!(s.observed_generation, Some(1));
                let pods: Vec<(&str, &str, bool)> = s
                    .loaded_on
                    .iter()
                    .map(|l| (l.pod.as_str(), l.pod_ip.as_str(), l.pinned))
                    .collect();
                assert_eq!(pods, [("srv-a", "10.0.0.1", false), ("srv-b", "10.0.0.2", false)]);
                assert_eq!(
                    cond(s, READY),
                    ("True", "AllLoaded", "loaded on 2 of 2 pod(s): srv-a, srv-b")
                );
                assert_eq!(cond(s, LOADED).0, "True");
                assert_eq!(cond(s, DEGRADED), ("False", "AsExpected", ""));
            })),
        ],
    );
    let action = reconcile(Arc::new(a), ctx.clone()).await.expect("reconcile");
    assert_eq!(action, Action::requeue(RESYNC));
    assert_eq!(
        servers.changes(),
        ["load 10.0.0.1 ad /adapters/ad", "load 10.0.0.2 ad /adapters/ad"]
    );
    assert_eq!(ctx.metrics.reconciles.get(), 1);
    assert_eq!(ctx.metrics.managed_adapters.get(), 1);
    // The error counter has no series until an error happens.
    assert_eq!(registry.gather().len(), 3);
    drop(ctx);
    verified(mock).await;
}

#[tokio::test]
async fn an_unchanged_world_writes_nothing() {
    let servers = two_servers();
    // First pass, to get the status the operator would have written.
    let (ctx, api, _) = Context::test(servers.clone());
    let a = LoraAdapter::test().finalized();
    let written = Arc::new(std::sync::Mutex::new(None));
    let keep = written.clone();
    let mock = api.run(
        a.clone(),
        vec![
            Expect::ListPods(two_pods()),
            Expect::Event("Normal", "Loaded", "srv-a, srv-b".into()),
            Expect::Status(Box::new(move |s| *keep.lock().unwrap() = Some(s.clone()))),
        ],
    );
    reconcile(Arc::new(a.clone()), ctx.clone()).await.unwrap();
    drop(ctx);
    verified(mock).await;
    let status = written.lock().unwrap().clone().unwrap();
    // Second pass: same servers, that status: one list, two reads, no write, no event.
    let (ctx, api, _) = Context::test(servers.clone());
    let a = a.with_status(status);
    let mock = api.run(a.clone(), vec![Expect::ListPods(two_pods())]);
    let action = reconcile(Arc::new(a), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(RESYNC));
    assert_eq!(servers.changes().len(), 2, "no new load or unload");
    drop(ctx);
    verified(mock).await;
}

#[tokio::test]
async fn pinning_and_a_new_source_reload() {
    let servers = Arc::new(FakeServers::default());
    servers.add("10.0.0.1", FakeServer::tiny().with("ad", "/adapters/ad", false));
    servers.add("10.0.0.2", FakeServer::tiny().with("ad", "/old/ad", true));
    let (ctx, api, _) = Context::test(servers.clone());
    let prev = loaded_on(&[("srv-a", "10.0.0.1"), ("srv-b", "10.0.0.2")], false);
    let a = LoraAdapter::test().finalized().pinned().with_status(prev);
    let mock = api.run(
        a.clone(),
        vec![
            Expect::ListPods(two_pods()),
            Expect::Event(
                "Normal",
                "Reloaded",
                "reloaded ad on srv-a (pinned false -> true), srv-b (path /old/ad -> /adapters/ad)".into(),
            ),
            Expect::Status(Box::new(|s| {
                assert_eq!(s.phase, Some(Phase::Ready));
                assert!(s.loaded_on.iter().all(|l| l.pinned));
                assert!(
                    s.loaded_on
                        .iter()
                        .all(|l| l.since.0 > k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                    "a reload resets since"
                );
            })),
        ],
    );
    reconcile(Arc::new(a), ctx.clone()).await.expect("reconcile");
    assert_eq!(
        servers.changes(),
        [
            "load 10.0.0.1 ad /adapters/ad pinned",
            "load 10.0.0.2 ad /adapters/ad pinned",
            "unload 10.0.0.1 ad",
            "unload 10.0.0.2 ad",
        ]
    );
    assert_eq!(
        servers.loaded("10.0.0.2"),
        [("ad".into(), "/adapters/ad".into(), true)]
    );
    drop(ctx);
    verified(mock).await;
}

#[tokio::test]
async fn a_restarted_pod_that_came_back_empty_is_reloaded() {
    // The status still says srv-b holds it; its server says otherwise: the server wins.
    let servers = Arc::new(FakeServers::default());
    servers.add("10.0.0.1", FakeServer::tiny().with("ad", "/adapters/ad", false));
    servers.add("10.0.0.2", FakeServer::tiny());
    let (ctx, api, _) = Context::test(servers.clone());
    let prev = loaded_on(&[("srv-a", "10.0.0.1"), ("srv-b", "10.0.0.2")], false);
    let a = LoraAdapter::test().finalized().with_status(prev);
    let mock = api.run(
        a.clone(),
        vec![
            Expect::ListPods(two_pods()),
            Expect::Event("Normal", "Loaded", "on srv-b".into()),
            Expect::Status(Box::new(|s| {
                let epoch = k8s_openapi::jiff::Timestamp::UNIX_EPOCH;
                assert_eq!(s.loaded_on[0].since.0, epoch, "srv-a kept it: since unchanged");
                assert!(s.loaded_on[1].since.0 > epoch, "srv-b got it again: since now");
            })),
        ],
    );
    reconcile(Arc::new(a), ctx.clone()).await.expect("reconcile");
    assert_eq!(servers.changes(), ["load 10.0.0.2 ad /adapters/ad"]);
    drop(ctx);
    verified(mock).await;
}

#[tokio::test]
async fn unsupported_sources_are_refused_without_touching_pods() {
    let servers = two_servers();
    let (ctx, api, _) = Context::test(servers.clone());
    let a = LoraAdapter::test().finalized().source("s3://bucket/ad");
    let mock = api.run(
        a.clone(),
        vec![
            Expect::Event(
                "Warning",
                "UnsupportedSource",
                "s3:// sources are not implemented yet".into(),
            ),
            Expect::Status(Box::new(|s| {
                assert_eq!(s.phase, Some(Phase::Failed));
                let (st, reason, msg) = cond(s, READY);
                assert_eq!((st, reason), ("False", "UnsupportedSource"));
                assert!(msg.contains("s3://bucket/ad"), "{msg}");
            })),
        ],
    );
    let action = reconcile(Arc::new(a), ctx.clone()).await.expect("reconcile");
    assert_eq!(action, Action::await_change());
    assert!(servers.changes().is_empty());
    drop(ctx);
    verified(mock).await;
}

#[tokio::test]
async fn wrong_base_model_and_unready_pods_are_skipped_and_said() {
    let servers = Arc::new(FakeServers::default());
    servers.add("10.0.0.1", FakeServer::tiny());
    servers.add(
        "10.0.0.2",
        FakeServer {
            model: "big".into(),
            ..FakeServer::tiny()
        },
    );
    let (ctx, api, _) = Context::test(servers.clone());
    let a = LoraAdapter::test().finalized();
    let pods = vec![
        pod("srv-a", "10.0.0.1", true),
        pod("srv-b", "10.0.0.2", true),
        pod("srv-c", "10.0.0.3", false),
    ];
    let mock = api.run(
        a.clone(),
        vec![
            Expect::ListPods(pods),
            Expect::Event("Normal", "Loaded", "on srv-a".into()),
            Expect::Event("Warning", "BaseModelMismatch", "srv-b serves \"big\"".into()),
            Expect::Status(Box::new(|s| {
                assert_eq!(s.phase, Some(Phase::Degraded));
                assert_eq!((s.loaded_count, s.desired_count), (1, 3));
                let (st, reason, msg) = cond(s, DEGRADED);
                assert_eq!((st, reason), ("True", "BaseModelMismatch"));
                assert!(msg.contains("srv-c (not ready)"), "{msg}");
            })),
        ],
    );
    let action = reconcile(Arc::new(a), ctx.clone()).await.expect("reconcile");
    assert_eq!(
        action,
        Action::requeue(WAIT_REQUEUE),
        "a pod is not ready: look again soon"
    );
    assert_eq!(servers.changes(), ["load 10.0.0.1 ad /adapters/ad"]);
    drop(ctx);
    verified(mock).await;
}

#[tokio::test]
async fn refused_loads_fail_the_pass_and_back_off_exponentially() {
    let servers = Arc::new(FakeServers::default());
    // One slot: nothing can be pinned.
    servers.add(
        "10.0.0.1",
        FakeServer {
            slots: 1,
            ..FakeServer::tiny()
        },
    );
    let (ctx, api, _) = Context::test(servers.clone());
    let a = LoraAdapter::test().finalized().pinned();
    let mock = api.run(
        a.clone(),
        vec![
            Expect::ListPods(vec![pod("srv-a", "10.0.0.1", true)]),
            Expect::Event(
                "Warning",
                "SyncFailed",
                "srv-a: server http://10.0.0.1:30000 refused to load".into(),
            ),
            Expect::Status(Box::new(|s| {
                assert_eq!(s.phase, Some(Phase::Failed));
                let (st, reason, msg) = cond(s, READY);
                assert_eq!((st, reason), ("False", "LoadFailed"));
                assert!(msg.contains("no slot left to pin"), "{msg}");
            })),
        ],
    );
    let a = Arc::new(a);
    let err = reconcile(a.clone(), ctx.clone())
        .await
        .expect_err("the load failed");
    assert_eq!(err.reason(), "load_failed");
    assert_eq!(
        error_policy(a.clone(), &err, ctx.clone()),
        Action::requeue(BACKOFF_BASE)
    );
    assert_eq!(
        error_policy(a.clone(), &err, ctx.clone()),
        Action::requeue(BACKOFF_BASE * 2)
    );
    assert_eq!(
        error_policy(a.clone(), &err, ctx.clone()),
        Action::requeue(BACKOFF_BASE * 4)
    );
    for _ in 0..10 {
        error_policy(a.clone(), &err, ctx.clone());
    }
    assert_eq!(
        error_policy(a, &err, ctx.clone()),
        Action::requeue(Duration::from_secs(300))
    );
    assert_eq!(
        ctx.metrics
            .reconcile_errors
            .with_label_values(&["load_failed"])
            .get(),
        14
    );
    drop(ctx);
    verified(mock).await;
}

#[tokio::test]
async fn kube_api_errors_are_errors_not_panics() {
    let (ctx, api, _) = Context::test(two_servers());
    let a = Arc::new(LoraAdapter::test().finalized());
    let mock = api.run((*a).clone(), vec![Expect::ListPodsFails]);
    let err = reconcile(a.clone(), ctx.clone())
        .await
        .expect_err("the API failed");
    assert_eq!(err.reason(), "kube_api");
    assert_eq!(error_policy(a, &err, ctx.clone()), Action::requeue(BACKOFF_BASE));
    drop(ctx);
    verified(mock).await;
}

#[tokio::test]
async fn replicas_place_by_free_slots_and_unselected_pods_lose_it() {
    // srv-a is fuller than srv-b; srv-old held the adapter but is no longer selected.
    let servers = Arc::new(FakeServers::default());
    servers.add(
        "10.0.0.1",
        FakeServer::tiny().with("x", "/x", false).with("y", "/y", false),
    );
    servers.add("10.0.0.2", FakeServer::tiny().with("x", "/x", false));
    servers.add("10.0.0.9", FakeServer::tiny().with("ad", "/adapters/ad", false));
    let (ctx, api, _) = Context::test(servers.clone());
    let prev = loaded_on(&[("srv-old", "10.0.0.9")], false);
    let a = LoraAdapter::test().finalized().replicas(1).with_status(prev);
    let mut old = pod("srv-old", "10.0.0.9", true);
    old.metadata.labels = None;
    let mock = api.run(
        a.clone(),
        vec![
            Expect::ListPods(two_pods()),
            Expect::GetPod("srv-old".into(), Some(Box::new(old))),
            Expect::Event("Normal", "Loaded", "on srv-b".into()),
            Expect::Event("Normal", "Unloaded", "unloaded ad from srv-old".into()),
            Expect::Status(Box::new(|s| {
                assert_eq!(s.phase, Some(Phase::Ready));
                assert_eq!((s.loaded_count, s.desired_count), (1, 1));
                assert_eq!(s.loaded_on[0].pod, "srv-b");
            })),
        ],
    );
    reconcile(Arc::new(a), ctx.clone()).await.expect("reconcile");
    assert_eq!(
        servers.changes(),
        ["load 10.0.0.2 ad /adapters/ad", "unload 10.0.0.9 ad"]
    );
    drop(ctx);
    verified(mock).await;
}

#[tokio::test]
async fn deletion_unloads_everywhere_then_releases_the_finalizer() {
    let servers = Arc::new(FakeServers::default());
    servers.add("10.0.0.1", FakeServer::tiny().with("ad", "/adapters/ad", true));
    servers.add(
        "10.0.0.2",
        FakeServer::tiny()
            .with("ad", "/adapters/ad", true)
            .with("x", "/x", false),
    );
    let (ctx, api, _) = Context::test(servers.clone());
    let prev = loaded_on(&[("srv-a", "10.0.0.1"), ("srv-b", "10.0.0.2")], true);
    let a = LoraAdapter::test().finalized().deleting().with_status(prev);
    let mock = api.run(
        a.clone(),
        vec![
            Expect::ListPods(two_pods()),
            Expect::Event("Normal", "Unloaded", "unloaded ad from srv-a, srv-b".into()),
            Expect::FinalizerRemove,
        ],
    );
    let action = reconcile(Arc::new(a), ctx.clone()).await.expect("reconcile");
    assert_eq!(action, Action::await_change());
    assert_eq!(servers.changes(), ["unload 10.0.0.1 ad", "unload 10.0.0.2 ad"]);
    assert_eq!(
        servers.loaded("10.0.0.2"),
        [("x".into(), "/x".into(), false)],
        "others stay"
    );
    assert_eq!(ctx.metrics.managed_adapters.get(), 0);
    drop(ctx);
    verified(mock).await;
}

#[tokio::test]
async fn deletion_keeps_the_finalizer_while_a_holder_does_not_answer() {
    let servers = Arc::new(FakeServers::default());
    servers.add("10.0.0.1", FakeServer::tiny().with("ad", "/adapters/ad", false));
    servers.add(
        "10.0.0.2",
        FakeServer {
            down: true,
            ..FakeServer::tiny()
        },
    );
    let (ctx, api, _) = Context::test(servers.clone());
    let prev = loaded_on(&[("srv-a", "10.0.0.1"), ("srv-b", "10.0.0.2")], false);
    let a = Arc::new(LoraAdapter::test().finalized().deleting().with_status(prev));
    let mock = api.run(
        (*a).clone(),
        vec![
            Expect::ListPods(two_pods()),
            Expect::Event("Normal", "Unloaded", "from srv-a".into()),
            Expect::Event(
                "Warning",
                "SyncFailed",
                "srv-b: server http://10.0.0.2:30000 unreachable".into(),
            ),
        ],
    );
    let err = reconcile(a.clone(), ctx.clone())
        .await
        .expect_err("srv-b must be reached");
    assert_eq!(err.reason(), "unload_failed");
    assert_eq!(servers.changes(), ["unload 10.0.0.1 ad"]);
    drop(ctx);
    verified(mock).await;
}

#[tokio::test]
async fn deleting_before_anything_was_loaded_just_lets_go() {
    // Not ready pods are not waited for: a restarted server comes back empty anyway.
    let servers = two_servers();
    let (ctx, api, _) = Context::test(servers.clone());
    let a = LoraAdapter::test().finalized().deleting();
    let mock = api.run(
        a.clone(),
        vec![
            Expect::ListPods(vec![pod("srv-a", "10.0.0.1", false)]),
            Expect::FinalizerRemove,
        ],
    );
    reconcile(Arc::new(a), ctx.clone()).await.expect("reconcile");
    assert!(servers.changes().is_empty());
    drop(ctx);
    verified(mock).await;
}
