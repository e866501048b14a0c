//! The operator's Prometheus metrics, all prefixed `loraplane_operator_`: reconciles, reconcile
//! errors by reason, reconcile duration, and the number of adapters it manages.

use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::{Error, Result};

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    /// `loraplane_operator_reconciles_total`.
    pub reconciles: IntCounter,
    /// `loraplane_operator_reconcile_errors_total{reason}`.
    pub reconcile_errors: IntCounterVec,
    /// `loraplane_operator_reconcile_duration_seconds`.
    pub reconcile_duration: Histogram,
    /// `loraplane_operator_managed_adapters`.
    pub managed_adapters: IntGauge,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self> {
        let reconciles = IntCounter::new(
            "loraplane_operator_reconciles_total",
            "LoraAdapter reconciles started",
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "loraplane_operator_reconcile_errors_total",
                "LoraAdapter reconciles that failed, by reason",
            ),
            &["reason"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "loraplane_operator_reconcile_duration_seconds",
                "Time to reconcile one LoraAdapter",
            )
            .buckets(prometheus::exponential_buckets(0.005, 2.0, 14)?),
        )?;
        let managed_adapters = IntGauge::new(
            "loraplane_operator_managed_adapters",
            "LoraAdapters the operator holds a finalizer on and keeps loaded",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(managed_adapters.clone()))?;
        Ok(Self {
            reconciles,
            reconcile_errors,
            reconcile_duration,
            managed_adapters,
        })
    }

    /// Counts a reconcile and times it until the guard drops.
    pub fn measure(&self) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.reconcile_duration.clone(),
        }
    }

    /// Counts a failed reconcile under the error's reason.
    pub fn failed(&self, error: &Error) {
        self.reconcile_errors.with_label_values(&[error.reason()]).inc();
    }
}

/// Observes the reconcile's duration when dropped.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_published_ones() {
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        drop(m.measure());
        m.failed(&Error::Config("x".into()));
        m.managed_adapters.set(2);
        let mut names: Vec<String> = registry.gather().iter().map(|f| f.name().to_string()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "loraplane_operator_managed_adapters",
                "loraplane_operator_reconcile_duration_seconds",
                "loraplane_operator_reconcile_errors_total",
                "loraplane_operator_reconciles_total",
            ]
        );
        assert_eq!(m.reconcile_errors.with_label_values(&["config"]).get(), 1);
        assert_eq!(m.reconcile_duration.get_sample_count(), 1);
    }
}
