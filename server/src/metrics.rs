//! Prometheus metrics, all prefixed `loraplane_`, plus `vllm:lora_requests_info` for the Gateway
//! API Inference Extension's LoRA-affinity routing. Labels are bounded: pool, policy, reason and
//! finish reason take a handful of values; adapter names appear only in `vllm:lora_requests_info`,
//! whose single series is replaced on every update.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Device slots in the adapter pool.
    pub slots_total: IntGauge,
    /// Slots holding an adapter.
    pub slots_used: IntGauge,
    /// Slots holding a pinned adapter.
    pub slots_pinned: IntGauge,
    /// Adapters held in host memory.
    pub host_adapters: IntGauge,
    /// Adapter loads by pool (`host`: from disk, `device`: into a slot) and reason.
    pub adapter_loads: IntCounterVec,
    /// Adapter evictions by pool, policy and reason.
    pub adapter_evictions: IntCounterVec,
    /// Slot lookups that found the adapter already in a slot.
    pub slot_hits: IntCounter,
    /// Slot lookups that had to load the adapter into a slot.
    pub slot_misses: IntCounter,
    /// Seconds to load an adapter, by pool.
    pub adapter_load_seconds: HistogramVec,
    /// Requests waiting for admission.
    pub queue_length: IntGauge,
    /// Requests in the running batch.
    pub running_requests: IntGauge,
    /// Prompt tokens received.
    pub prompt_tokens: IntCounter,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: IntCounter,
    /// Tokens generated.
    pub generated_tokens: IntCounter,
    /// Finished requests by reason (`length`, `stop`, `abort`).
    pub requests_finished: IntCounterVec,
    /// Time to first token.
    pub ttft_seconds: Histogram,
    /// Time between consecutive tokens of a request.
    pub inter_token_seconds: Histogram,
    /// Request latency from arrival to the last token.
    pub e2e_seconds: Histogram,
    /// Forward-pass duration.
    pub step_seconds: Histogram,
    /// KV cache blocks in use / total.
    pub kv_usage: Gauge,
    /// KV cache capacity in tokens (on the GPU, sized from `--mem-fraction-static`).
    pub kv_capacity_tokens: IntGauge,
    /// Running requests sent back to the queue because the KV cache was full; each is
    /// recomputed from its prompt and the tokens it had generated.
    pub requests_preempted: IntCounter,
    /// `vllm:lora_requests_info`: one series whose labels list the running and waiting adapters.
    pub lora_requests_info: GaugeVec,
}

fn buckets(start: f64, factor: f64, n: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, n).expect("valid buckets")
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("valid metric");
                registry
                    .register(Box::new(m.clone()))
                    .expect("unique metric");
                m
            }};
        }
        let latency = buckets(0.001, 2.0, 18);
        Self {
            slots_total: reg!(IntGauge::new(
                "loraplane_lora_slots_total",
                "Adapter slots in the pool"
            )),
            slots_used: reg!(IntGauge::new(
                "loraplane_lora_slots_used",
                "Adapter slots holding an adapter"
            )),
            slots_pinned: reg!(IntGauge::new(
                "loraplane_lora_slots_pinned",
                "Adapter slots holding a pinned adapter"
            )),
            host_adapters: reg!(IntGauge::new(
                "loraplane_lora_host_adapters",
                "Adapters held in host memory"
            )),
            adapter_loads: reg!(IntCounterVec::new(
                Opts::new(
                    "loraplane_lora_adapter_loads_total",
                    "Adapter loads by pool and reason"
                ),
                &["pool", "reason"]
            )),
            adapter_evictions: reg!(IntCounterVec::new(
                Opts::new(
                    "loraplane_lora_adapter_evictions_total",
                    "Adapter evictions by pool, policy and reason"
                ),
                &["pool", "policy", "reason"]
            )),
            slot_hits: reg!(IntCounter::new(
                "loraplane_lora_slot_hits_total",
                "Requests whose adapter was in a slot"
            )),
            slot_misses: reg!(IntCounter::new(
                "loraplane_lora_slot_misses_total",
                "Requests whose adapter had to be loaded into a slot"
            )),
            adapter_load_seconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "loraplane_lora_adapter_load_seconds",
                    "Adapter load time by pool (host: from disk; device: the copy into a slot, until done)"
                )
                .buckets(buckets(0.0001, 2.0, 18)),
                &["pool"]
            )),
            queue_length: reg!(IntGauge::new(
                "loraplane_queue_length",
                "Requests waiting for admission"
            )),
            running_requests: reg!(IntGauge::new(
                "loraplane_running_requests",
                "Requests in the running batch"
            )),
            prompt_tokens: reg!(IntCounter::new(
                "loraplane_prompt_tokens_total",
                "Prompt tokens received"
            )),
            cached_prompt_tokens: reg!(IntCounter::new(
                "loraplane_cached_prompt_tokens_total",
                "Prompt tokens served from the prefix cache"
            )),
            generated_tokens: reg!(IntCounter::new(
                "loraplane_generated_tokens_total",
                "Tokens generated"
            )),
            requests_finished: reg!(IntCounterVec::new(
                Opts::new("loraplane_requests_finished_total", "Finished requests by reason"),
                &["reason"]
            )),
            ttft_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new("loraplane_time_to_first_token_seconds", "Time to first token")
                    .buckets(latency.clone())
            )),
            inter_token_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "loraplane_inter_token_latency_seconds",
                    "Time between tokens of a request"
                )
                .buckets(latency.clone())
            )),
            e2e_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "loraplane_e2e_request_latency_seconds",
                    "Request latency, arrival to last token"
                )
                .buckets(latency.clone())
            )),
            step_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "loraplane_forward_step_seconds",
                    "Forward pass duration (overlapped passes: the time between reads of consecutive passes)"
                )
                .buckets(latency)
            )),
            kv_usage: reg!(Gauge::new(
                "loraplane_kv_cache_usage_ratio",
                "KV cache blocks in use / total"
            )),
            kv_capacity_tokens: reg!(IntGauge::new(
                "loraplane_kv_cache_capacity_tokens",
                "KV cache capacity in tokens"
            )),
            requests_preempted: reg!(IntCounter::new(
                "loraplane_requests_preempted_total",
                "Running requests preempted for recompute because the KV cache was full"
            )),
            lora_requests_info: reg!(GaugeVec::new(
                Opts::new(
                    "vllm:lora_requests_info",
                    "Running and waiting LoRA adapters (value: update time, seconds since the epoch)"
                ),
                &["running_lora_adapters", "waiting_lora_adapters", "max_lora"]
            )),
            registry,
        }
    }

    /// Replaces the single `vllm:lora_requests_info` series.
    pub fn set_lora_requests_info(&self, running: &[&str], waiting: &[&str], max_lora: usize) {
        self.lora_requests_info.reset();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.lora_requests_info
            .with_label_values(&[&running.join(","), &waiting.join(","), &max_lora.to_string()])
            .set(now);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("metrics are UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_metrics_and_one_lora_info_series() {
        let m = Metrics::new();
        m.adapter_loads.with_label_values(&["host", "request"]).inc();
        m.set_lora_requests_info(&["a"], &[], 4);
        m.set_lora_requests_info(&["a", "b"], &["c"], 4);
        let text = m.render();
        assert!(text.contains("loraplane_lora_adapter_loads_total{pool=\"host\",reason=\"request\"} 1"));
        assert_eq!(text.matches("vllm:lora_requests_info{").count(), 1, "{text}");
        assert!(text.contains("running_lora_adapters=\"a,b\""));
    }
}
