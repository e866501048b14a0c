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
//! On the CPU backend a slot holds a reference to the host copy; the bound, the choice of victims
//! and the metrics are the same as for a device pool.

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
    Ready(Arc<LoraAdapter>),
    /// Every slot is pinned or used by the running batch: wait.
    Wait,
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

    /// Loads `path` as `name`. On any failure nothing changes.
    pub fn register(&mut self, name: &str, path: &Path, pinned: bool) -> Result<(), EngineError> {
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
        let adapter = self.load_from_disk(name, path, "register")?;
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
        if pinned {
            // Pinning takes a slot now; only unpinned slots outside any batch can be evicted.
            if !self.place_in_slot(uid, true, &HashSet::new()) {
                self.registry.remove(name);
                self.host.remove(&uid);
                return Err(EngineError::Adapter(format!(
                    "cannot pin {name:?}: no slot can be freed"
                )));
            }
        }
        self.evict_host_over_cap();
        self.publish_gauges();
        Ok(())
    }

    fn load_from_disk(&self, name: &str, path: &Path, reason: &str) -> Result<LoraAdapter, EngineError> {
        let t0 = Instant::now();
        let adapter =
            LoraAdapter::load(name, path, &self.model).map_err(|e| EngineError::Adapter(e.to_string()))?;
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
        self.metrics
            .adapter_loads
            .with_label_values(&["host", reason])
            .inc();
        self.metrics
            .adapter_load_seconds
            .with_label_values(&["host"])
            .observe(t0.elapsed().as_secs_f64());
        Ok(adapter)
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
        self.host.remove(&r.uid);
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
        if let Some(slot) = self.slots.iter_mut().flatten().find(|s| s.uid == uid) {
            slot.used_at = t;
            if let Some(h) = self.host.get_mut(&uid) {
                h.used_at = t;
            }
            self.metrics.slot_hits.inc();
            let adapter = self.host[&uid].adapter.clone();
            return Ok(Acquire::Ready(adapter));
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
        let placed = self.place_in_slot(uid, false, in_batch);
        debug_assert!(placed, "a slot was free or evictable");
        self.evict_host_over_cap();
        self.publish_gauges();
        Ok(Acquire::Ready(self.host[&uid].adapter.clone()))
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

    fn place_in_slot(&mut self, uid: u64, pinned: bool, in_batch: &HashSet<u64>) -> bool {
        let t0 = Instant::now();
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
                None => return false,
            },
        };
        let t = self.tick();
        self.slots[idx] = Some(Slot {
            uid,
            pinned,
            loaded_at: t,
            used_at: t,
        });
        self.metrics
            .adapter_loads
            .with_label_values(&["device", if pinned { "pin" } else { "request" }])
            .inc();
        self.metrics
            .adapter_load_seconds
            .with_label_values(&["device"])
            .observe(t0.elapsed().as_secs_f64());
        true
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
            self.host.remove(&uid);
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
