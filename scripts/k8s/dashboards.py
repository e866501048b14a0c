#!/usr/bin/env python3
"""Generates the chart's Grafana dashboards (charts/loraplane/dashboards/*.json).

The dashboards are written from this file so that panels, grid positions and the template
variables stay uniform; edit the panel lists below, then run

    scripts/k8s/dashboards.py            # rewrite the JSON files
    scripts/k8s/dashboards.py --check    # fail if the JSON files differ from what this writes

Every query uses only metrics that loraplane-server (server/src/metrics.rs) or the operator
exports; scripts/k8s/check_chart.py verifies the names and label names against the code.
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "charts" / "loraplane" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
# Selector on the labels Prometheus adds to every scraped series (kubernetes_sd / ServiceMonitor).
SEL = 'namespace=~"$namespace", pod=~"$pod"'
RATE = "$__rate_interval"


def q(expr, legend="", ref=None):
    return {"expr": expr, "legendFormat": legend, "refId": ref}


def quantiles(metric, by="", legend_prefix=""):
    """p50 and p99 of a histogram, optionally split by extra labels."""
    group = f"le{', ' + by if by else ''}"
    out = []
    for p in ("0.5", "0.99"):
        name = f"p{int(float(p) * 100)}"
        legend = f"{legend_prefix}{name}" + (" " + " ".join("{{%s}}" % b.strip() for b in by.split(",")) if by else "")
        out.append(q(f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))", legend.strip()))
    return out


class Layout:
    """Places panels left to right on Grafana's 24-column grid, rows of a given height."""

    def __init__(self):
        self.panels, self.x, self.y, self.h, self.next_id = [], 0, 0, 0, 1

    def row(self, title):
        if self.x:
            self.y += self.h
        self.x, self.h = 0, 0
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _id(self):
        self.next_id += 1
        return self.next_id - 1

    def add(self, kind, title, desc, targets, w=8, h=8, unit="short", **extra):
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.h
            self.h = 0
        for i, t in enumerate(targets):
            t["refId"] = t["refId"] or chr(ord("A") + i)
            t["datasource"] = DS
        panel = {
            "type": kind, "title": title, "description": desc, "id": self._id(), "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, **extra.pop("defaults", {})}, "overrides": []},
            "options": extra.pop("options", {}),
        }
        if kind == "timeseries":
            panel["fieldConfig"]["defaults"].setdefault("custom", {"lineWidth": 1, "fillOpacity": 10})
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                "tooltip": {"mode": "multi", "sort": "desc"}, **panel["options"]}
        panel.update(extra)
        self.panels.append(panel)
        self.x += w
        self.h = max(self.h, h)


def variables(anchor_metric):
    def query_var(name, label, expr):
        return {
            "name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": expr, "refId": f"{name}-var"}, "definition": expr,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1,
        }

    return {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "refresh": 1, "current": {}, "hide": 0},
        query_var("namespace", "Namespace", f"label_values({anchor_metric}, namespace)"),
        query_var("pod", "Pod", f'label_values({anchor_metric}{{namespace=~"$namespace"}}, pod)'),
    ]}


def dashboard(uid, title, desc, anchor_metric, layout):
    return {
        "uid": uid, "title": title, "description": desc, "tags": ["loraplane"],
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "timezone": "",
        "templating": variables(anchor_metric), "annotations": {"list": []}, "links": [],
        "panels": layout.panels,
    }


def server_dashboard():
    L = Layout()
    L.row("Adapter slot pool")
    L.add("timeseries", "Device slots", "Adapter slots in the pool (--max-loras-per-batch), those holding an "
          "adapter, and those holding a pinned one, per pod.", [
              q(f"loraplane_lora_slots_total{{{SEL}}}", "total {{pod}}"),
              q(f"loraplane_lora_slots_used{{{SEL}}}", "used {{pod}}"),
              q(f"loraplane_lora_slots_pinned{{{SEL}}}", "pinned {{pod}}"),
          ], w=10)
    L.add("gauge", "Slot occupancy", "Used / total adapter slots over the selected pods.", [
        q(f"sum(loraplane_lora_slots_used{{{SEL}}}) / sum(loraplane_lora_slots_total{{{SEL}}})"),
    ], w=4, unit="percentunit", defaults={"min": 0, "max": 1})
    L.add("stat", "Pinned slots", "Slots held by pinned adapters (never evicted; at most slots - 1).", [
        q(f"sum(loraplane_lora_slots_pinned{{{SEL}}})"),
    ], w=3)
    L.add("stat", "Host adapters", "Adapters held in host memory (capped by --max-loaded-loras).", [
        q(f"sum(loraplane_lora_host_adapters{{{SEL}}})"),
    ], w=3)
    L.add("stat", "Slot hit ratio", "Requests whose adapter was already in a device slot.", [
        q(f"sum(rate(loraplane_lora_slot_hits_total{{{SEL}}}[{RATE}])) / "
          f"(sum(rate(loraplane_lora_slot_hits_total{{{SEL}}}[{RATE}])) + "
          f"sum(rate(loraplane_lora_slot_misses_total{{{SEL}}}[{RATE}])))"),
    ], w=4, unit="percentunit", defaults={"min": 0, "max": 1, "decimals": 1})
    L.row("Adapter loads and evictions")
    L.add("timeseries", "Adapter loads / s", "Loads by pool (host: from disk; device: into a slot) and "
          "reason (request, pin, ...).", [
              q(f"sum by (pool, reason) (rate(loraplane_lora_adapter_loads_total{{{SEL}}}[{RATE}]))",
                "{{pool}} {{reason}}"),
          ], unit="ops")
    L.add("timeseries", "Adapter evictions / s", "Evictions by pool, eviction policy (lru, fifo) and reason "
          "(capacity: a full pool made room; unload: the adapter was unloaded).", [
              q(f"sum by (pool, policy, reason) (rate(loraplane_lora_adapter_evictions_total{{{SEL}}}[{RATE}]))",
                "{{pool}} {{policy}} {{reason}}"),
          ], unit="ops")
    L.add("timeseries", "Adapter load latency", "p50 and p99 seconds to load an adapter, by pool.",
          quantiles("loraplane_lora_adapter_load_seconds", by="pool"), unit="s")
    L.add("timeseries", "Slot hit ratio over time", "Slot hits / (hits + misses), per pod.", [
        q(f"sum by (pod) (rate(loraplane_lora_slot_hits_total{{{SEL}}}[{RATE}])) / "
          f"(sum by (pod) (rate(loraplane_lora_slot_hits_total{{{SEL}}}[{RATE}])) + "
          f"sum by (pod) (rate(loraplane_lora_slot_misses_total{{{SEL}}}[{RATE}])))", "{{pod}}"),
    ], w=12, unit="percentunit", defaults={"min": 0, "max": 1})
    L.add("timeseries", "Adapters in host memory", "Adapters held in host memory, per pod.", [
        q(f"loraplane_lora_host_adapters{{{SEL}}}", "{{pod}}"),
    ], w=12)
    L.row("Requests")
    L.add("timeseries", "Queue and batch", "Requests waiting for admission and requests in the running batch.", [
        q(f"sum by (pod) (loraplane_queue_length{{{SEL}}})", "queued {{pod}}"),
        q(f"sum by (pod) (loraplane_running_requests{{{SEL}}})", "running {{pod}}"),
    ])
    L.add("timeseries", "Time to first token", "p50 and p99 TTFT.",
          quantiles("loraplane_time_to_first_token_seconds"), unit="s")
    L.add("timeseries", "Throughput", "Generated tokens per second, and prompt tokens per second (all and "
          "served from the prefix cache).", [
              q(f"sum(rate(loraplane_generated_tokens_total{{{SEL}}}[{RATE}]))", "generated tok/s"),
              q(f"sum(rate(loraplane_prompt_tokens_total{{{SEL}}}[{RATE}]))", "prompt tok/s"),
              q(f"sum(rate(loraplane_cached_prompt_tokens_total{{{SEL}}}[{RATE}]))", "cached prompt tok/s"),
          ], unit="short")
    L.add("timeseries", "Inter-token latency", "p50 and p99 time between tokens of a request.",
          quantiles("loraplane_inter_token_latency_seconds"), unit="s")
    L.add("timeseries", "End-to-end latency", "p50 and p99 request latency, arrival to last token.",
          quantiles("loraplane_e2e_request_latency_seconds"), unit="s")
    L.add("timeseries", "Finished requests / s", "By finish reason.", [
        q(f"sum by (reason) (rate(loraplane_requests_finished_total{{{SEL}}}[{RATE}]))", "{{reason}}"),
    ], unit="reqps")
    L.row("Engine")
    L.add("timeseries", "Forward step latency", "p50 and p99 duration of one forward pass (prefill and decode).",
          quantiles("loraplane_forward_step_seconds"), w=8, unit="s")
    L.add("timeseries", "KV cache usage", "KV cache blocks in use / total, per pod.", [
        q(f"loraplane_kv_cache_usage_ratio{{{SEL}}}", "{{pod}}"),
    ], w=8, unit="percentunit", defaults={"min": 0, "max": 1})
    L.add("timeseries", "Preemptions / s", "Running requests sent back to the queue for recompute "
          "because the KV cache was full, per pod. Steady preemption wastes compute: raise "
          "--mem-fraction-static or --max-total-tokens, or lower --max-running-requests.", [
        q(f"sum by (pod) (rate(loraplane_requests_preempted_total{{{SEL}}}[{RATE}]))", "{{pod}}"),
    ], w=8, unit="reqps")
    return dashboard("loraplane-server", "loraplane / Server and adapters",
                     "loraplane-server: adapter slot pool, loads and evictions, requests, engine.",
                     "loraplane_lora_slots_total", L)


def operator_dashboard():
    L = Layout()
    L.row("Reconciliation")
    L.add("timeseries", "Reconciles / s", "LoraAdapter reconciliations per second.", [
        q(f"sum(rate(loraplane_operator_reconciles_total{{{SEL}}}[{RATE}]))", "reconciles"),
    ], unit="ops")
    L.add("timeseries", "Reconcile errors / s", "Failed reconciliations per second, by error reason.", [
        q(f"sum by (reason) (rate(loraplane_operator_reconcile_errors_total{{{SEL}}}[{RATE}]))", "{{reason}}"),
    ], unit="ops")
    L.add("stat", "Error ratio", "Failed / all reconciliations over the time range.", [
        q(f"sum(increase(loraplane_operator_reconcile_errors_total{{{SEL}}}[$__range])) / "
          f"sum(increase(loraplane_operator_reconciles_total{{{SEL}}}[$__range]))"),
    ], w=4, unit="percentunit", defaults={"decimals": 1})
    L.add("stat", "Managed adapters", "LoraAdapter resources the operator manages.", [
        q(f"sum(loraplane_operator_managed_adapters{{{SEL}}})"),
    ], w=4)
    L.add("timeseries", "Reconcile duration", "p50 and p99 seconds per reconciliation.",
          quantiles("loraplane_operator_reconcile_duration_seconds"), w=24, unit="s")
    return dashboard("loraplane-operator", "loraplane / Operator",
                     "loraplane-operator: LoraAdapter reconcile rate, errors and duration.",
                     "loraplane_operator_reconciles_total", L)


def render():
    return {name: json.dumps(d, indent=2, sort_keys=False) + "\n"
            for name, d in (("server.json", server_dashboard()), ("operator.json", operator_dashboard()))}


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for name, text in render().items():
        path = OUT / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("dashboards out of date (run scripts/k8s/dashboards.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
