#!/usr/bin/env bash
# Runs loraplane's whole test suite on a CPU-only machine (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-default-model.sh >/dev/null
cargo test --workspace --locked
# Kubernetes: the committed CRD matches the operator's types; the chart, CRD, examples and
# dashboards pass the offline checks (helm, kubernetes-validate, jsonschema; tools from PyPI).
# `cargo test` built the crdgen and server binaries for the integration tests (test profile, all
# workspace features); the checks below run those same binaries instead of building them again.
bins=${CARGO_TARGET_DIR:-target}/debug
LORAPLANE_CRDGEN_BIN=$bins/crdgen scripts/gen-crds.sh --check
scripts/k8s/check-chart.sh
LORAPLANE_SERVER_BIN=$bins/loraplane-server tests/python/run.sh
