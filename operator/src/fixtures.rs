//! Test-only helpers: fluent `LoraAdapter` and `Pod` builders, an in-memory fake of the server
//! API ([`FakeServers`], with the real server's refusals), and a mock Kubernetes API server
//! ([`ApiServerVerifier`]) that checks every request of a scripted scenario, answers it, fails
//! when an expected request does not come within a second, and fails on any extra request.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::{Client, Resource, ResourceExt};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tower_test::mock::{self, Handle};

use crate::crd::{LoadedOn, LoraAdapter, LoraAdapterSpec, LoraAdapterStatus, FINALIZER};
use crate::servers::{AdapterServers, ServedAdapter, ServerState};
use crate::{Context, Error, Metrics, Result};

/// The test namespace.
pub const NS: &str = "testns";
/// The selector label every test pod carries.
pub const SELECTOR: (&str, &str) = ("app", "srv");

impl LoraAdapter {
    /// `ad` in `testns`: base model `tiny`, source `/adapters/ad`, every pod labelled app=srv.
    pub fn test() -> Self {
        let mut a = LoraAdapter::new(
            "ad",
            LoraAdapterSpec {
                adapter_name: None,
                base_model: "tiny".into(),
                source: "/adapters/ad".into(),
                pinned: false,
                server_selector: LabelSelector {
                    match_labels: Some([(SELECTOR.0.to_string(), SELECTOR.1.to_string())].into()),
                    ..Default::default()
                },
                replicas: None,
            },
        );
        a.meta_mut().namespace = Some(NS.into());
        a.meta_mut().generation = Some(1);
        a.meta_mut().uid = Some("uid-ad".into());
        a
    }

    /// With the operator's finalizer.
    pub fn finalized(mut self) -> Self {
        self.finalizers_mut().push(FINALIZER.to_string());
        self
    }

    /// Being deleted.
    pub fn deleting(mut self) -> Self {
        self.meta_mut().deletion_timestamp = Some(Time(Timestamp::now()));
        self
    }

    /// Pinned.
    pub fn pinned(mut self) -> Self {
        self.spec.pinned = true;
        self
    }

    /// Another source.
    pub fn source(mut self, s: &str) -> Self {
        self.spec.source = s.into();
        self
    }

    /// `replicas: n`.
    pub fn replicas(mut self, n: i32) -> Self {
        self.spec.replicas = Some(n);
        self
    }

    /// With this status.
    pub fn with_status(mut self, s: LoraAdapterStatus) -> Self {
        self.status = Some(s);
        self
    }
}

/// A status that says the adapter is on `pods` (name, ip), since the epoch.
pub fn loaded_on(pods: &[(&str, &str)], pinned: bool) -> LoraAdapterStatus {
    LoraAdapterStatus {
        adapter_name: Some("ad".into()),
        loaded_on: pods
            .iter()
            .map(|(p, ip)| LoadedOn {
                pod: p.to_string(),
                pod_ip: ip.to_string(),
                since: Time(Timestamp::UNIX_EPOCH),
                pinned,
            })
            .collect(),
        loaded_count: pods.len() as i32,
        ..Default::default()
    }
}

/// A server pod in `testns` labelled app=srv, serving on 30000 (no named port: the default).
pub fn pod(name: &str, ip: &str, ready: bool) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {SELECTOR.0: SELECTOR.1}},
        "spec": {"containers": [{"name": "server", "image": "loraplane-server"}]},
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    }))
    .expect("valid pod")
}

/// One fake server.
#[derive(Clone, Debug)]
pub struct FakeServer {
    /// `served_model_name`.
    pub model: String,
    /// `max_loras_per_batch`.
    pub slots: usize,
    /// Loaded adapters.
    pub loaded: Vec<ServedAdapter>,
    /// Does not answer at all.
    pub down: bool,
}

impl FakeServer {
    /// Serving `tiny` with 4 slots, nothing loaded.
    pub fn tiny() -> Self {
        Self {
            model: "tiny".into(),
            slots: 4,
            loaded: Vec::new(),
            down: false,
        }
    }

    /// With `name` loaded from `path`.
    pub fn with(mut self, name: &str, path: &str, pinned: bool) -> Self {
        self.loaded.push(ServedAdapter {
            name: name.into(),
            path: path.into(),
            pinned,
        });
        self
    }
}

/// In-memory servers keyed by endpoint; they refuse what the real server refuses (loading a
/// loaded name, unloading a missing one, pinning past `slots - 1`) and log every call.
#[derive(Default)]
pub struct FakeServers {
    servers: Mutex<BTreeMap<String, FakeServer>>,
    calls: Mutex<Vec<String>>,
}

impl FakeServers {
    /// Adds the server of the pod at `ip` (port 30000).
    pub fn add(&self, ip: &str, server: FakeServer) {
        self.servers
            .lock()
            .unwrap()
            .insert(format!("http://{ip}:30000"), server);
    }

    /// Every load/unload so far, sorted (pods are handled concurrently).
    pub fn changes(&self) -> Vec<String> {
        let mut c: Vec<String> = self
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !c.starts_with("state"))
            .cloned()
            .collect();
        c.sort();
        c
    }

    /// (name, path, pinned) loaded on the server at `ip`.
    pub fn loaded(&self, ip: &str) -> Vec<(String, String, bool)> {
        self.servers.lock().unwrap()[&format!("http://{ip}:30000")]
            .loaded
            .iter()
            .map(|a| (a.name.clone(), a.path.clone(), a.pinned))
            .collect()
    }

    fn with_server<T>(
        &self,
        endpoint: &str,
        call: String,
        f: impl FnOnce(&mut FakeServer) -> Result<T>,
    ) -> Result<T> {
        let ip = endpoint.trim_start_matches("http://").trim_end_matches(":30000");
        self.calls.lock().unwrap().push(call.replace("{ip}", ip));
        let mut servers = self.servers.lock().unwrap();
        match servers.get_mut(endpoint) {
            Some(s) if !s.down => f(s),
            _ => Err(Error::ServerUnreachable {
                endpoint: endpoint.into(),
                message: "connection refused".into(),
            }),
        }
    }
}

fn refused(endpoint: &str, action: &'static str, message: String) -> Error {
    Error::ServerRefused {
        endpoint: endpoint.into(),
        action,
        message,
    }
}

impl AdapterServers for FakeServers {
    fn state<'a>(&'a self, endpoint: &'a str) -> BoxFuture<'a, Result<ServerState>> {
        let r = self.with_server(endpoint, "state {ip}".into(), |s| {
            Ok(ServerState {
                served_model_name: s.model.clone(),
                lora_enabled: true,
                max_loras_per_batch: s.slots,
                loaded: s.loaded.clone(),
            })
        });
        Box::pin(async move { r })
    }

    fn load<'a>(&'a self, endpoint: &'a str, a: &'a ServedAdapter) -> BoxFuture<'a, Result<()>> {
        let pin = if a.pinned { " pinned" } else { "" };
        let call = format!("load {{ip}} {} {}{pin}", a.name, a.path);
        let r = self.with_server(endpoint, call, |s| {
            if s.loaded.iter().any(|l| l.name == a.name) {
                return Err(refused(
                    endpoint,
                    "load",
                    format!("{:?} is already loaded", a.name),
                ));
            }
            if a.pinned && s.loaded.iter().filter(|l| l.pinned).count() + 1 >= s.slots {
                return Err(refused(endpoint, "load", "no slot left to pin".into()));
            }
            s.loaded.push(a.clone());
            Ok(())
        });
        Box::pin(async move { r })
    }

    fn unload<'a>(&'a self, endpoint: &'a str, name: &'a str) -> BoxFuture<'a, Result<()>> {
        let r = self.with_server(endpoint, format!("unload {{ip}} {name}"), |s| {
            let before = s.loaded.len();
            s.loaded.retain(|l| l.name != name);
            if s.loaded.len() == before {
                return Err(refused(endpoint, "unload", format!("{name:?} is not loaded")));
            }
            Ok(())
        });
        Box::pin(async move { r })
    }
}

impl Context {
    /// A context over a mock API server and `servers`, with its own metrics registry.
    pub fn test(servers: Arc<FakeServers>) -> (Arc<Context>, ApiServerVerifier, prometheus::Registry) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry).expect("metrics");
        let ctx = Context::new(
            client,
            Reporter::from("loraplane-operator"),
            servers,
            metrics,
            30000,
        );
        (Arc::new(ctx), ApiServerVerifier(handle), registry)
    }
}

/// A check on a status patch.
pub type StatusCheck = Box<dyn FnOnce(&LoraAdapterStatus) + Send>;

/// One request the API server must receive, in order.
pub enum Expect {
    /// The JSON patch adding the finalizer.
    FinalizerAdd,
    /// The JSON patch removing the finalizer (at index 0).
    FinalizerRemove,
    /// `GET pods?labelSelector=app=srv`, answered with these pods.
    ListPods(Vec<Pod>),
    /// `GET pods/NAME`, answered with the pod or 404.
    GetPod(String, Option<Box<Pod>>),
    /// `GET pods?...` answered with an HTTP 500.
    ListPodsFails,
    /// An Event with this type and reason whose note contains the text.
    Event(&'static str, &'static str, String),
    /// A server-side-apply status patch; the check sees the status.
    Status(StatusCheck),
}

/// The mock API server's end of the client.
pub struct ApiServerVerifier(Handle<Request<Body>, Response<Body>>);

fn json_response(status: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

const ADAPTERS: &str = "/apis/loraplane.io/v1alpha1/namespaces/testns/loraadapters";

impl ApiServerVerifier {
    /// Answers the scripted requests for `adapter` in order; then requires silence until the
    /// client is dropped.
    pub fn run(self, adapter: LoraAdapter, script: Vec<Expect>) -> JoinHandle<()> {
        let mut handle = self.0;
        tokio::spawn(async move {
            let name = adapter.name_any();
            for (i, expect) in script.into_iter().enumerate() {
                let (req, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
                    .await
                    .unwrap_or_else(|_| panic!("request #{i} never came"))
                    .unwrap_or_else(|| panic!("the client went away before request #{i}"));
                let method = req.method().clone();
                let uri = req.uri().to_string();
                let body = req.into_body().collect_bytes().await.unwrap();
                let body: Value = if body.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&body).expect("JSON body")
                };
                match expect {
                    Expect::FinalizerAdd => {
                        assert_eq!(
                            (method, uri.as_str()),
                            (Method::PATCH, format!("{ADAPTERS}/{name}?").as_str())
                        );
                        assert_eq!(
                            body,
                            json!([
                                {"op": "test", "path": "/metadata/finalizers", "value": null},
                                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
                            ])
                        );
                        send.send_response(json_response(200, &json!(adapter.clone().finalized())));
                    }
                    Expect::FinalizerRemove => {
                        assert_eq!(
                            (method, uri.as_str()),
                            (Method::PATCH, format!("{ADAPTERS}/{name}?").as_str())
                        );
                        assert_eq!(
                            body,
                            json!([
                                {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                                {"op": "remove", "path": "/metadata/finalizers/0"},
                            ])
                        );
                        let mut done = adapter.clone();
                        done.finalizers_mut().clear();
                        send.send_response(json_response(200, &json!(done)));
                    }
                    Expect::ListPods(pods) => {
                        assert_eq!(method, Method::GET);
                        assert_eq!(uri, "/api/v1/namespaces/testns/pods?&labelSelector=app%3Dsrv");
                        let list =
                            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods});
                        send.send_response(json_response(200, &list));
                    }
                    Expect::ListPodsFails => {
                        assert_eq!(method, Method::GET);
                        assert!(uri.starts_with("/api/v1/namespaces/testns/pods?"), "{uri}");
                        let st = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                                        "message": "etcd is sad", "reason": "InternalError", "code": 500});
                        send.send_response(json_response(500, &st));
                    }
                    Expect::GetPod(pod_name, pod) => {
                        assert_eq!(method, Method::GET);
                        assert_eq!(uri, format!("/api/v1/namespaces/testns/pods/{pod_name}"));
                        match pod {
                            Some(p) => send.send_response(json_response(200, &json!(p))),
                            None => {
                                let st = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                                                "message": "not found", "reason": "NotFound", "code": 404});
                                send.send_response(json_response(404, &st));
                            }
                        }
                    }
                    Expect::Event(type_, reason, note) => {
                        assert_eq!(method, Method::POST);
                        assert_eq!(uri, "/apis/events.k8s.io/v1/namespaces/testns/events?");
                        assert_eq!(
                            (body["type"].as_str(), body["reason"].as_str()),
                            (Some(type_), Some(reason)),
                            "{body}"
                        );
                        let got = body["note"].as_str().unwrap_or_default();
                        assert!(got.contains(&note), "event note {got:?} lacks {note:?}");
                        assert_eq!(body["regarding"]["name"], json!(name));
                        send.send_response(json_response(200, &body));
                    }
                    Expect::Status(check) => {
                        assert_eq!(method, Method::PATCH);
                        assert_eq!(
                            uri,
                            format!("{ADAPTERS}/{name}/status?&force=true&fieldManager=loraplane-operator")
                        );
                        assert_eq!(body["apiVersion"], "loraplane.io/v1alpha1");
                        assert_eq!(body["kind"], "LoraAdapter");
                        let status: LoraAdapterStatus =
                            serde_json::from_value(body["status"].clone()).expect("a valid status");
                        check(&status);
                        let mut out = adapter.clone();
                        out.status = Some(status);
                        send.send_response(json_response(200, &json!(out)));
                    }
                }
            }
            // NB: once the test drops the context, the channel closes; anything before that is
            // a request the scenario did not expect.
            match tokio::time::timeout(Duration::from_secs(1), handle.next_request()).await {
                Ok(None) => {}
                Ok(Some((req, _))) => panic!("unexpected request {} {}", req.method(), req.uri()),
                Err(_) => panic!("the client was not dropped: end the test by dropping the context"),
            }
        })
    }
}

/// Waits for the verifier, failing after 2 s.
pub async fn verified(h: JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(3), h)
        .await
        .expect("the verifier timed out")
        .expect("the scenario failed");
}
