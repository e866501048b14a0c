#!/usr/bin/env bash
# Offline checks of the Helm chart (charts/loraplane), the LoraAdapter CRD and examples, and the
# Grafana dashboards: helm lint --strict and helm template --include-crds for the default values and
# each charts/loraplane/ci/*.yaml, kubernetes-validate --strict of every built-in kind, the CRD as
# apiextensions.k8s.io/v1, LoraAdapter examples (examples/k8s/adapter.yaml, docs) against the CRD's
# schema (and broken ones rejected), dashboard metric and label names against the Rust code, and
# every server flag reachable from values. No cluster needed. Exits non-zero on any failure.
#
#   scripts/k8s/check-chart.sh
#   LORAPLANE_CRD=/tmp/crd.yaml LORAPLANE_ADAPTER_EXAMPLE=/tmp/adapter.yaml scripts/k8s/check-chart.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
tools=$(scripts/k8s/install-tools.sh)
exec "$tools/venv/bin/python" scripts/k8s/check_chart.py --helm "$tools/bin/helm" "$@"
