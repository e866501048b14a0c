//! The engine thread: continuous batching.
//!
//! Each step admits waiting requests (FCFS, packing requests whose adapter is already in a slot
//! ahead of ones that would need a slot the batch cannot free), then runs ONE forward pass over a
//! mix of decode tokens (one per running request) and prefill chunks (up to
//! `--chunked-prefill-size` prompt tokens), ordered by adapter so each adapter is one LoRA segment.
//! Requests join and leave between steps. A request whose stream is dropped is cancelled.
//! When the KV cache runs out, the newest request is preempted and recomputed later.
//!
//! With a model that samples on its device, steps overlap (unless `--disable-overlap-schedule`):
//! step N+1 is launched before the host reads step N's tokens, feeding each sequence the token
//! N samples for it as a [`pending_token`], and the host then reads N, streams its tokens and
//! checks stops while N+1 runs. A sequence that N finishes has one more token computed and
//! dropped. Steps that need the host between them (penalties, top log-probs, prompt log-probs,
//! host sampling) run one at a time.
//!
//! An adapter placed in a slot is copied there by the model before its request joins the batch.
//! With `--enable-lora-overlap-loading` the copy runs on the device's copy stream while the
//! running batch keeps stepping; the request waits in the queue until the copy is done (or
//! waits for it directly when nothing else runs).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::adapter_pool::{Acquire, AdapterPool};
use super::handle::{Command, Published};
use super::request::{EngineError, EngineEvent, EngineRequest, FinishReason, TokenLogprob};
use super::sampling::{
    device_eligible, device_sample, has_penalties, sample, top_logprobs, top_logprobs_wanted, Rng,
};
use super::{AdapterSpec, EngineConfig, EngineHandle, KvCache, SeqCache};
use crate::adapter::LoraAdapter;
use crate::backend::cpu::log_softmax;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::llama::{LogitsWanted, SeqInput};
use crate::model::{pending_token, DeviceSample, Forward, SeqOutput};

/// Steps the head of the queue may be passed over before admission stops for everyone else.
const STARVATION_STEPS: u32 = 32;

struct Sequence {
    /// Matches a step's results to the sequence, which may have left the batch meanwhile.
    id: u64,
    req: EngineRequest,
    events: UnboundedSender<EngineEvent>,
    /// Prompt followed by the generated tokens; the last `pending` are [`pending_token`]s of
    /// steps not read yet.
    tokens: Vec<u32>,
    pending: usize,
    prompt_len: usize,
    adapter: Option<Arc<LoraAdapter>>,
    /// Prefix-cache key: 0 for the base model, else the adapter's load id.
    key: u64,
    cache: SeqCache,
    rng: Rng,
    arrival: Instant,
    last_token: Option<Instant>,
    cached_tokens: usize,
    started: bool,
    /// Prompt log-probs collected across prefill chunks.
    input_logprobs: Vec<Option<TokenLogprob>>,
    skipped: u32,
}

impl Sequence {
    /// The tokens the host knows: prompt and output, without pending ones.
    fn known(&self) -> &[u32] {
        &self.tokens[..self.tokens.len() - self.pending]
    }

    /// Drops pending tokens (the steps that sample them are discarded for this sequence).
    fn forget_pending(&mut self) {
        self.tokens.truncate(self.tokens.len() - self.pending);
        self.pending = 0;
    }

    /// Whether every token it may generate is already generated or pending.
    fn out_of_tokens(&self, context_length: usize) -> bool {
        self.tokens.len() - self.prompt_len >= self.req.sampling.max_new_tokens
            || self.tokens.len() >= context_length
    }

    fn wants_input_logprobs(&self) -> bool {
        !self.started && self.req.logprobs.return_logprob && self.req.logprobs.logprob_start_len.is_some()
    }
}

/// One sequence's share of a step.
#[derive(Clone, Copy)]
struct Entry {
    id: u64,
    from: usize,
    to: usize,
    logits: LogitsWanted,
    /// The step ends the sequence's prompt (or its pending input).
    last: bool,
    /// Where the token the step gives it goes in its `tokens` (a pending token until then).
    token_at: Option<usize>,
}

/// A launched step whose results the host has not read.
struct InFlight {
    entries: Vec<Entry>,
    launched: Instant,
}

/// One planned sequence: its index in `running`, its chunk `from..to`, the logits it wants.
type Planned = (usize, usize, usize, LogitsWanted);

/// An overlapped copy into a slot, not yet known to be done.
struct Loading {
    uid: u64,
    slot: usize,
    since: Instant,
}

struct Scheduler<M> {
    model: M,
    config: EngineConfig,
    kv: KvCache,
    pool: AdapterPool,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    commands: Receiver<Command>,
    published: Arc<RwLock<Published>>,
    metrics: Arc<Metrics>,
    loading: Vec<Loading>,
    in_flight: Option<InFlight>,
    next_id: u64,
    /// When the host last read a step's results (for the step-time metric).
    last_read: Instant,
}

pub(crate) fn spawn<M: Forward + Send + 'static>(
    model: M,
    config: EngineConfig,
    adapters: Vec<AdapterSpec>,
    metrics: Arc<Metrics>,
) -> Result<EngineHandle> {
    let mc = model.config().clone();
    let pool = AdapterPool::new(mc.clone(), &config, metrics.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let published = Arc::new(RwLock::new(Published {
        adapters: Vec::new(),
        waiting: 0,
        running: 0,
    }));
    let handle = EngineHandle {
        commands: tx,
        published: published.clone(),
        model: Arc::new(mc.clone()),
        context_length: config.context_length,
        max_queued: config.max_queued_requests,
        alive: Arc::new(std::sync::atomic::AtomicBool::new(true)),
    };
    let alive = handle.alive.clone();
    let kv = model.new_kv_cache(config.max_total_tokens, config.kv_block_size);
    metrics.kv_capacity_tokens.set(kv.capacity_tokens() as i64);
    let mut s = Scheduler {
        model,
        config,
        kv,
        pool,
        waiting: VecDeque::new(),
        running: Vec::new(),
        commands: rx,
        published,
        metrics,
        loading: Vec::new(),
        in_flight: None,
        next_id: 0,
        last_read: Instant::now(),
    };
    for a in &adapters {
        s.register(&a.name, &a.path, a.pinned, None)
            .map_err(|e| Error::Model(format!("--lora-paths {}: {e}", a.name)))?;
    }
    s.publish_adapters();
    s.publish();
    std::thread::Builder::new()
        .name("loraplane-engine".into())
        .spawn(move || {
            // Cleared however the thread ends, so /health can report a dead engine.
            struct Alive(Arc<std::sync::atomic::AtomicBool>);
            impl Drop for Alive {
                fn drop(&mut self) {
                    self.0.store(false, std::sync::atomic::Ordering::Release);
                }
            }
            let _alive = Alive(alive);
            s.run()
        })
        .map_err(|e| Error::Model(format!("cannot start the engine thread: {e}")))?;
    Ok(handle)
}

impl<M: Forward> Scheduler<M> {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.commands.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.running.is_empty() && self.waiting.is_empty() => {
                        return
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.drop_cancelled();
            self.admit();
            // Unloads and host evictions (in `handle` and `admit`) free the model's copies.
            for id in self.pool.take_dropped() {
                self.model.unstage_adapter(id);
            }
            // A failed (or panicking) step must not take the server down: fail the batch, keep
            // serving the queue.
            let failure = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step())) {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(panic) => Some(
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into()),
                ),
            };
            if let Some(e) = failure {
                tracing::error!(error = %e, "forward step failed; aborting the running batch");
                if self.in_flight.take().is_some() {
                    // Its results are lost with the batch; the model must not keep it queued.
                    let _ = self.model.collect_sampled();
                }
                for mut s in std::mem::take(&mut self.running) {
                    self.finish(&mut s, FinishReason::Abort(format!("engine error: {e}")));
                }
            }
            self.publish();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { req, events } => {
                let rng = Rng::new(req.sampling.seed);
                self.metrics.prompt_tokens.inc_by(req.input_ids.len() as u64);
                self.next_id += 1;
                self.waiting.push_back(Sequence {
                    id: self.next_id,
                    pending: 0,
                    tokens: req.input_ids.clone(),
                    prompt_len: req.input_ids.len(),
                    req,
                    events,
                    adapter: None,
                    key: 0,
                    cache: SeqCache::default(),
                    rng,
                    arrival: Instant::now(),
                    last_token: None,
                    cached_tokens: 0,
                    started: false,
                    input_logprobs: Vec::new(),
                    skipped: 0,
                });
            }
            Command::Load {
                name,
                path,
                pinned,
                adapter,
                seconds,
                reply,
            } => {
                let r = self.register(&name, &path, pinned, Some((*adapter, seconds)));
                if r.is_ok() {
                    tracing::info!(adapter = %name, path = %path.display(), pinned, "adapter loaded");
                }
                // Publish before replying so a request sent right after the reply sees the change.
                self.publish_adapters();
                self.publish();
                let _ = reply.send(r);
            }
            Command::Unload { name, reply } => {
                let r = self.pool.unregister(&name);
                if r.is_ok() {
                    tracing::info!(adapter = %name, "adapter unloaded");
                }
                self.publish_adapters();
                self.publish();
                let _ = reply.send(r);
            }
        }
    }

    /// Registers an adapter, reading it from `path` unless `loaded` brings it (with the seconds
    /// that took); a pinned one is copied into its slot now. Overlap loading starts staging it
    /// in pinned memory now (on a worker thread), so its first request does not pay the
    /// conversion.
    fn register(
        &mut self,
        name: &str,
        path: &std::path::Path,
        pinned: bool,
        loaded: Option<(LoraAdapter, f64)>,
    ) -> Result<(), EngineError> {
        let r = match loaded {
            Some((adapter, seconds)) => self.pool.register_loaded(name, path, pinned, adapter, seconds)?,
            None => self.pool.register(name, path, pinned)?,
        };
        let copied = match r.slot {
            Some(slot) => self.load_into_slot(r.uid, slot, &r.adapter, false),
            None if self.config.lora_overlap_loading => self.model.stage_adapter(&r.adapter),
            None => Ok(()),
        };
        if let Err(e) = copied {
            let _ = self.pool.unregister(name);
            return Err(EngineError::Adapter(format!(
                "copying adapter {name:?} to the device: {e}"
            )));
        }
        Ok(())
    }

    /// Has the model copy `adapter` (load id `uid`) into `slot`, which the pool just gave it.
    /// An overlapped copy still in flight is remembered in `loading`; a failed one frees the slot.
    fn load_into_slot(
        &mut self,
        uid: u64,
        slot: usize,
        adapter: &Arc<LoraAdapter>,
        overlap: bool,
    ) -> Result<()> {
        let t0 = Instant::now();
        let copied = self
            .model
            .load_slot(slot, adapter, overlap)
            .and_then(|()| self.model.slot_ready(slot, false));
        match copied {
            Ok(true) => {
                self.observe_device_load(t0);
                Ok(())
            }
            Ok(false) => {
                self.loading.push(Loading { uid, slot, since: t0 });
                Ok(())
            }
            Err(e) => {
                self.pool.release_slot(slot);
                Err(e)
            }
        }
    }

    fn observe_device_load(&self, since: Instant) {
        self.metrics
            .adapter_load_seconds
            .with_label_values(&["device"])
            .observe(since.elapsed().as_secs_f64());
    }

    /// Whether the adapter with load id `uid` may run: no overlapped copy into its slot is in
    /// flight. With `wait`, waits for one that is. A copy that failed frees the slot.
    fn copy_done(&mut self, uid: u64, wait: bool) -> Result<bool> {
        let Some(i) = self.loading.iter().position(|l| l.uid == uid) else {
            return Ok(true);
        };
        let slot = self.loading[i].slot;
        match self.model.slot_ready(slot, wait) {
            Ok(false) => Ok(false),
            Ok(true) => {
                let l = self.loading.swap_remove(i);
                self.observe_device_load(l.since);
                Ok(true)
            }
            Err(e) => {
                self.loading.swap_remove(i);
                self.pool.release_slot(slot);
                Err(e)
            }
        }
    }

    /// Forgets copies whose adapter left its slot (unloaded while copying) and records the
    /// ones that finished.
    fn poll_loading(&mut self) {
        let pool = &self.pool;
        self.loading.retain(|l| pool.slot_of(l.uid) == Some(l.slot));
        let uids: Vec<u64> = self.loading.iter().map(|l| l.uid).collect();
        for uid in uids {
            if let Err(e) = self.copy_done(uid, false) {
                tracing::error!(error = %e, "overlapped adapter copy failed; its slot was freed");
            }
        }
    }

    /// Whether a request whose adapter the pool just gave `slot` may join the batch: copies
    /// the adapter there if it is `fresh`, and reports an overlapped copy still in flight
    /// (waiting for it when nothing runs to overlap with).
    fn slot_ready_for(
        &mut self,
        uid: u64,
        slot: usize,
        adapter: &Arc<LoraAdapter>,
        fresh: bool,
    ) -> Result<bool> {
        if fresh {
            self.load_into_slot(uid, slot, adapter, self.config.lora_overlap_loading)?;
        }
        self.copy_done(uid, self.running.is_empty())
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].events.is_closed() {
                let mut s = self.running.swap_remove(i);
                self.cancel(&mut s);
            } else {
                i += 1;
            }
        }
        self.waiting.retain(|s| !s.events.is_closed());
    }

    /// FCFS admission with adapter-aware packing.
    fn admit(&mut self) {
        self.poll_loading();
        // Slots the batch uses, and slots with a copy in flight, are not evictable.
        let mut in_batch: HashSet<u64> = self
            .running
            .iter()
            .filter(|s| s.adapter.is_some())
            .map(|s| s.key)
            .chain(self.loading.iter().map(|l| l.uid))
            .collect();
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.config.max_running_requests {
            // Once the head has waited too long, admit nothing past it so slots drain for it.
            if i > 0 && self.waiting[0].skipped > STARVATION_STEPS {
                break;
            }
            let name = self.waiting[i].req.lora.clone();
            let (adapter, key) = match &name {
                None => (None, 0),
                Some(n) => match self.pool.acquire(n, &in_batch) {
                    Ok(Acquire::Ready {
                        adapter,
                        uid,
                        slot,
                        fresh,
                    }) => match self.slot_ready_for(uid, slot, &adapter, fresh) {
                        Ok(true) => (Some(adapter), uid),
                        Ok(false) => {
                            // Its copy is in flight: keep the slot, try again next step.
                            in_batch.insert(uid);
                            self.waiting[i].skipped += 1;
                            i += 1;
                            continue;
                        }
                        Err(e) => {
                            let mut s = self.waiting.remove(i).expect("index in range");
                            let msg = format!("copying LoRA adapter {n:?} to the device failed: {e}");
                            self.finish(&mut s, FinishReason::Abort(msg));
                            continue;
                        }
                    },
                    Ok(Acquire::Wait) => {
                        self.waiting[i].skipped += 1;
                        i += 1;
                        continue;
                    }
                    Err(e) => {
                        // Unloaded (or no longer loadable from disk) while it waited.
                        let mut s = self.waiting.remove(i).expect("index in range");
                        let msg = match e {
                            EngineError::AdapterNotFound(n) => format!("LoRA adapter {n:?} was unloaded"),
                            e => e.to_string(),
                        };
                        self.finish(&mut s, FinishReason::Abort(msg));
                        continue;
                    }
                },
            };
            let s = &mut self.waiting[i];
            s.adapter = adapter;
            s.key = key;
            // Reuse a cached prefix unless prompt log-probs must be computed from position 0.
            let reusable = self.config.prefix_cache && !s.wants_input_logprobs();
            let cached = if reusable {
                self.kv.match_prefix(&mut s.cache, key, &s.tokens)
            } else {
                0
            };
            if self.kv.reserve(&mut s.cache, s.tokens.len()).is_err() {
                self.kv.release(&mut s.cache);
                break;
            }
            s.cached_tokens = s.cached_tokens.max(cached);
            if s.adapter.is_some() {
                in_batch.insert(key);
            }
            let s = self.waiting.remove(i).expect("index in range");
            self.metrics.cached_prompt_tokens.inc_by(cached as u64);
            self.running.push(s);
        }
    }

    /// One forward pass over every running sequence's next chunk: launched while the previous
    /// one is still being computed when both can overlap, else run and read at once.
    fn step(&mut self) -> Result<()> {
        if self.running.is_empty() {
            return self.read_in_flight();
        }
        let overlap = self.config.overlap_schedule && self.model.overlaps_steps();
        let mut plan = self.plan();
        let overlapped = overlap && self.overlappable(&plan);
        if !overlapped && self.in_flight.is_some() {
            // This step needs the host to know every token first.
            self.read_in_flight()?;
            plan = self.plan();
        }
        if plan.is_empty() {
            return self.read_in_flight();
        }
        // Sequences the model samples itself: only their token crosses to the host.
        let on_device = self.model.samples_on_device();
        let sampling: Vec<Option<DeviceSample>> = plan
            .iter()
            .map(|&(idx, _, to, logits)| {
                let s = &mut self.running[idx];
                (on_device && device_eligible(&s.req, logits, to == s.tokens.len())).then(|| {
                    let (prompt, output) = s.tokens.split_at(s.prompt_len);
                    let top = top_logprobs_wanted(&s.req);
                    device_sample(&s.req.sampling, top, prompt, output, s.rng.next_u64())
                })
            })
            .collect();
        let t0 = Instant::now();
        let inputs: Vec<SeqInput<'_>> = plan
            .iter()
            .map(|&(idx, from, to, logits)| {
                let s = &self.running[idx];
                SeqInput {
                    tokens: &s.tokens[from..to],
                    cache: &s.cache,
                    adapter: s.adapter.as_deref(),
                    logits,
                }
            })
            .collect();
        if overlapped {
            self.model.launch_sampled(&mut self.kv, &inputs, &sampling)?;
            drop(inputs);
            let entries = self.advance(&plan, &sampling);
            let previous = self.in_flight.replace(InFlight {
                entries,
                launched: t0,
            });
            if let Some(previous) = previous {
                self.read(previous)?;
            }
        } else {
            let outputs = self.model.forward_sampled(&mut self.kv, &inputs, &sampling)?;
            drop(inputs);
            self.last_read = Instant::now();
            self.metrics.step_seconds.observe(t0.elapsed().as_secs_f64());
            let entries = self.advance(&plan, &sampling);
            self.process(&entries, outputs);
        }
        if self.running.is_empty() {
            // Only dropped rows are left in flight.
            self.read_in_flight()?;
        }
        Ok(())
    }

    /// Reserves cache for every running sequence's pending tokens (preempting the newest when
    /// the cache is full) and picks each one's chunk: its pending tokens, prefill capped by the
    /// token budget; ordered by adapter. A sequence whose every token is already in flight
    /// sits the step out.
    fn plan(&mut self) -> Vec<Planned> {
        let mut i = 0;
        while i < self.running.len() {
            let need = self.running[i].tokens.len();
            if self.kv.reserve(&mut self.running[i].cache, need).is_ok() {
                i += 1;
                continue;
            }
            let mut victim = self.running.pop().expect("non-empty");
            self.kv.release(&mut victim.cache);
            tracing::warn!(
                tokens = victim.tokens.len(),
                "KV cache full: preempting a request for recompute"
            );
            self.metrics.requests_preempted.inc();
            // A step in flight for it is dropped when read; it recomputes from what is known.
            victim.forget_pending();
            victim.adapter = None;
            self.waiting.push_front(victim);
        }
        let mut budget = self.config.chunked_prefill_size;
        let mut plan: Vec<Planned> = Vec::new();
        for (idx, s) in self.running.iter().enumerate() {
            if s.pending > 0 && s.out_of_tokens(self.config.context_length) {
                continue;
            }
            let from = s.cache.len;
            let pending = s.tokens.len() - from;
            let take = if pending <= 1 {
                pending
            } else {
                pending.min(budget.max(1))
            };
            if take == 0 {
                continue;
            }
            if pending > 1 {
                if budget == 0 {
                    continue;
                }
                budget = budget.saturating_sub(take);
            }
            let to = from + take;
            let last = to == s.tokens.len();
            let logits = if s.wants_input_logprobs() {
                LogitsWanted::All
            } else if last {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            plan.push((idx, from, to, logits));
        }
        plan.sort_by_key(|p| self.running[p.0].key);
        plan
    }

    /// Whether `plan` can run before the host reads the step in flight: every sequence is
    /// sampled on the device without penalties or top log-probs, or wants no logits.
    fn overlappable(&self, plan: &[Planned]) -> bool {
        plan.iter().all(|&(idx, _, to, logits)| {
            let s = &self.running[idx];
            logits == LogitsWanted::None
                || (device_eligible(&s.req, logits, to == s.tokens.len())
                    && top_logprobs_wanted(&s.req) == 0
                    && !has_penalties(&s.req.sampling))
        })
    }

    /// Moves each planned sequence past its chunk and gives each that will get a token a
    /// pending one, to be replaced when the step is read.
    fn advance(&mut self, plan: &[Planned], sampling: &[Option<DeviceSample>]) -> Vec<Entry> {
        let mut sampled = 0;
        plan.iter()
            .zip(sampling)
            .map(|(&(idx, from, to, logits), smp)| {
                let s = &mut self.running[idx];
                let last = to == s.tokens.len();
                s.cache.len = to;
                let token_at = (last && s.req.sampling.max_new_tokens > 0).then(|| {
                    s.tokens.push(pending_token(sampled));
                    s.pending += 1;
                    s.tokens.len() - 1
                });
                sampled += usize::from(smp.is_some());
                Entry {
                    id: s.id,
                    from,
                    to,
                    logits,
                    last,
                    token_at,
                }
            })
            .collect()
    }

    /// Reads the step in flight, if any.
    fn read_in_flight(&mut self) -> Result<()> {
        match self.in_flight.take() {
            Some(f) => self.read(f),
            None => Ok(()),
        }
    }

    /// Waits for a launched step's results and hands them to their sequences.
    fn read(&mut self, f: InFlight) -> Result<()> {
        let outputs = self.model.collect_sampled()?;
        let now = Instant::now();
        // Back to back, a step's time is the gap between reads; else since its launch.
        let since = f.launched.max(self.last_read);
        self.metrics.step_seconds.observe((now - since).as_secs_f64());
        self.last_read = now;
        self.process(&f.entries, outputs);
        Ok(())
    }

    /// Hands a step's outputs to the sequences still running: prompt log-probs, the end of a
    /// prompt, the sampled token (streamed), and whether it finished them.
    fn process(&mut self, entries: &[Entry], outputs: Vec<SeqOutput>) {
        let vocab = self.model.config().vocab_size;
        let index: HashMap<u64, usize> = self.running.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
        let mut finished: Vec<(usize, Option<FinishReason>)> = Vec::new();
        for (e, out) in entries.iter().zip(outputs) {
            // Gone meanwhile (finished, cancelled or preempted): its row is dropped.
            let Some(&idx) = index.get(&e.id) else {
                continue;
            };
            let s = &mut self.running[idx];
            if let (LogitsWanted::All, SeqOutput::Logits(l)) = (e.logits, &out) {
                collect_input_logprobs(s, e.from, e.to, l, vocab);
            }
            if !e.last {
                continue;
            }
            if !s.started {
                s.started = true;
                if self.config.prefix_cache {
                    self.kv.publish_prefix(&s.cache, s.key, &s.tokens[..s.prompt_len]);
                }
                let input_logprobs = std::mem::take(&mut s.input_logprobs);
                let _ = s.events.send(EngineEvent::Started {
                    cached_tokens: s.cached_tokens,
                    input_logprobs,
                });
            }
            let Some(at) = e.token_at else {
                // Prefill only: the prompt is scored, nothing is generated.
                finished.push((idx, Some(FinishReason::Length)));
                continue;
            };
            // Steps are read in launch order, and pending tokens are only ever forgotten whole.
            debug_assert_eq!(at, s.tokens.len() - s.pending, "the oldest pending token");
            let tok = match out {
                SeqOutput::Sampled(tok) => tok,
                SeqOutput::Logits(l) => sample(
                    &l[l.len() - vocab..],
                    &s.req.sampling,
                    &s.tokens[..s.prompt_len],
                    &s.tokens[s.prompt_len..at],
                    top_logprobs_wanted(&s.req),
                    &mut s.rng,
                ),
            };
            let id = tok.token_id;
            s.tokens[at] = id;
            s.pending -= 1;
            let now = Instant::now();
            match s.last_token {
                None => self.metrics.ttft_seconds.observe((now - s.arrival).as_secs_f64()),
                Some(prev) => self
                    .metrics
                    .inter_token_seconds
                    .observe((now - prev).as_secs_f64()),
            }
            s.last_token = Some(now);
            self.metrics.generated_tokens.inc();
            if s.events.send(EngineEvent::Token(tok)).is_err() {
                // The client went away mid-step: a cancellation, like drop_cancelled's.
                finished.push((idx, None));
                continue;
            }
            let known = at + 1;
            let eos = !s.req.sampling.ignore_eos && self.model.config().eos_token_ids.contains(&id);
            if eos || s.req.sampling.stop_token_ids.contains(&id) {
                finished.push((idx, Some(FinishReason::Stop { token_id: id })));
            } else if known - s.prompt_len >= s.req.sampling.max_new_tokens
                || known >= self.config.context_length
            {
                finished.push((idx, Some(FinishReason::Length)));
            }
        }
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (idx, reason) in finished {
            let mut s = self.running.swap_remove(idx);
            match reason {
                Some(reason) => self.finish(&mut s, reason),
                None => self.cancel(&mut s),
            }
        }
    }

    fn cancel(&mut self, s: &mut Sequence) {
        self.kv.release(&mut s.cache);
        self.metrics
            .requests_finished
            .with_label_values(&["cancelled"])
            .inc();
    }

    fn finish(&mut self, s: &mut Sequence, reason: FinishReason) {
        if self.config.prefix_cache && s.started {
            self.kv.publish_prefix(&s.cache, s.key, s.known());
        }
        self.kv.release(&mut s.cache);
        let label = match &reason {
            FinishReason::Length => "length",
            FinishReason::Stop { .. } => "stop",
            FinishReason::Abort(_) => "abort",
        };
        self.metrics.requests_finished.with_label_values(&[label]).inc();
        self.metrics
            .e2e_seconds
            .observe(s.arrival.elapsed().as_secs_f64());
        if !s.started {
            let _ = s.events.send(EngineEvent::Started {
                cached_tokens: 0,
                input_logprobs: Vec::new(),
            });
        }
        let _ = s.events.send(EngineEvent::Finished(reason));
    }

    /// The adapter list changes only on load and unload, not per step.
    fn publish_adapters(&self) {
        self.published.write().expect("published lock").adapters = self.pool.list();
    }

    fn publish(&mut self) {
        let names = |seqs: &mut dyn Iterator<Item = &Sequence>| {
            let mut v: Vec<String> = seqs.filter_map(|s| s.req.lora.clone()).collect();
            v.sort();
            v.dedup();
            v
        };
        let running = names(&mut self.running.iter());
        let waiting = names(&mut self.waiting.iter());
        let r: Vec<&str> = running.iter().map(String::as_str).collect();
        let w: Vec<&str> = waiting.iter().map(String::as_str).collect();
        self.metrics
            .set_lora_requests_info(&r, &w, self.config.max_loras_per_batch);
        self.metrics.queue_length.set(self.waiting.len() as i64);
        self.metrics.running_requests.set(self.running.len() as i64);
        let used = self.kv.num_blocks() - self.kv.free_blocks();
        self.metrics
            .kv_usage
            .set(used as f64 / self.kv.num_blocks() as f64);
        let mut p = self.published.write().expect("published lock");
        p.waiting = self.waiting.len();
        p.running = self.running.len();
    }
}

/// Prompt log-probs for the rows `from..to` of a prefill chunk: row `j` scores token `j + 1`.
fn collect_input_logprobs(s: &mut Sequence, from: usize, to: usize, logits: &[f32], vocab: usize) {
    let start = s.req.logprobs.logprob_start_len.unwrap_or(usize::MAX);
    let top_n = s.req.logprobs.top_logprobs_num;
    if from == 0 && start == 0 {
        s.input_logprobs.push(None);
    }
    for (row, pos) in (from..to).enumerate() {
        let next = pos + 1;
        if next >= s.prompt_len || next < start {
            continue;
        }
        let lp = log_softmax(&logits[row * vocab..(row + 1) * vocab]);
        let token_id = s.tokens[next];
        s.input_logprobs.push(Some(TokenLogprob {
            token_id,
            logprob: lp[token_id as usize],
            top: top_logprobs(&lp, top_n),
        }));
    }
}
