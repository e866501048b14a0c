//! The adapter lifecycle: a registry of named adapters, a host cache of loaded weights capped by
//! `--max-loaded-loras`, and a bounded slot pool of `--max-loras-per-batch` slots that a forward
//! pass draws its adapters from (S-LoRA/SGLang's memory pool).
//!
//! - Every load gets a unique id, so a reload under the same name is a different adapter to the
//!   prefix cache and the slots.
//! - An adapter evicted from host memory is reloaded from disk on its next request.
//! - A slot's victim is unpinned and not used by the running batch, chosen LRU or FIFO.
//! - Pinned adapters hold a slot from load to unload; at most `slots - 1` may be pinned, so the
//!   pool can always serve one more adapter.
//!
//! The pool decides which slot an adapter occupies; the scheduler then has the model copy it
//! there (`Forward::load_slot`), so a device pool holds exactly what this pool says, pinned
//! adapters included. On the CPU backend a slot is a reference to the host copy; the bound, the
//! choice of victims and the metrics are the same.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::request::{AdapterInfo, EngineError};
use super::{EngineConfig, EvictionPolicy};
use crate::adapter::LoraAdapter;
use crate::metrics::Metrics;
use crate::model::ModelConfig;

struct Registered {
    path: PathBuf,
    pinned: bool,
    uid: u64,
}

struct HostEntry {
    adapter: Arc<LoraAdapter>,
    loaded_at: u64,
    used_at: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    uid: u64,
    pinned: bool,
    loaded_at: u64,
    used_at: u64,
}

/// Outcome of asking for an adapter's slot.
pub enum Acquire {
    /// In a slot; run with these weights.
    Ready {
        /// The weights.
        adapter: Arc<LoraAdapter>,
        /// Its load id.
        uid: u64,
        /// Its slot.
        slot: usize,
        /// Just placed there: the model must copy it into the slot before a pass uses it.
        fresh: bool,
    },
    /// Every slot is pinned or used by the running batch: wait.
    Wait,
}

/// A newly registered adapter: its load id, weights, and slot when it was pinned into one (the
/// model must copy it there).
pub struct Registration {
    /// Its load id.
    pub uid: u64,
    /// The weights.
    pub adapter: Arc<LoraAdapter>,
    /// The slot a pinned adapter took.
    pub slot: Option<usize>,
}

/// Registry, host cache and slot pool.
pub struct AdapterPool {
    registry: BTreeMap<String, Registered>,
    host: HashMap<u64, HostEntry>,
    slots: Vec<Option<Slot>>,
    max_host: Option<usize>,
    max_rank: Option<usize>,
    allowed_targets: Option<Vec<crate::adapter::LoraTarget>>,
    policy: EvictionPolicy,
    model: ModelConfig,
    next_uid: u64,
    tick: u64,
    metrics: Arc<Metrics>,
    /// Ids ([`LoraAdapter::id`]) of adapters whose host copy left (unloaded, or evicted over
    /// the cap) since [`AdapterPool::take_dropped`] last ran.
    dropped: Vec<u64>,
}

impl AdapterPool {
    /// An empty pool sized from `config`.
    pub fn new(model: ModelConfig, config: &EngineConfig, metrics: Arc<Metrics>) -> Self {
        metrics.slots_total.set(config.max_loras_per_batch as i64);
        Self {
            registry: BTreeMap::new(),
            host: HashMap::new(),
            slots: vec![None; config.max_loras_per_batch],
            max_host: config.max_loaded_loras,
            max_rank: config.max_lora_rank,
            allowed_targets: config.lora_target_modules.clone(),
            policy: config.eviction_policy,
            model,
            next_uid: 1,
            tick: 0,
            metrics,
            dropped: Vec::new(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Registered adapters, sorted by name.
    pub fn list(&self) -> Vec<AdapterInfo> {
        self.registry
            .iter()
            .map(|(name, r)| AdapterInfo {
                name: name.clone(),
                path: r.path.clone(),
                pinned: r.pinned,
            })
            .collect()
    }

    /// Loads `path` as `name`. On any failure nothing changes. A pinned adapter is placed in a
    /// slot at once, for the model to copy there.
    pub fn register(&mut self, name: &str, path: &Path, pinned: bool) -> Result<Registration, EngineError> {
        self.check_new(name, pinned)?;
        let adapter = self.load_from_disk(name, path, "register")?;
        self.insert_registered(name, path, pinned, adapter)
    }

    /// [`AdapterPool::register`] for an adapter its caller already read from `path`, taking
    /// `seconds` (the HTTP handler reads it off the engine thread, which keeps stepping).
    pub fn register_loaded(
        &mut self,
        name: &str,
        path: &Path,
        pinned: bool,
        adapter: LoraAdapter,
        seconds: f64,
    ) -> Result<Registration, EngineError> {
        self.check_new(name, pinned)?;
        self.check_limits(&adapter, path)?;
        self.record_host_load("register", seconds);
        self.insert_registered(name, path, pinned, adapter)
    }

    /// A name that can be registered now, pinned or not.
    fn check_new(&self, name: &str, pinned: bool) -> Result<(), EngineError> {
        if name.is_empty() {
            return Err(EngineError::Adapter("lora_name must not be empty".into()));
        }
        if self.registry.contains_key(name) {
            return Err(EngineError::Adapter(format!(
                "LoRA adapter {name:?} is already loaded; unload it first to replace it"
            )));
        }
        let pinned_now = self.slots.iter().flatten().filter(|s| s.pinned).count();
        if pinned && pinned_now + 1 > self.slots.len().saturating_sub(1) {
            return Err(EngineError::Adapter(format!(
                "cannot pin {name:?}: at most max_loras_per_batch - 1 = {} adapters may be pinned",
                self.slots.len().saturating_sub(1)
            )));
        }
        Ok(())
    }

    fn insert_registered(
        &mut self,
        name: &str,
        path: &Path,
        pinned: bool,
        adapter: LoraAdapter,
    ) -> Result<Registration, EngineError> {
        let uid = self.next_uid;
        self.next_uid += 1;
        let t = self.tick();
        self.insert_host(uid, adapter, t);
        self.registry.insert(
            name.to_string(),
            Registered {
                path: path.to_path_buf(),
                pinned,
                uid,
            },
        );
        let mut slot = None;
        if pinned {
            // Pinning takes a slot now; only unpinned slots outside any batch can be evicted.
            slot = self.place_in_slot(uid, true, &HashSet::new());
            if slot.is_none() {
                self.registry.remove(name);
                self.host.remove(&uid);
                return Err(EngineError::Adapter(format!(
                    "cannot pin {name:?}: no slot can be freed"
                )));
            }
        }
        let adapter = self.host[&uid].adapter.clone();
        self.evict_host_over_cap();
        self.publish_gauges();
        Ok(Registration { uid, adapter, slot })
    }

    fn load_from_disk(&self, name: &str, path: &Path, reason: &str) -> Result<LoraAdapter, EngineError> {
        let t0 = Instant::now();
        let adapter =
            LoraAdapter::load(name, path, &self.model).map_err(|e| EngineError::Adapter(e.to_string()))?;
        self.check_limits(&adapter, path)?;
        self.record_host_load(reason, t0.elapsed().as_secs_f64());
        Ok(adapter)
    }

    /// `--max-lora-rank` and `--lora-target-modules`.
    fn check_limits(&self, adapter: &LoraAdapter, path: &Path) -> Result<(), EngineError> {
        if let Some(max) = self.max_rank {
            if adapter.rank > max {
                return Err(EngineError::Adapter(format!(
                    "adapter {}: rank {} exceeds --max-lora-rank {max}",
                    path.display(),
                    adapter.rank
                )));
            }
        }
        if let Some(allowed) = &self.allowed_targets {
            if let Some(t) = adapter.targets.iter().find(|t| !allowed.contains(t)) {
                return Err(EngineError::Adapter(format!(
                    "adapter {}: target {} is not in --lora-target-modules",
                    path.display(),
                    t.name()
                )));
            }
        }
        Ok(())
    }

    fn record_host_load(&self, reason: &str, seconds: f64) {
        self.metrics
            .adapter_loads
            .with_label_values(&["host", reason])
            .inc();
        self.metrics
            .adapter_load_seconds
            .with_label_values(&["host"])
            .observe(seconds);
    }

    fn insert_host(&mut self, uid: u64, adapter: LoraAdapter, t: u64) {
        let entry = HostEntry {
            adapter: Arc::new(adapter),
            loaded_at: t,
            used_at: t,
        };
        self.host.insert(uid, entry);
    }

    /// Forgets `name`. Requests already running keep their reference to its weights.
    pub fn unregister(&mut self, name: &str) -> Result<(), EngineError> {
        let r = self
            .registry
            .remove(name)
            .ok_or_else(|| EngineError::Adapter(format!("LoRA adapter {name:?} is not loaded")))?;
        if let Some(h) = self.host.remove(&r.uid) {
            self.dropped.push(h.adapter.id);
        }
        for slot in self.slots.iter_mut() {
            if slot.is_some_and(|s| s.uid == r.uid) {
                *slot = None;
                self.metrics
                    .adapter_evictions
                    .with_label_values(&["device", self.policy.as_str(), "unload"])
                    .inc();
            }
        }
        self.publish_gauges();
        Ok(())
    }

    /// Ids ([`LoraAdapter::id`]) of the adapters whose host copy left since the last call, so
    /// that the model can free what it keeps for them (pinned images for overlapped loads).
    pub fn take_dropped(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.dropped)
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.registry.contains_key(name)
    }

    /// The unique load id of `name`.
    pub fn uid(&self, name: &str) -> Option<u64> {
        self.registry.get(name).map(|r| r.uid)
    }

    /// Puts `name` in a slot for a batch that already uses the adapters in `in_batch` (by uid),
    /// reloading it from disk if the host cache evicted it.
    pub fn acquire(&mut self, name: &str, in_batch: &HashSet<u64>) -> Result<Acquire, EngineError> {
        let (uid, path) = match self.registry.get(name) {
            Some(r) => (r.uid, r.path.clone()),
            None => return Err(EngineError::AdapterNotFound(name.to_string())),
        };
        let t = self.tick();
        if let Some(idx) = self.slot_of(uid) {
            let slot = self.slots[idx].as_mut().expect("slot_of found it");
            slot.used_at = t;
            if let Some(h) = self.host.get_mut(&uid) {
                h.used_at = t;
            }
            self.metrics.slot_hits.inc();
            let adapter = self.host[&uid].adapter.clone();
            return Ok(Acquire::Ready {
                adapter,
                uid,
                slot: idx,
                fresh: false,
            });
        }
        if !self.slots.iter().any(|s| s.is_none()) && self.victim(in_batch).is_none() {
            return Ok(Acquire::Wait);
        }
        if !self.host.contains_key(&uid) {
            let adapter = self.load_from_disk(name, &path, "reload")?;
            self.insert_host(uid, adapter, t);
        }
        self.host.get_mut(&uid).expect("just ensured").used_at = t;
        self.metrics.slot_misses.inc();
        let slot = self
            .place_in_slot(uid, false, in_batch)
            .expect("a slot was free or evictable");
        self.evict_host_over_cap();
        self.publish_gauges();
        Ok(Acquire::Ready {
            adapter: self.host[&uid].adapter.clone(),
            uid,
            slot,
            fresh: true,
        })
    }

    /// The slot holding the adapter with load id `uid`.
    pub fn slot_of(&self, uid: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.is_some_and(|s| s.uid == uid))
    }

    /// Empties `slot` after the model failed to copy its adapter there, so the pool never
    /// claims a slot whose device copy is missing.
    pub fn release_slot(&mut self, slot: usize) {
        if self.slots[slot].take().is_some() {
            self.metrics
                .adapter_evictions
                .with_label_values(&["device", self.policy.as_str(), "load_failed"])
                .inc();
        }
        self.publish_gauges();
    }

    /// The slot to evict: unpinned, not in the batch, oldest by the policy.
    fn victim(&self, in_batch: &HashSet<u64>) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s)))
            .filter(|(_, s)| !s.pinned && !in_batch.contains(&s.uid))
            .min_by_key(|(_, s)| match self.policy {
                EvictionPolicy::Lru => s.used_at,
                EvictionPolicy::Fifo => s.loaded_at,
            })
            .map(|(i, _)| i)
    }

    fn place_in_slot(&mut self, uid: u64, pinned: bool, in_batch: &HashSet<u64>) -> Option<usize> {
        let idx = match self.slots.iter().position(|s| s.is_none()) {
            Some(i) => i,
            None => match self.victim(in_batch) {
                Some(i) => {
                    self.metrics
                        .adapter_evictions
                        .with_label_values(&["device", self.policy.as_str(), "capacity"])
                        .inc();
                    i
                }
                None => return None,
            },
        };
        let t = self.tick();
        self.slots[idx] = Some(Slot {
            uid,
            pinned,
            loaded_at: t,
            used_at: t,
        });
        // The copy's latency is observed by the scheduler, which has the model do it.
        self.metrics
            .adapter_loads
            .with_label_values(&["device", if pinned { "pin" } else { "request" }])
            .inc();
        Some(idx)
    }

    /// Drops host copies over the cap: never pinned ones or ones in a slot.
    fn evict_host_over_cap(&mut self) {
        let Some(max) = self.max_host else { return };
        while self.host.len() > max {
            let in_slots: HashSet<u64> = self.slots.iter().flatten().map(|s| s.uid).collect();
            let victim = self
                .host
                .iter()
                .filter(|(uid, _)| !in_slots.contains(uid))
                .min_by_key(|(_, h)| match self.policy {
                    EvictionPolicy::Lru => h.used_at,
                    EvictionPolicy::Fifo => h.loaded_at,
                })
                .map(|(uid, _)| *uid);
            let Some(uid) = victim else { break };
            if let Some(h) = self.host.remove(&uid) {
                self.dropped.push(h.adapter.id);
            }
            self.metrics
                .adapter_evictions
                .with_label_values(&["host", self.policy.as_str(), "capacity"])
                .inc();
        }
    }

    fn publish_gauges(&self) {
        let used = self.slots.iter().flatten().count();
        let pinned = self.slots.iter().flatten().filter(|s| s.pinned).count();
        self.metrics.slots_used.set(used as i64);
        self.metrics.slots_pinned.set(pinned as i64);
        self.metrics.host_adapters.set(self.host.len() as i64);
    }

    /// Names of adapters currently in slots (for tests and diagnostics).
    pub fn in_slots(&self) -> Vec<String> {
        let uids: HashSet<u64> = self.slots.iter().flatten().map(|s| s.uid).collect();
        self.registry
            .iter()
            .filter(|(_, r)| uids.contains(&r.uid))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether `name` has a host copy (for tests and diagnostics).
    pub fn in_host(&self, name: &str) -> bool {
        self.registry
            .get(name)
            .is_some_and(|r| self.host.contains_key(&r.uid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny")
            .join(rel)
    }

    fn pool(slots: usize) -> AdapterPool {
        let model = ModelConfig::from_hf_file(&fixture("llama/config.json")).unwrap();
        let config = EngineConfig {
            max_loras_per_batch: slots,
            max_loaded_loras: None,
            max_lora_rank: None,
            lora_target_modules: None,
            eviction_policy: EvictionPolicy::Lru,
            lora_overlap_loading: false,
            max_running_requests: 8,
            max_queued_requests: 8,
            max_total_tokens: 64,
            chunked_prefill_size: 16,
            context_length: 64,
            prefix_cache: false,
            kv_block_size: 4,
            overlap_schedule: true,
        };
        AdapterPool::new(model, &config, Arc::new(Metrics::new()))
    }

    fn ready(a: Acquire) -> (usize, bool) {
        match a {
            Acquire::Ready { slot, fresh, .. } => (slot, fresh),
            Acquire::Wait => panic!("expected a slot"),
        }
    }

    /// The slot the pool reports is the one the model must copy into: fresh once, then a hit in
    /// the same slot; an eviction hands the victim's slot to the newcomer.
    #[test]
    fn acquire_names_the_slot_to_copy_into() {
        let mut p = pool(2);
        for (name, dir) in [("a", "qv_r2"), ("b", "attn_r4"), ("c", "all_r16")] {
            let r = p
                .register(name, &fixture(&format!("adapters/{dir}")), false)
                .unwrap();
            assert_eq!((r.slot, Some(r.uid)), (None, p.uid(name)));
        }
        let none = HashSet::new();
        let (sa, fresh) = ready(p.acquire("a", &none).unwrap());
        assert!(fresh);
        assert_eq!(ready(p.acquire("a", &none).unwrap()), (sa, false));
        let (sb, fresh) = ready(p.acquire("b", &none).unwrap());
        assert!(fresh && sb != sa);
        // `a` is in the batch, so `c` takes `b`'s slot.
        let batch: HashSet<u64> = [p.uid("a").unwrap()].into();
        assert_eq!(ready(p.acquire("c", &batch).unwrap()), (sb, true));
        assert_eq!(p.slot_of(p.uid("c").unwrap()), Some(sb));
        assert_eq!(p.slot_of(p.uid("b").unwrap()), None);
        // Both slots in the batch: wait.
        let batch: HashSet<u64> = [p.uid("a").unwrap(), p.uid("c").unwrap()].into();
        assert!(matches!(p.acquire("b", &batch).unwrap(), Acquire::Wait));
        // A failed copy frees the slot, and the next acquire copies afresh.
        p.release_slot(sb);
        assert_eq!(p.slot_of(p.uid("c").unwrap()), None);
        assert_eq!(ready(p.acquire("c", &none).unwrap()), (sb, true));
    }

    /// A pinned adapter gets its slot at registration, for the model to copy into at once.
    #[test]
    fn pinned_registration_returns_its_slot() {
        let mut p = pool(2);
        let r = p.register("pinned", &fixture("adapters/qv_r2"), true).unwrap();
        let slot = r.slot.expect("pinned adapters take a slot");
        assert_eq!(p.slot_of(r.uid), Some(slot));
        assert_eq!(r.adapter.rank, 2);
    }

    /// The ids of adapters whose host copy leaves, by eviction over the cap or by unload, are
    /// handed out once, for the model to free their staged images.
    #[test]
    fn host_copies_that_leave_are_reported_once() {
        let mut p = pool(1);
        p.max_host = Some(1);
        let a = p.register("a", &fixture("adapters/qv_r2"), false).unwrap();
        assert!(p.take_dropped().is_empty());
        // Over the cap of one: `a`'s host copy (in no slot) leaves.
        let b = p.register("b", &fixture("adapters/attn_r4"), false).unwrap();
        assert_eq!(p.take_dropped(), vec![a.adapter.id]);
        assert!(p.take_dropped().is_empty());
        p.unregister("b").unwrap();
        assert_eq!(p.take_dropped(), vec![b.adapter.id]);
        // `a` has no host copy left to free.
        p.unregister("a").unwrap();
        assert!(p.take_dropped().is_empty());
    }
}
