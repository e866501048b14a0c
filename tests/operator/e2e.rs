//! The operator's pod-facing logic end to end against REAL `loraplane-server` processes on
//! 127.0.0.1 standing in for server pods: apply, an unchanged pass, pin, change the source,
//! a "pod" restart that comes back empty, placement with `replicas`, a wrong base model, an
//! unreachable pod, and deletion. Every expectation is read back from the servers' own
//! `/get_server_info`, not from the operator's report.
//!
//! The server binary comes from `LORAPLANE_SERVER_BIN`, else `<target dir>/debug/loraplane-server`
//! (built by `cargo build -p loraplane-server` or `cargo test --workspace`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use loraplane_operator::crd::{LoraAdapter, LoraAdapterSpec, LoraAdapterStatus, Phase};
use loraplane_operator::plan::Issue;
use loraplane_operator::pods::{self, PodTarget};
use loraplane_operator::status::{self, READY};
use loraplane_operator::sync::{converge, unload_everywhere, Outcome, SyncReport};
use loraplane_operator::HttpServers;
use serde_json::{json, Value};

/// The served model name the test servers report.
const MODEL: &str = "tiny-llama";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn fixture(rel: &str) -> String {
    repo_root().join("tests/fixtures").join(rel).display().to_string()
}

fn server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LORAPLANE_SERVER_BIN") {
        return PathBuf::from(p);
    }
    // <target>/debug/deps/e2e-HASH -> <target>/debug/loraplane-server
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("loraplane-server");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p loraplane-server` (or run \
         `cargo test --workspace`), or point LORAPLANE_SERVER_BIN at a loraplane-server binary",
        bin.display()
    );
    bin
}

/// A server process on 127.0.0.1; killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    /// Starts the tiny Llama fixture with LoRA on (4 slots) on a free port; waits for /health.
    async fn start() -> Server {
        let mut child = Command::new(server_bin())
            .args([
                "--model-path",
                &fixture("tiny/llama"),
                "--served-model-name",
                MODEL,
            ])
            .args(["--enable-lora", "--max-loras-per-batch", "4"])
            .args(["--host", "127.0.0.1", "--port", "0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn loraplane-server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Drains stderr for the server's life (a full pipe would block it) and reports the port.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("serving on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default().to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .unwrap();
        let mut server = Server { child, port: 0 };
        let addr = addr.unwrap_or_else(|_| panic!("loraplane-server did not start within 60 s"));
        server.port = addr
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('"')
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reqwest::get(server.url("/health"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(Instant::now() < deadline, "/health never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// (name, path, pinned) loaded, straight from the server.
    async fn loaded(&self) -> Vec<(String, String, bool)> {
        let v: Value = reqwest::get(self.url("/get_server_info"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut out: Vec<(String, String, bool)> = v["loaded_adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["lora_name"].as_str().unwrap().to_string(),
                    a["lora_path"].as_str().unwrap().to_string(),
                    a["pinned"].as_bool().unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Greedy tokens from the adapter `lora`, proving it serves.
    async fn generate(&self, lora: &str) -> Vec<u64> {
        let body = json!({"input_ids": [1, 2, 3], "lora_path": lora,
                          "sampling_params": {"max_new_tokens": 2, "temperature": 0}});
        let r = reqwest::Client::new()
            .post(self.url("/generate"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "generate with {lora}");
        let v: Value = r.json().await.unwrap();
        v["output_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A ready pod whose server listens on 127.0.0.1:`port` (container port `http`).
fn pod(name: &str, port: u16) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns", "labels": {"app": "srv"}},
        "spec": {"containers": [{"name": "server", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .unwrap()
}

fn targets(pods: &[(&str, u16)]) -> Vec<PodTarget> {
    // NB: the default port is never used here: every pod names its `http` port.
    pods.iter()
        .map(|(n, p)| pods::target(&pod(n, *p), 1, true))
        .collect()
}

fn adapter(source: &str, pinned: bool, replicas: Option<i32>) -> LoraAdapter {
    let mut a = LoraAdapter::new(
        "support-bot",
        LoraAdapterSpec {
            adapter_name: None,
            base_model: MODEL.into(),
            source: source.into(),
            pinned,
            server_selector: serde_json::from_value(json!({"matchLabels": {"app": "srv"}})).unwrap(),
            replicas,
        },
    );
    a.metadata.namespace = Some("ns".into());
    a.metadata.generation = Some(1);
    a
}

fn outcomes(r: &SyncReport) -> Vec<(&str, &Outcome)> {
    r.pods.iter().map(|p| (p.pod.as_str(), &p.outcome)).collect()
}

/// One operator pass: converge, then the status the operator would write.
async fn pass(
    servers: &HttpServers,
    a: &LoraAdapter,
    pods: &[(&str, u16)],
    prev: Option<&LoraAdapterStatus>,
) -> (SyncReport, LoraAdapterStatus) {
    let desired = a.desired().expect("a valid spec");
    let report = converge(servers, &desired, targets(pods), prev).await;
    let st = status::from_report(prev, &desired.name, &report, Some(1), Timestamp::now());
    (report, st)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_drives_real_servers() {
    tokio::time::timeout(Duration::from_secs(240), scenario())
        .await
        .expect("the end-to-end scenario took over 240 s");
}

async fn scenario() {
    let (a_srv, mut b_srv) = tokio::join!(Server::start(), Server::start());
    let servers = HttpServers::new(Duration::from_secs(60), None).unwrap();
    let qv = fixture("tiny/adapters/qv_r2");
    let attn = fixture("tiny/adapters/attn_r4");
    let name = "support-bot".to_string();
    let on = |path: &str, pinned: bool| vec![(name.clone(), path.to_string(), pinned)];

    // Apply: loaded on both "pods", and it serves.
    let pods = [("srv-a", a_srv.port), ("srv-b", b_srv.port)];
    let (r, st) = pass(&servers, &adapter(&qv, false, None), &pods, None).await;
    assert_eq!(
        outcomes(&r),
        [("srv-a", &Outcome::Loaded), ("srv-b", &Outcome::Loaded)]
    );
    assert_eq!(st.phase, Some(Phase::Ready));
    assert_eq!(
        (a_srv.loaded().await, b_srv.loaded().await),
        (on(&qv, false), on(&qv, false))
    );
    assert_eq!(a_srv.generate(&name).await.len(), 2);

    // Nothing changed: nothing done, the same status.
    let (r, st2) = pass(&servers, &adapter(&qv, false, None), &pods, Some(&st)).await;
    assert_eq!(
        outcomes(&r),
        [("srv-a", &Outcome::Kept), ("srv-b", &Outcome::Kept)]
    );
    assert_eq!(st2, st, "an unchanged world gives an unchanged status");

    // Pin: reloaded pinned.
    let (r, st) = pass(&servers, &adapter(&qv, true, None), &pods, Some(&st2)).await;
    let why = Outcome::Reloaded("pinned false -> true".into());
    assert_eq!(outcomes(&r), [("srv-a", &why), ("srv-b", &why)]);
    assert_eq!(
        (a_srv.loaded().await, b_srv.loaded().await),
        (on(&qv, true), on(&qv, true))
    );
    assert!(st.loaded_on.iter().all(|l| l.pinned));

    // New source: reloaded from it, still pinned, and it serves.
    let (r, st) = pass(&servers, &adapter(&attn, true, None), &pods, Some(&st)).await;
    assert!(r
        .pods
        .iter()
        .all(|p| matches!(&p.outcome, Outcome::Reloaded(w) if w.contains("path"))));
    assert_eq!(
        (a_srv.loaded().await, b_srv.loaded().await),
        (on(&attn, true), on(&attn, true))
    );
    assert_eq!(b_srv.generate(&name).await.len(), 2);
    assert_eq!(st.phase, Some(Phase::Ready));

    // "Pod" srv-b restarts: same pod name, a fresh server, nothing loaded. The status still
    // lists srv-b; the operator believes the server and loads it again.
    drop(std::mem::replace(&mut b_srv, Server::start().await));
    assert!(
        b_srv.loaded().await.is_empty(),
        "a restarted server comes back empty"
    );
    let pods = [("srv-a", a_srv.port), ("srv-b", b_srv.port)];
    let before = st.clone();
    let (r, st) = pass(&servers, &adapter(&attn, true, None), &pods, Some(&before)).await;
    assert_eq!(
        outcomes(&r),
        [("srv-a", &Outcome::Kept), ("srv-b", &Outcome::Loaded)]
    );
    assert_eq!(b_srv.loaded().await, on(&attn, true));
    assert_eq!(st.loaded_on[0].since, before.loaded_on[0].since, "srv-a kept it");
    assert_eq!(st.phase, Some(Phase::Ready));

    // replicas: 1 keeps one copy (both hold it with equal free slots: the first by name) and
    // unloads the other.
    let (r, st) = pass(&servers, &adapter(&attn, true, Some(1)), &pods, Some(&st)).await;
    assert_eq!(
        outcomes(&r),
        [("srv-a", &Outcome::Kept), ("srv-b", &Outcome::Unloaded)]
    );
    assert_eq!(
        (a_srv.loaded().await, b_srv.loaded().await),
        (on(&attn, true), vec![])
    );
    assert_eq!(
        (st.loaded_count, st.desired_count, st.phase),
        (1, 1, Some(Phase::Ready))
    );

    // A wrong base model is refused per pod and said in the conditions; nothing is touched.
    let mut wrong = adapter(&attn, true, None);
    wrong.spec.base_model = "another-model".into();
    let (r, st_wrong) = pass(&servers, &wrong, &pods, Some(&st)).await;
    assert!(r
        .pods
        .iter()
        .all(|p| p.outcome == Outcome::Skipped(Issue::BaseModelMismatch(MODEL.into()))));
    let ready = st_wrong.conditions.iter().find(|c| c.type_ == READY).unwrap();
    assert_eq!(ready.reason, "BaseModelMismatch");
    assert_eq!(a_srv.loaded().await, on(&attn, true));

    // A "pod" whose server does not answer is a failure the operator reports, not a crash.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let with_dead = [("srv-a", a_srv.port), ("srv-dead", closed)];
    let (r, st_dead) = pass(&servers, &adapter(&attn, true, None), &with_dead, Some(&st)).await;
    assert!(
        matches!(&r.pods[1].outcome, Outcome::Skipped(Issue::Unreachable(m)) if m.contains("unreachable"))
    );
    assert_eq!(r.failures().len(), 1);
    assert_eq!(st_dead.phase, Some(Phase::Degraded));

    // Delete: unloaded from every pod that has it (srv-a); srv-b has nothing to lose.
    let must_reach: BTreeSet<String> = st.loaded_on.iter().map(|l| l.pod.clone()).collect();
    let r = unload_everywhere(&servers, std::slice::from_ref(&name), targets(&pods), &must_reach).await;
    assert_eq!(
        outcomes(&r),
        [("srv-a", &Outcome::Unloaded), ("srv-b", &Outcome::Absent)]
    );
    assert!(r.failures().is_empty());
    assert_eq!((a_srv.loaded().await, b_srv.loaded().await), (vec![], vec![]));
}
