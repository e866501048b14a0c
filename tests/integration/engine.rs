//! The serving engine through its handle: continuous batching with slot churn against the PEFT
//! reference, the adapter lifecycle (eviction, pinning, host reload, unload in flight, reload
//! under the same name), the prefix cache and cancellation; and, through a model whose slot
//! copies stay in flight for a few polls, the scheduler's side of `--enable-lora-overlap-loading`;
//! through one that samples greedily itself, the scheduler's device-sampling branch; through
//! one that also overlaps steps, the overlap scheduler against steps run one at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loraplane_server::adapter::LoraAdapter;
use loraplane_server::backend::cpu::log_softmax;
use loraplane_server::engine::generate::argmax;
use loraplane_server::engine::sampling::top_logprobs;
use loraplane_server::engine::KvCache;
use loraplane_server::error::{Error, Result as ModelResult};
use loraplane_server::model::llama::SeqInput;

use loraplane_server::engine::request::{
    EngineError, EngineEvent, EngineRequest, FinishReason, LogprobOptions, SamplingParams, TokenLogprob,
};
use loraplane_server::engine::{self, AdapterSpec, EngineConfig, EngineHandle, EvictionPolicy};
use loraplane_server::metrics::Metrics;
use loraplane_server::model::weights::load_hf_weights;
use loraplane_server::model::{
    check_launchable, pending_index, pending_token, DeviceSample, Forward, LlamaModel, ModelConfig, SeqOutput,
};

use crate::common::{fixture, read_safetensors};

const ADAPTERS: [&str; 4] = ["qv_r2", "mlp_r8_rslora", "all_r16", "attn_r4"];

fn tiny_model() -> LlamaModel {
    let dir = fixture("tiny/llama");
    let config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    LlamaModel::from_tensors(config, load_hf_weights(&dir).unwrap()).unwrap()
}

fn config(slots: usize, host: Option<usize>) -> EngineConfig {
    EngineConfig {
        max_loras_per_batch: slots,
        max_loaded_loras: host,
        max_lora_rank: None,
        lora_target_modules: None,
        eviction_policy: EvictionPolicy::Lru,
        lora_overlap_loading: false,
        max_running_requests: 64,
        max_queued_requests: 1024,
        max_total_tokens: 4096,
        chunked_prefill_size: 16,
        context_length: 256,
        prefix_cache: true,
        kv_block_size: 4,
        overlap_schedule: true,
    }
}

fn spec(name: &str, adapter: &str, pinned: bool) -> AdapterSpec {
    AdapterSpec {
        name: name.into(),
        path: fixture(&format!("tiny/adapters/{adapter}")),
        pinned,
    }
}

fn start(cfg: EngineConfig, adapters: Vec<AdapterSpec>) -> (EngineHandle, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    (
        engine::start(tiny_model(), cfg, adapters, metrics.clone()).unwrap(),
        metrics,
    )
}

fn greedy(ids: Vec<u32>, lora: Option<&str>, n: usize) -> EngineRequest {
    EngineRequest {
        input_ids: ids,
        lora: lora.map(String::from),
        sampling: SamplingParams {
            max_new_tokens: n,
            temperature: 0.0,
            ignore_eos: true,
            ..Default::default()
        },
        logprobs: LogprobOptions::default(),
    }
}

struct Outcome {
    tokens: Vec<u32>,
    /// Each token's log-probability and top alternatives.
    logprobs: Vec<(f32, Vec<(u32, f32)>)>,
    cached: usize,
    reason: FinishReason,
}

async fn collect(mut rx: loraplane_server::engine::request::EventStream) -> Outcome {
    let mut out = Outcome {
        tokens: vec![],
        logprobs: vec![],
        cached: 0,
        reason: FinishReason::Abort("no finish".into()),
    };
    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(EngineEvent::Started { cached_tokens, .. }) => out.cached = cached_tokens,
                Some(EngineEvent::Token(t)) => {
                    out.tokens.push(t.token_id);
                    out.logprobs.push((t.logprob, t.top));
                }
                Some(EngineEvent::Finished(r)) => { out.reason = r; return out; }
                None => return out,
            },
            _ = &mut deadline => panic!("request did not finish in 60 s"),
        }
    }
}

fn reference_greedy(case: &str, p: usize) -> (Vec<u32>, Vec<u32>, Vec<f64>) {
    let r = read_safetensors(&fixture("tiny/reference.safetensors"));
    let prompt = r[&format!("prompt.{p}")].ids();
    let want = r[&format!("greedy.{case}.{p}")].ids();
    let margin = r[&format!("margin.{case}.{p}")].data.clone();
    (prompt, want, margin)
}

fn assert_greedy(case: &str, p: usize, got: &[u32]) {
    let (_, want, margin) = reference_greedy(case, p);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        if margin[i] < 1e-3 {
            return;
        }
        assert_eq!(g, w, "{case} prompt {p} token {i}: {got:?} vs {want:?}");
    }
}

fn metric(m: &Metrics, line_prefix: &str) -> f64 {
    m.render()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_batching_with_two_slots_matches_peft_for_every_adapter() {
    let adapters = ADAPTERS.iter().map(|a| spec(a, a, false)).collect();
    let (h, m) = start(config(2, None), adapters);
    let mut pending = Vec::new();
    for p in 0..6 {
        for case in std::iter::once(None).chain(ADAPTERS.iter().map(|a| Some(*a))) {
            let (prompt, _, _) = reference_greedy("llama", p);
            pending.push((case, p, h.submit(greedy(prompt, case, 16)).unwrap()));
        }
    }
    for (case, p, rx) in pending {
        let out = collect(rx).await;
        assert_eq!(out.reason, FinishReason::Length);
        let name = case.map_or("llama".to_string(), |a| format!("llama+{a}"));
        assert_greedy(&name, p, &out.tokens);
    }
    let evictions = metric(
        &m,
        "loraplane_lora_adapter_evictions_total{policy=\"lru\",pool=\"device\",reason=\"capacity\"}",
    );
    assert!(
        evictions > 0.0,
        "4 adapters through 2 slots must evict:\n{}",
        m.render()
    );
    assert!(metric(&m, "loraplane_lora_slots_used") <= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_kv_cache_preempts_and_recomputes_without_changing_outputs() {
    // 64 tokens of cache: each request (prompt + 24 new tokens) fits alone, four at once do not.
    let small = EngineConfig {
        max_total_tokens: 64,
        context_length: 64,
        prefix_cache: false,
        ..config(2, None)
    };
    let (h, m) = start(small, vec![spec("a", "all_r16", false)]);
    assert_eq!(metric(&m, "loraplane_kv_cache_capacity_tokens"), 64.0);
    let cases: Vec<(usize, Option<&str>)> = vec![(0, None), (1, Some("a")), (2, None), (3, Some("a"))];
    let prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|&(p, _)| reference_greedy("llama", p).0)
        .collect();
    assert!(
        prompts.iter().all(|p| p.len() + 24 <= 64),
        "each request must fit alone"
    );
    let pending: Vec<_> = cases
        .iter()
        .zip(&prompts)
        .map(|(&(_, lora), prompt)| h.submit(greedy(prompt.clone(), lora, 24)).unwrap())
        .collect();
    let mut together = Vec::new();
    for rx in pending {
        let out = collect(rx).await;
        assert_eq!(out.reason, FinishReason::Length);
        together.push(out.tokens);
    }
    assert!(
        metric(&m, "loraplane_requests_preempted_total") > 0.0,
        "four requests of about 34 tokens in 64 must preempt:\n{}",
        m.render()
    );
    // A preempted request resumes from its prompt and the tokens it had: same greedy tokens.
    for ((&(_, lora), prompt), got) in cases.iter().zip(&prompts).zip(&together) {
        let alone = collect(h.submit(greedy(prompt.clone(), lora, 24)).unwrap()).await;
        assert_eq!(&alone.tokens, got, "adapter {lora:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_adapter_keeps_its_slot_and_host_evicted_adapters_reload() {
    let adapters = vec![
        spec("pinned", "qv_r2", true),
        spec("b", "mlp_r8_rslora", false),
        spec("c", "all_r16", false),
        spec("d", "attn_r4", false),
    ];
    let (h, m) = start(config(2, Some(2)), adapters);
    assert_eq!(metric(&m, "loraplane_lora_slots_pinned"), 1.0);
    let (prompt, _, _) = reference_greedy("llama", 1);
    for round in 0..2 {
        for name in ["b", "c", "d", "pinned"] {
            let out = collect(h.submit(greedy(prompt.clone(), Some(name), 4)).unwrap()).await;
            assert_eq!(out.tokens.len(), 4, "round {round} adapter {name}");
        }
    }
    // With one free slot, b/c/d take turns in it; the pinned adapter is never the victim.
    assert_eq!(metric(&m, "loraplane_lora_slots_pinned"), 1.0);
    let reloads = metric(
        &m,
        "loraplane_lora_adapter_loads_total{pool=\"host\",reason=\"reload\"}",
    );
    assert!(
        reloads > 0.0,
        "host cap 2 with 4 adapters must reload from disk:\n{}",
        m.render()
    );
    assert!(metric(&m, "loraplane_lora_host_adapters") <= 2.0);
    // Results after a reload are still the adapter's own.
    let out = collect(h.submit(greedy(prompt.clone(), Some("c"), 16)).unwrap()).await;
    assert_greedy("llama+all_r16", 1, &out.tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_lets_running_requests_finish_and_refuses_new_ones() {
    let (h, _m) = start(config(2, None), vec![spec("x", "qv_r2", false)]);
    let (prompt, _, _) = reference_greedy("llama", 3);
    let rx = h.submit(greedy(prompt.clone(), Some("x"), 64)).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    h.unload_adapter("x".into()).await.unwrap();
    assert!(matches!(
        h.submit(greedy(prompt.clone(), Some("x"), 4)),
        Err(EngineError::AdapterNotFound(_))
    ));
    let out = collect(rx).await;
    // Either it was already running (finishes with the adapter's weights) or it was still
    // queued (aborted with a message) — never a silent switch to other weights.
    match out.reason {
        FinishReason::Length => assert_greedy("llama+qv_r2", 3, &out.tokens),
        FinishReason::Abort(msg) => assert!(msg.contains("unloaded"), "{msg}"),
        other => panic!("unexpected finish {other:?}"),
    }
    assert!(h.adapters().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_the_same_name_serves_new_weights_without_stale_prefix() {
    let (h, _m) = start(config(2, None), vec![spec("x", "qv_r2", false)]);
    let (prompt, _, _) = reference_greedy("llama", 4);
    let first = collect(h.submit(greedy(prompt.clone(), Some("x"), 16)).unwrap()).await;
    assert_greedy("llama+qv_r2", 4, &first.tokens);
    let again = collect(h.submit(greedy(prompt.clone(), Some("x"), 16)).unwrap()).await;
    assert!(
        again.cached > 0,
        "the same adapter and prompt reuse the cached prefix"
    );
    assert_eq!(again.tokens, first.tokens);

    let dup = h
        .load_adapter("x".into(), fixture("tiny/adapters/attn_r4"), false)
        .await;
    assert!(matches!(dup, Err(EngineError::Adapter(m)) if m.contains("already loaded")));
    h.unload_adapter("x".into()).await.unwrap();
    h.load_adapter("x".into(), fixture("tiny/adapters/attn_r4"), false)
        .await
        .unwrap();
    let reloaded = collect(h.submit(greedy(prompt.clone(), Some("x"), 16)).unwrap()).await;
    assert_eq!(
        reloaded.cached, 0,
        "a reloaded adapter never reuses the old one's cache"
    );
    assert_greedy("llama+attn_r4", 4, &reloaded.tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_loads_leave_no_state_and_pins_are_bounded() {
    let (h, _m) = start(config(2, None), vec![spec("p", "qv_r2", true)]);
    let bad = h.load_adapter("bad".into(), fixture("tiny/llama"), false).await;
    assert!(matches!(bad, Err(EngineError::Adapter(m)) if m.contains("adapter_config.json")));
    let pin = h
        .load_adapter("p2".into(), fixture("tiny/adapters/attn_r4"), true)
        .await;
    assert!(matches!(pin, Err(EngineError::Adapter(m)) if m.contains("pinned")));
    assert_eq!(
        h.adapters().iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        ["p"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_cancels_its_request() {
    let (h, m) = start(config(2, None), vec![]);
    cancel_after_tokens_then_serve(&h, &m, 1).await;
}

/// Drops a long request's stream after its first `tokens` tokens (it is surely running then),
/// waits for the engine to cancel it, and checks that the next request is served as before.
async fn cancel_after_tokens_then_serve(h: &EngineHandle, m: &Metrics, tokens: usize) {
    let (prompt, _, _) = reference_greedy("llama", 2);
    let mut rx = h.submit(greedy(prompt.clone(), None, 200)).unwrap();
    let mut seen = 0;
    while seen < tokens {
        match rx.recv().await {
            Some(EngineEvent::Token(_)) => seen += 1,
            Some(_) => {}
            None => break,
        }
    }
    drop(rx);
    for _ in 0..100 {
        if h.load() == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.load(), (0, 0));
    let out = collect(h.submit(greedy(prompt, None, 16)).unwrap()).await;
    assert_greedy("llama", 2, &out.tokens);
    assert_eq!(out.reason, FinishReason::Length);
    assert!(metric(m, "loraplane_generated_tokens_total") < 200.0 + 16.0);
    assert_eq!(
        metric(m, "loraplane_requests_finished_total{reason=\"cancelled\"}"),
        1.0
    );
}

/// What [`SlowCopies`] saw, shared with the test.
#[derive(Default)]
struct CopyLog {
    /// Polls an overlapped copy stays in flight.
    polls_per_copy: u32,
    /// Fail the next `load_slot`.
    fail_next: bool,
    /// Slots whose copy is still in flight, with the polls left.
    in_flight: HashMap<usize, u32>,
    /// Which adapter (by id) each slot holds.
    slot_of: HashMap<u64, usize>,
    /// Every `load_slot`: (slot, adapter name, overlap).
    loads: Vec<(usize, String, bool)>,
    /// `slot_ready` answers of "not yet".
    not_ready: usize,
    /// Every `stage_adapter`: (adapter name, id).
    staged: Vec<(String, u64)>,
    /// Every `unstage_adapter`: the id.
    unstaged: Vec<u64>,
}

/// The CPU model with slot copies that behave like the GPU's overlapped ones: a copy stays in
/// flight for `polls_per_copy` polls of `slot_ready` (or until one waits). A forward pass that
/// uses an adapter whose slot copy is in flight, or that was never copied to its slot, fails.
struct SlowCopies {
    inner: LlamaModel,
    log: Arc<Mutex<CopyLog>>,
}

impl Forward for SlowCopies {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn forward(&mut self, kv: &mut KvCache, seqs: &[SeqInput<'_>]) -> ModelResult<Vec<Vec<f32>>> {
        {
            let log = self.log.lock().unwrap();
            for a in seqs.iter().filter_map(|s| s.adapter) {
                match log.slot_of.get(&a.id) {
                    None => return Err(Error::Model(format!("{} was never copied to a slot", a.name))),
                    Some(slot) if log.in_flight.contains_key(slot) => {
                        return Err(Error::Model(format!(
                            "{} ran while its copy was in flight",
                            a.name
                        )))
                    }
                    Some(_) => {}
                }
            }
        }
        self.inner.forward(kv, seqs)
    }
    fn new_kv_cache(&self, max_tokens: usize, block_size: usize) -> KvCache {
        KvCache::new(self.inner.config(), max_tokens, block_size)
    }
    fn load_slot(&mut self, slot: usize, adapter: &Arc<LoraAdapter>, overlap: bool) -> ModelResult<()> {
        let mut log = self.log.lock().unwrap();
        log.loads.push((slot, adapter.name.clone(), overlap));
        if std::mem::take(&mut log.fail_next) {
            return Err(Error::Model("simulated copy failure".into()));
        }
        log.slot_of.retain(|_, s| *s != slot);
        log.slot_of.insert(adapter.id, slot);
        if overlap {
            let polls = log.polls_per_copy;
            log.in_flight.insert(slot, polls);
        }
        Ok(())
    }
    fn slot_ready(&mut self, slot: usize, wait: bool) -> ModelResult<bool> {
        let mut log = self.log.lock().unwrap();
        let done = match log.in_flight.get_mut(&slot) {
            None => true,
            Some(_) if wait => true,
            Some(left) if *left <= 1 => true,
            Some(left) => {
                *left -= 1;
                false
            }
        };
        if done {
            log.in_flight.remove(&slot);
        } else {
            log.not_ready += 1;
        }
        Ok(done)
    }
    fn stage_adapter(&mut self, adapter: &Arc<LoraAdapter>) -> ModelResult<()> {
        let mut log = self.log.lock().unwrap();
        log.staged.push((adapter.name.clone(), adapter.id));
        Ok(())
    }
    fn unstage_adapter(&mut self, adapter_id: u64) {
        self.log.lock().unwrap().unstaged.push(adapter_id);
    }
}

fn start_slow(
    cfg: EngineConfig,
    adapters: Vec<AdapterSpec>,
    polls: u32,
) -> (EngineHandle, Arc<Mutex<CopyLog>>) {
    let log = Arc::new(Mutex::new(CopyLog {
        polls_per_copy: polls,
        ..Default::default()
    }));
    let model = SlowCopies {
        inner: tiny_model(),
        log: log.clone(),
    };
    let h = engine::start(model, cfg, adapters, Arc::new(Metrics::new())).unwrap();
    (h, log)
}

/// Overlapped copies: requests wait in the queue while their adapter's copy is in flight (a
/// forward pass using it would fail), a running base request keeps stepping meanwhile, pinned
/// adapters are copied at registration, and every result still matches PEFT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapped_copies_hold_requests_until_their_slot_is_ready() {
    let mut cfg = config(3, Some(6));
    cfg.lora_overlap_loading = true;
    let adapters = vec![
        spec("qv_r2", "qv_r2", true),
        spec("mlp_r8_rslora", "mlp_r8_rslora", false),
        spec("all_r16", "all_r16", false),
        spec("attn_r4", "attn_r4", false),
    ];
    let (h, log) = start_slow(cfg, adapters, 3);
    {
        let log = log.lock().unwrap();
        assert_eq!(log.loads.len(), 1, "only the pinned adapter is copied at start");
        assert_eq!(log.loads[0].1, "qv_r2");
        assert!(
            !log.loads[0].2,
            "a pinned adapter is copied at once, not overlapped"
        );
    }
    // A long base request keeps the batch running, so copies overlap its steps.
    let (base_prompt, _, _) = reference_greedy("llama", 0);
    let base = h.submit(greedy(base_prompt, None, 48)).unwrap();
    let mut pending = Vec::new();
    for round in 0..2 {
        for (name, case) in [
            ("mlp_r8_rslora", "llama+mlp_r8_rslora"),
            ("all_r16", "llama+all_r16"),
            ("attn_r4", "llama+attn_r4"),
            ("qv_r2", "llama+qv_r2"),
        ] {
            let p = 1 + round;
            let (prompt, _, _) = reference_greedy("llama", p);
            pending.push((case, p, h.submit(greedy(prompt, Some(name), 12)).unwrap()));
        }
    }
    for (case, p, rx) in pending {
        let out = collect(rx).await;
        assert!(
            matches!(out.reason, FinishReason::Length),
            "{case}: {:?}",
            out.reason
        );
        assert_greedy(case, p, &out.tokens);
    }
    let out = collect(base).await;
    assert!(
        matches!(out.reason, FinishReason::Length),
        "base: {:?}",
        out.reason
    );
    assert_greedy("llama", 0, &out.tokens);
    let log = log.lock().unwrap();
    assert!(log.not_ready > 0, "no admission ever found a copy in flight");
    assert!(
        log.loads.iter().skip(1).all(|l| l.2),
        "request-driven copies are overlapped: {:?}",
        log.loads
    );
    assert!(
        log.loads.iter().skip(1).all(|l| l.1 != "qv_r2"),
        "the pinned adapter is never copied again: {:?}",
        log.loads
    );
}

/// With overlap loading, what the model staged for an adapter is freed when the engine drops the
/// adapter's host copy: on eviction over --max-loaded-loras, and on unload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_copies_are_freed_with_their_host_copies() {
    let mut cfg = config(2, Some(2));
    cfg.lora_overlap_loading = true;
    let (h, log) = start_slow(
        cfg,
        vec![spec("a", "attn_r4", false), spec("b", "qv_r2", false)],
        0,
    );
    let staged = |name: &str| {
        let log = log.lock().unwrap();
        log.staged.iter().find(|s| s.0 == name).map(|s| s.1)
    };
    let unstaged = |id: u64| log.lock().unwrap().unstaged.contains(&id);
    // The engine thread frees them right after it answers the command: wait up to 5 s.
    let eventually = |id: u64| async move {
        for _ in 0..500 {
            if unstaged(id) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    };
    let (a, b) = (staged("a").expect("a staged"), staged("b").expect("b staged"));
    assert!(log.lock().unwrap().unstaged.is_empty());
    // A third adapter over the cap of two host copies evicts the least recently used, `a`.
    h.load_adapter("c".into(), fixture("tiny/adapters/all_r16"), false)
        .await
        .unwrap();
    assert!(eventually(a).await, "a's staged copy outlived its host copy");
    h.unload_adapter("b".into()).await.unwrap();
    assert!(eventually(b).await, "b's staged copy outlived its unload");
    let c = staged("c").expect("c staged");
    assert!(!unstaged(c), "c is still loaded");
    assert_eq!(log.lock().unwrap().unstaged, vec![a, b]);
}

/// A failed slot copy aborts the request that needed it with a message naming the adapter,
/// frees the slot, and the next request copies the adapter afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_slot_copy_aborts_its_request_and_frees_the_slot() {
    let (h, log) = start_slow(config(2, None), vec![spec("a", "attn_r4", false)], 0);
    log.lock().unwrap().fail_next = true;
    let (prompt, _, _) = reference_greedy("llama", 2);
    let out = collect(h.submit(greedy(prompt.clone(), Some("a"), 4)).unwrap()).await;
    match out.reason {
        FinishReason::Abort(m) => assert!(m.contains("\"a\"") && m.contains("simulated copy failure"), "{m}"),
        r => panic!("expected an abort, got {r:?}"),
    }
    let out = collect(h.submit(greedy(prompt, Some("a"), 12)).unwrap()).await;
    assert!(matches!(out.reason, FinishReason::Length), "{:?}", out.reason);
    assert_greedy("llama+attn_r4", 2, &out.tokens);
    assert_eq!(
        log.lock().unwrap().loads.len(),
        2,
        "the second request copied it again"
    );
}

/// How many sequences [`DeviceGreedy`] sampled itself and how many it returned logits for.
#[derive(Default)]
struct SampleLog {
    on_device: usize,
    /// Device-sampled rows that carried penalties.
    penalised: usize,
    /// Device-sampled rows that returned top log-probs.
    with_top: usize,
    logits: usize,
}

/// The CPU model posing as one that samples on its device (as the CUDA model does): greedy
/// choices for the sequences the engine hands it, logits for the others.
struct DeviceGreedy {
    inner: LlamaModel,
    log: Arc<Mutex<SampleLog>>,
}

impl Forward for DeviceGreedy {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn forward(&mut self, kv: &mut KvCache, seqs: &[SeqInput<'_>]) -> ModelResult<Vec<Vec<f32>>> {
        self.inner.forward(kv, seqs)
    }
    fn new_kv_cache(&self, max_tokens: usize, block_size: usize) -> KvCache {
        KvCache::new(self.inner.config(), max_tokens, block_size)
    }
    fn samples_on_device(&self) -> bool {
        true
    }
    fn forward_sampled(
        &mut self,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSample>],
    ) -> ModelResult<Vec<SeqOutput>> {
        let logits = self.inner.forward(kv, seqs)?;
        let mut log = self.log.lock().unwrap();
        logits
            .into_iter()
            .zip(sampling)
            .map(|(l, s)| match s {
                Some(s) if s.temperature <= 0.0 => {
                    log.on_device += 1;
                    // Log-probs are under the unmodified row; the token comes from the
                    // penalised one.
                    let raw = log_softmax(&l);
                    let mut l = l;
                    if let Some(p) = &s.penalties {
                        log.penalised += 1;
                        p.apply(&mut l);
                    }
                    let token_id = argmax(&l);
                    if s.top_logprobs > 0 {
                        log.with_top += 1;
                    }
                    Ok(SeqOutput::Sampled(TokenLogprob {
                        token_id,
                        logprob: raw[token_id as usize],
                        top: top_logprobs(&raw, s.top_logprobs),
                    }))
                }
                Some(_) => Err(Error::Model("this test model samples greedily only".into())),
                None => {
                    // Earlier prefill chunks want no logits; count the rows a sampler needs.
                    if !l.is_empty() {
                        log.logits += 1;
                    }
                    Ok(SeqOutput::Logits(l))
                }
            })
            .collect()
    }
}

/// With a model that samples on its device, plain greedy requests take their tokens from the
/// model (and still match PEFT), a request with a repetition penalty is sampled there too, with
/// penalty lists that give the host sampler's tokens, and a request with top log-probs gets
/// logits and is sampled on the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sampling_model_samples_eligible_requests_and_returns_logits_for_the_rest() {
    let log = Arc::new(Mutex::new(SampleLog::default()));
    let model = DeviceGreedy {
        inner: tiny_model(),
        log: log.clone(),
    };
    let adapters = vec![spec("all_r16", "all_r16", false)];
    let h = engine::start(model, config(2, None), adapters, Arc::new(Metrics::new())).unwrap();
    let (prompt, _, _) = reference_greedy("llama", 3);
    let base = collect(h.submit(greedy(prompt.clone(), None, 12)).unwrap()).await;
    let lora = collect(h.submit(greedy(prompt.clone(), Some("all_r16"), 12)).unwrap()).await;
    assert_greedy("llama", 3, &base.tokens);
    assert_greedy("llama+all_r16", 3, &lora.tokens);
    let sampled = log.lock().unwrap().on_device;
    assert_eq!(
        sampled, 24,
        "every token of the two greedy requests came from the model"
    );
    assert_eq!(log.lock().unwrap().logits, 0);
    let mut penalised = greedy(prompt.clone(), None, 6);
    // Negative penalties and a repetition penalty below 1 favour tokens already seen, so they
    // change this model's greedy answer (which never repeats a token on its own).
    penalised.sampling.repetition_penalty = 0.5;
    penalised.sampling.frequency_penalty = -1.0;
    penalised.sampling.presence_penalty = -1.0;
    let host = engine::start(
        tiny_model(),
        config(2, None),
        Vec::new(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let want = collect(host.submit(penalised.clone()).unwrap()).await;
    let mut top = greedy(prompt, None, 6);
    top.logprobs = LogprobOptions {
        return_logprob: true,
        top_logprobs_num: 3,
        ..Default::default()
    };
    let want_top = collect(host.submit(top.clone()).unwrap()).await;
    assert_ne!(
        want.tokens,
        base.tokens[..6],
        "the penalties change the greedy tokens"
    );
    for (what, req) in [("penalties", penalised), ("top log-probs", top)] {
        let out = collect(h.submit(req).unwrap()).await;
        assert!(
            matches!(out.reason, FinishReason::Length),
            "{what}: {:?}",
            out.reason
        );
        assert_eq!(out.tokens.len(), 6, "{what}");
        if what == "penalties" {
            assert_eq!(
                out.tokens, want.tokens,
                "device penalties pick the host sampler's tokens"
            );
        } else {
            assert_eq!(out.tokens, want_top.tokens);
            assert_eq!(
                out.logprobs, want_top.logprobs,
                "the model's top log-probs are the host sampler's"
            );
            assert!(out.logprobs.iter().all(|(_, top)| top.len() == 3));
        }
    }
    let log = log.lock().unwrap();
    assert_eq!(
        log.on_device, 36,
        "the penalised and the top-log-probs requests were sampled by the model too"
    );
    assert_eq!(log.penalised, 6, "with its penalties on each of its 6 steps");
    assert_eq!(log.with_top, 6, "with 3 alternatives on each of its 6 steps");
    assert_eq!(log.logits, 0, "no logits crossed to the engine");
}

/// What [`Pipelined`] saw.
#[derive(Default)]
struct PipeLog {
    /// Steps launched ahead of reading the step before.
    launches: usize,
    /// Launches whose inputs held pending tokens.
    with_pending: usize,
    /// Most launches uncollected at once.
    most_in_flight: usize,
    /// Steps run through `forward_sampled` (one at a time).
    sync_steps: usize,
}

/// The CPU model posing as one that overlaps steps, as the CUDA model does: a launch resolves
/// the pending tokens of its inputs from the last launch's greedy draws (failing, as the GPU
/// contract says, when that launch was already collected or there is none), computes at once
/// through [`DeviceGreedy`] and queues its results for `collect_sampled`.
struct Pipelined {
    inner: DeviceGreedy,
    log: Arc<Mutex<PipeLog>>,
    queue: std::collections::VecDeque<Vec<SeqOutput>>,
    /// The last launch's draws, while it is uncollected.
    last_draws: Option<Vec<u32>>,
}

impl Pipelined {
    fn new(log: Arc<Mutex<PipeLog>>) -> Self {
        Self {
            inner: DeviceGreedy {
                inner: tiny_model(),
                log: Default::default(),
            },
            log,
            queue: Default::default(),
            last_draws: None,
        }
    }
}

impl Forward for Pipelined {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn forward(&mut self, kv: &mut KvCache, seqs: &[SeqInput<'_>]) -> ModelResult<Vec<Vec<f32>>> {
        self.inner.forward(kv, seqs)
    }
    fn new_kv_cache(&self, max_tokens: usize, block_size: usize) -> KvCache {
        self.inner.new_kv_cache(max_tokens, block_size)
    }
    fn samples_on_device(&self) -> bool {
        true
    }
    fn overlaps_steps(&self) -> bool {
        true
    }
    fn forward_sampled(
        &mut self,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSample>],
    ) -> ModelResult<Vec<SeqOutput>> {
        if !self.queue.is_empty()
            || seqs
                .iter()
                .any(|s| s.tokens.iter().any(|&t| pending_index(t).is_some()))
        {
            return Err(Error::Model("a step ran while another was uncollected".into()));
        }
        self.log.lock().unwrap().sync_steps += 1;
        self.inner.forward_sampled(kv, seqs, sampling)
    }
    fn launch_sampled(
        &mut self,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSample>],
    ) -> ModelResult<()> {
        if self.queue.len() >= 2 {
            return Err(Error::Model("three launches uncollected".into()));
        }
        check_launchable(seqs, sampling)?;
        let mut any_pending = false;
        let resolved: Vec<Vec<u32>> = seqs
            .iter()
            .map(|s| {
                s.tokens
                    .iter()
                    .map(|&t| match pending_index(t) {
                        None => Ok(t),
                        Some(k) => {
                            any_pending = true;
                            self.last_draws
                                .as_ref()
                                .and_then(|d| d.get(k).copied())
                                .ok_or_else(|| {
                                    Error::Model(format!("pending token {k} of no uncollected launch"))
                                })
                        }
                    })
                    .collect::<ModelResult<Vec<u32>>>()
            })
            .collect::<ModelResult<_>>()?;
        let inputs: Vec<SeqInput<'_>> = seqs
            .iter()
            .zip(&resolved)
            .map(|(s, t)| SeqInput {
                tokens: t,
                cache: s.cache,
                adapter: s.adapter,
                logits: s.logits,
            })
            .collect();
        let out = self.inner.forward_sampled(kv, &inputs, sampling)?;
        self.last_draws = Some(
            out.iter()
                .filter_map(|o| match o {
                    SeqOutput::Sampled(t) => Some(t.token_id),
                    SeqOutput::Logits(_) => None,
                })
                .collect(),
        );
        self.queue.push_back(out);
        let mut log = self.log.lock().unwrap();
        log.launches += 1;
        log.with_pending += usize::from(any_pending);
        log.most_in_flight = log.most_in_flight.max(self.queue.len());
        Ok(())
    }
    fn collect_sampled(&mut self) -> ModelResult<Vec<SeqOutput>> {
        let out = self
            .queue
            .pop_front()
            .ok_or_else(|| Error::Model("nothing to collect".into()))?;
        if self.queue.is_empty() {
            self.last_draws = None;
        }
        Ok(out)
    }
}

fn start_pipelined(
    cfg: EngineConfig,
    adapters: Vec<AdapterSpec>,
) -> (EngineHandle, Arc<Metrics>, Arc<Mutex<PipeLog>>) {
    let log = Arc::new(Mutex::new(PipeLog::default()));
    let metrics = Arc::new(Metrics::new());
    let h = engine::start(Pipelined::new(log.clone()), cfg, adapters, metrics.clone()).unwrap();
    (h, metrics, log)
}

/// Runs `reqs` at once on `h` and returns each one's tokens and finish reason.
async fn run_all(h: &EngineHandle, reqs: &[EngineRequest]) -> Vec<(Vec<u32>, FinishReason)> {
    let pending: Vec<_> = reqs.iter().map(|r| h.submit(r.clone()).unwrap()).collect();
    let mut out = Vec::new();
    for rx in pending {
        let o = collect(rx).await;
        out.push((o.tokens, o.reason));
    }
    out
}

/// A mix of greedy requests over two adapters and the base model: lengths from 1 to 16 new
/// tokens, some ending at a stop token the greedy continuation reaches.
fn mixed_requests() -> Vec<EngineRequest> {
    let mut reqs = Vec::new();
    for p in 0..6 {
        for (i, lora) in [None, Some("all_r16"), Some("qv_r2")].into_iter().enumerate() {
            let (prompt, want, _) = reference_greedy("llama", p);
            let mut r = greedy(prompt, lora, [1, 2, 5, 16][(p + i) % 4]);
            if (p + i) % 3 == 0 {
                r.sampling.max_new_tokens = 16;
                r.sampling.stop_token_ids = vec![want[3]];
            }
            reqs.push(r);
        }
    }
    reqs
}

/// With a model that overlaps steps, the engine launches each step before reading the one
/// before it, and every request gets exactly the tokens and finish reason it gets from steps
/// run one at a time: stops and lengths end requests at the same token although a step more
/// was launched for them, and the dropped rows are neither streamed nor counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapped_steps_give_the_tokens_of_steps_run_one_at_a_time() {
    let adapters = || vec![spec("all_r16", "all_r16", false), spec("qv_r2", "qv_r2", false)];
    let reqs = mixed_requests();
    let (sync, _) = start(config(4, None), adapters());
    let want = run_all(&sync, &reqs).await;
    let (h, m, log) = start_pipelined(config(4, None), adapters());
    let got = run_all(&h, &reqs).await;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i}");
    }
    assert!(want.iter().any(|(_, r)| matches!(r, FinishReason::Stop { .. })));
    let streamed: usize = got.iter().map(|(t, _)| t.len()).sum();
    assert_eq!(metric(&m, "loraplane_generated_tokens_total"), streamed as f64);
    {
        let log = log.lock().unwrap();
        assert!(
            log.with_pending > 10,
            "steps fed pending tokens: {}",
            log.with_pending
        );
        assert_eq!(log.most_in_flight, 2);
        assert_eq!(log.sync_steps, 0);
    }
    // Greedy outputs still match PEFT.
    let out = collect(
        h.submit(greedy(reference_greedy("llama", 2).0, Some("all_r16"), 16))
            .unwrap(),
    )
    .await;
    assert_greedy("llama+all_r16", 2, &out.tokens);
}

/// Requests whose sampling needs the host between steps (penalties, top log-probs) run their
/// steps one at a time beside overlapped ones, with the tokens a host-only engine gives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_that_need_the_host_wait_for_the_step_in_flight() {
    let (prompt, _, _) = reference_greedy("llama", 1);
    let mut penalised = greedy(prompt.clone(), None, 8);
    penalised.sampling.repetition_penalty = 0.5;
    penalised.sampling.frequency_penalty = -1.0;
    let mut top = greedy(prompt.clone(), Some("all_r16"), 6);
    top.logprobs = LogprobOptions {
        return_logprob: true,
        top_logprobs_num: 3,
        ..Default::default()
    };
    let mut reqs = mixed_requests();
    reqs.insert(4, penalised);
    reqs.push(top);
    let adapters = || vec![spec("all_r16", "all_r16", false), spec("qv_r2", "qv_r2", false)];
    let (sync, _) = start(config(4, None), adapters());
    let want = run_all(&sync, &reqs).await;
    let (h, _, log) = start_pipelined(config(4, None), adapters());
    let got = run_all(&h, &reqs).await;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i}");
    }
    let log = log.lock().unwrap();
    assert!(
        log.sync_steps > 0 && log.with_pending > 0,
        "{} sync, {} pending",
        log.sync_steps,
        log.with_pending
    );
}

/// A full KV cache preempts sequences that have a step in flight: the step's row is dropped,
/// the request recomputes from the tokens the host knows, and outputs do not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapped_steps_survive_preemption() {
    let small = EngineConfig {
        max_total_tokens: 64,
        context_length: 64,
        prefix_cache: false,
        ..config(2, None)
    };
    let reqs: Vec<EngineRequest> = [(0, None), (1, Some("a")), (2, None), (3, Some("a"))]
        .into_iter()
        .map(|(p, lora)| greedy(reference_greedy("llama", p).0, lora, 24))
        .collect();
    let (sync, _) = start(small.clone(), vec![spec("a", "all_r16", false)]);
    let mut want = Vec::new();
    for r in &reqs {
        want.extend(run_all(&sync, std::slice::from_ref(r)).await);
    }
    let (h, m, log) = start_pipelined(small, vec![spec("a", "all_r16", false)]);
    let got = run_all(&h, &reqs).await;
    assert_eq!(got, want);
    assert!(metric(&m, "loraplane_requests_preempted_total") > 0.0);
    assert!(log.lock().unwrap().with_pending > 0);
}

/// A request cancelled while a step for it is in flight frees its cache and the engine keeps
/// serving. Token ids in the pending range are refused at submission like any id outside the
/// vocabulary, so no request can name another's pending token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_mid_flight_leaves_the_engine_serving() {
    let (h, m, _) = start_pipelined(config(2, None), vec![]);
    cancel_after_tokens_then_serve(&h, &m, 3).await;
    let forged = greedy(vec![1, pending_token(0)], None, 4);
    assert!(
        matches!(h.submit(forged), Err(EngineError::InvalidRequest(m)) if m.contains("outside the vocabulary"))
    );
}
