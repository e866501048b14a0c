#!/usr/bin/env python3
"""Offline checks of the loraplane Helm chart, its CRD, the LoraAdapter examples and the Grafana
dashboards. Run through scripts/k8s/check-chart.sh, which installs the tools first.

Needs: helm (--helm or $HELM), and the Python packages kubernetes-validate, jsonschema, pyyaml.
Inputs taken from the repository, each overridable for local testing:
  LORAPLANE_CRD              the LoraAdapter CRD (default charts/loraplane/crds/loraadapters.loraplane.io.yaml)
  LORAPLANE_ADAPTER_EXAMPLE  a LoraAdapter example (default examples/k8s/adapter.yaml)
  LORAPLANE_EXTRA_SRC        extra directories (":"-separated) of Rust code exporting metrics, besides
                             server/src and operator/src (e.g. an operator checkout not merged yet)
Prints one line per check and ends with "N passed, M failed"; exits 1 on any failure.
"""

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "loraplane"
CRD_NAME = "loraadapters.loraplane.io"
CRD_FILE = f"{CRD_NAME}.yaml"
RELEASE, NAMESPACE = "loraplane", "loraplane"
# Kubernetes versions the rendered manifests are validated against (the validator's schemas).
K8S_VERSIONS = ("1.33", kubernetes_validate.utils.latest_version())
# Labels Prometheus attaches to every scraped series (Kubernetes service discovery, ServiceMonitors).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "service", "endpoint", "container"}
# Server flags the chart sets from other values than server.args.
FLAGS_OUTSIDE_ARGS = {"host": "server.host", "port": "server.port"}

passed, failed = [], []


def report(ok, what, detail=""):
    (passed if ok else failed).append(what)
    print(f"{'ok  ' if ok else 'FAIL'} {what}" + (f"\n     {detail}" if detail and not ok else ""))
    return ok


def load_yaml_docs(text):
    return [d for d in yaml.safe_load_all(text) if d]


# ---------------------------------------------------------------------------------------------
# Helm
# ---------------------------------------------------------------------------------------------

def helm(args, helm_bin):
    return subprocess.run([helm_bin, *args], capture_output=True, text=True)


def check_render(chart, values, helm_bin):
    """helm lint --strict and helm template --include-crds; returns the rendered objects."""
    label = values.relative_to(CHART).as_posix() if values else "default values"
    vargs = ["-f", str(values)] if values else []
    lint = helm(["lint", "--strict", str(chart), *vargs], helm_bin)
    lint_out = lint.stdout + lint.stderr
    report(lint.returncode == 0 and "[WARNING]" not in lint_out and "[ERROR]" not in lint_out,
           f"helm lint --strict ({label})", lint_out.strip()[-2000:])
    tpl = helm(["template", RELEASE, str(chart), "--namespace", NAMESPACE, "--include-crds", *vargs], helm_bin)
    if not report(tpl.returncode == 0, f"helm template --include-crds ({label})", tpl.stderr.strip()[-2000:]):
        return []
    return load_yaml_docs(tpl.stdout)


def validate_builtin(objs, label):
    """kubernetes-validate --strict for every object whose kind Kubernetes defines."""
    custom = [o for o in objs if o.get("apiVersion", "").split("/")[0] in ("monitoring.coreos.com", "loraplane.io")]
    builtin = [o for o in objs if o not in custom]
    for version in K8S_VERSIONS:
        errors = []
        for o in builtin:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except Exception as e:  # ValidationError, SchemaNotFoundError, ...
                msg = getattr(e, "message", None) or str(e)
                errors.append(f"{o.get('kind')}/{o.get('metadata', {}).get('name')}: {msg.splitlines()[0]}")
        kinds = sorted({o["kind"] for o in builtin})
        report(not errors, f"kubernetes-validate --strict {version} ({label}: {len(builtin)} objects, {', '.join(kinds)})",
               "; ".join(errors[:10]))


def find(objs, kind, component=None):
    return [o for o in objs if o.get("kind") == kind and (
        component is None or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]


def check_service_monitors(objs, label):
    """ServiceMonitors (no schema available offline): shape, and each selects a rendered Service with the port."""
    allowed_ep = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
                  "metricRelabelings", "tlsConfig", "bearerTokenSecret", "authorization"}
    problems = []
    services = find(objs, "Service")
    for sm in find(objs, "ServiceMonitor"):
        name = sm["metadata"]["name"]
        if sm.get("apiVersion") != "monitoring.coreos.com/v1":
            problems.append(f"{name}: apiVersion {sm.get('apiVersion')}")
        spec = sm.get("spec", {})
        sel = spec.get("selector", {}).get("matchLabels") or {}
        svc = [s for s in services if sel and sel.items() <= s["metadata"].get("labels", {}).items()]
        if len(svc) != 1:
            problems.append(f"{name}: selector {sel} matches {len(svc)} Services")
            continue
        ports = {p.get("name") for p in svc[0]["spec"]["ports"]}
        for ep in spec.get("endpoints", []):
            if set(ep) - allowed_ep:
                problems.append(f"{name}: unknown endpoint fields {sorted(set(ep) - allowed_ep)}")
            if ep.get("port") not in ports:
                problems.append(f"{name}: port {ep.get('port')!r} not in Service ports {sorted(ports)}")
        if not spec.get("endpoints"):
            problems.append(f"{name}: no endpoints")
        if NAMESPACE not in spec.get("namespaceSelector", {}).get("matchNames", []):
            problems.append(f"{name}: namespaceSelector does not name the release namespace")
    if find(objs, "ServiceMonitor"):
        report(not problems, f"ServiceMonitors select the metrics Services and ports ({label})", "; ".join(problems))


def check_server_pod(objs, values, label):
    """The server Deployment: port `http`, /health probes, GPU request, args, label selectors."""
    deps = find(objs, "Deployment", "server")
    if not values["server"]["enabled"]:
        return report(not deps, f"no server Deployment when server.enabled=false ({label})")
    problems = []
    if len(deps) != 1:
        return report(False, f"server Deployment ({label})", f"{len(deps)} rendered")
    pod = deps[0]["spec"]["template"]
    c = pod["spec"]["containers"][0]
    port = values["server"]["port"]
    if [p for p in c.get("ports", []) if p.get("name") == "http" and p.get("containerPort") == port] == []:
        problems.append(f"no container port named http = {port}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != "/health" or get.get("port") not in ("http", port):
            problems.append(f"{probe} is not GET /health on the http port")
    gpu, res = values["server"]["gpu"], values["server"]["gpuResourceName"]
    got = c.get("resources", {}).get("limits", {}).get(res)
    if (gpu > 0 and got != gpu) or (gpu == 0 and got is not None):
        problems.append(f"{res} limit {got!r}, want {gpu or 'none'}")
    args = c.get("args", [])
    want_device = values["server"]["args"].get("device") or ("cuda" if gpu > 0 else "cpu")
    for flag in (f"--device={want_device}", f"--port={port}", f"--model-path={values['server']['args']['modelPath']}"):
        if flag not in args:
            problems.append(f"args lack {flag}")
    if not deps[0]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items():
        problems.append("Deployment selector does not match its pod labels")
    svc = find(objs, "Service", "server")
    if not svc or not svc[0]["spec"]["selector"].items() <= pod["metadata"]["labels"].items():
        problems.append("server Service selector does not match the server pods")
    elif [p for p in svc[0]["spec"]["ports"] if p.get("name") == "http"] == []:
        problems.append("server Service has no port named http")
    if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True or \
            pod["spec"].get("securityContext", {}).get("runAsNonRoot") is not True:
        problems.append("server does not run non-root with a read-only root filesystem")
    report(not problems, f"server pod: http port, /health probes, GPU, args, selectors ({label})", "; ".join(problems))
    return pod


def check_operator(objs, values, label):
    op = values["operator"]
    deps = find(objs, "Deployment", "operator")
    if not op["enabled"]:
        return report(not deps and not find(objs, "ClusterRole") and not find(objs, "Role"),
                      f"no operator objects when operator.enabled=false ({label})")
    problems = []
    ns = op["watchNamespace"]
    role_kind = "Role" if ns else "ClusterRole"
    roles = find(objs, role_kind, "operator")
    other = find(objs, "ClusterRole" if ns else "Role", "operator")
    if len(roles) != 1 or other:
        problems.append(f"want one {role_kind} and no other role, got {len(roles)} + {len(other)}")
    else:
        if ns and roles[0]["metadata"].get("namespace") != ns:
            problems.append(f"Role is not in the watched namespace {ns}")
        have = {(g, r, v) for rule in roles[0]["rules"] for g in rule["apiGroups"]
                for r in rule["resources"] for v in rule["verbs"]}
        need = {("loraplane.io", "loraadapters", v) for v in ("get", "list", "watch", "patch")}
        need |= {("loraplane.io", "loraadapters/status", "patch")}
        need |= {("", "pods", v) for v in ("get", "list", "watch")}
        need |= {(g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")}
        if need - have:
            problems.append(f"RBAC lacks {sorted(need - have)}")
        binds = find(objs, role_kind + "Binding", "operator")
        sa = deps[0]["spec"]["template"]["spec"].get("serviceAccountName") if deps else None
        if len(binds) != 1 or binds[0]["roleRef"]["name"] != roles[0]["metadata"]["name"] or \
                binds[0]["subjects"][0]["name"] != sa:
            problems.append("the binding does not bind the role to the operator's ServiceAccount")
    if deps:
        c = deps[0]["spec"]["template"]["spec"]["containers"][0]
        args = c.get("args", [])
        want = [f"--metrics-addr=0.0.0.0:{op['metricsPort']}", f"--server-port={values['server']['port']}"]
        want += [f"--namespace={ns}"] if ns else []
        missing = [a for a in want if a not in args]
        if missing:
            problems.append(f"operator args lack {missing}")
        if not ns and any(a.startswith("--namespace") for a in args):
            problems.append("--namespace given although all namespaces are watched")
        svc = find(objs, "Service", "operator")
        if not svc or [p for p in svc[0]["spec"]["ports"] if p.get("name") == "metrics"] == []:
            problems.append("no operator Service with a port named metrics")
    else:
        problems.append("no operator Deployment")
    report(not problems, f"operator: {role_kind} RBAC, flags, metrics Service ({label})", "; ".join(problems))


def check_dashboard_configmaps(objs, values, label):
    cms = find(objs, "ConfigMap", "dashboards")
    if not values["dashboards"]["enabled"]:
        return report(not cms, f"no dashboard ConfigMaps when dashboards.enabled=false ({label})")
    problems = []
    files = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    got = sorted(k for cm in cms for k in cm.get("data", {}))
    if got != files:
        problems.append(f"ConfigMaps hold {got}, want {files}")
    for cm in cms:
        labels = cm["metadata"].get("labels", {})
        if not values["dashboards"]["labels"].items() <= labels.items():
            problems.append(f"{cm['metadata']['name']} lacks labels {values['dashboards']['labels']}")
        for k, v in cm.get("data", {}).items():
            try:
                if json.loads(v) != json.loads((CHART / "dashboards" / k).read_text()):
                    problems.append(f"{k} differs from the file")
            except ValueError as e:
                problems.append(f"{k}: {e}")
    report(not problems, f"dashboard ConfigMaps labelled {values['dashboards']['labels']} ({label})", "; ".join(problems))


def merged_values(values_file):
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    if values_file:
        def merge(a, b):
            for k, v in b.items():
                a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
            return a
        base = merge(base, yaml.safe_load(values_file.read_text()) or {})
    return base


# ---------------------------------------------------------------------------------------------
# CRD and LoraAdapter objects
# ---------------------------------------------------------------------------------------------

def to_json_schema(s, top=True):
    """A CRD openAPIV3Schema as a JSON schema the API server would enforce: `nullable` allows null,
    and objects with properties refuse unknown fields (kubectl's default --validate=strict)."""
    s = copy.deepcopy(s)
    if isinstance(s, dict):
        for key in ("properties", "patternProperties", "definitions"):
            if key in s:
                s[key] = {k: to_json_schema(v, False) for k, v in s[key].items()}
        for key in ("items", "additionalProperties", "not"):
            if isinstance(s.get(key), dict):
                s[key] = to_json_schema(s[key], False)
        for key in ("allOf", "anyOf", "oneOf"):
            if key in s:
                s[key] = [to_json_schema(x, False) for x in s[key]]
        if s.pop("nullable", False) and "type" in s:
            s["type"] = [s["type"], "null"]
        if s.get("x-kubernetes-int-or-string"):
            s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            if top:  # apiVersion, kind and metadata are checked by the API server itself
                s["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "metadata": {"type": "object"}, **s["properties"]}
            s["additionalProperties"] = False
    return s


def load_crd():
    override = os.environ.get("LORAPLANE_CRD")
    path = Path(override) if override else CHART / "crds" / CRD_FILE
    if not report(path.is_file(), f"CRD present: {path}",
                  "the operator's generated CRD is missing; generate it (operator crdgen) into crds/ and "
                  "charts/loraplane/crds/, or point LORAPLANE_CRD at one"):
        return None, None
    docs = load_yaml_docs(path.read_text())
    crd = docs[0] if len(docs) == 1 else None
    problems = []
    if not crd or crd.get("kind") != "CustomResourceDefinition" or crd.get("apiVersion") != "apiextensions.k8s.io/v1":
        problems.append("not one apiextensions.k8s.io/v1 CustomResourceDefinition")
    else:
        spec = crd["spec"]
        want = {"metadata.name": CRD_NAME, "group": "loraplane.io", "names.kind": "LoraAdapter",
                "names.plural": "loraadapters", "scope": "Namespaced"}
        got = {"metadata.name": crd["metadata"].get("name"), "group": spec.get("group"),
               "names.kind": spec.get("names", {}).get("kind"), "names.plural": spec.get("names", {}).get("plural"),
               "scope": spec.get("scope")}
        problems += [f"{k} is {got[k]!r}, want {v!r}" for k, v in want.items() if got[k] != v]
        if not [v for v in spec.get("versions", []) if v.get("name") == "v1alpha1" and v.get("served")]:
            problems.append("no served version v1alpha1")
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(crd, version, strict=True)
            except Exception as e:
                problems.append(f"kubernetes-validate {version}: {(getattr(e, 'message', None) or str(e)).splitlines()[0]}")
    report(not problems, "CRD is a valid apiextensions.k8s.io/v1 CRD for loraplane.io/v1alpha1 LoraAdapter",
           "; ".join(problems))
    root_copy = ROOT / "crds" / CRD_FILE
    chart_copy = CHART / "crds" / CRD_FILE
    if root_copy.is_file() and chart_copy.is_file():
        report(root_copy.read_text() == chart_copy.read_text(), f"crds/{CRD_FILE} and the chart's copy are identical",
               "regenerate both from the operator's crdgen")
    return (crd, path) if not problems else (None, path)


def adapter_validator(crd):
    version = next(v for v in crd["spec"]["versions"] if v.get("storage", v.get("served")))
    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
    api_version = f"{crd['spec']['group']}/{version['name']}"

    def errors(obj):
        errs = []
        if obj.get("apiVersion") != api_version or obj.get("kind") != crd["spec"]["names"]["kind"]:
            errs.append(f"apiVersion/kind {obj.get('apiVersion')}/{obj.get('kind')}, want {api_version}/LoraAdapter")
        if not obj.get("metadata", {}).get("name"):
            errs.append("metadata.name missing")
        v = jsonschema.Draft7Validator(schema)
        errs += [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(obj)]
        return errs
    return errors


def doc_adapters():
    """LoraAdapter objects in the docs' YAML code blocks."""
    found = []
    for doc in (ROOT / "docs" / "kubernetes.md", ROOT / "README.md"):
        if not doc.is_file():
            continue
        for block in re.findall(r"```ya?ml\n(.*?)```", doc.read_text(), re.S):
            try:
                objs = load_yaml_docs(block)
            except yaml.YAMLError:
                continue
            found += [(doc.relative_to(ROOT).as_posix(), o) for o in objs
                      if isinstance(o, dict) and o.get("kind") == "LoraAdapter"]
    return found


def check_kubectl_names(crd):
    """`kubectl get|describe <lora...>` in the docs and NOTES.txt uses a name the CRD defines."""
    names = crd["spec"]["names"]
    known = {names["plural"], names.get("singular", ""), names["kind"].lower(), *names.get("shortNames", [])}
    known |= {f"{n}.loraplane.io" for n in set(known)}
    used = []
    for f in (ROOT / "docs" / "kubernetes.md", CHART / "templates" / "NOTES.txt"):
        if f.is_file():
            used += [(f.name, w) for w in re.findall(r"kubectl\b[^\n`]*?\b(?:get|describe|delete)\s+(lora[\w.]*)", f.read_text())]
    bad = sorted({f"{w} ({f})" for f, w in used if w not in known})
    report(bool(used) and not bad, f"kubectl commands in the docs name LoraAdapters as the CRD does ({sorted(known)})",
           f"unknown: {bad}")


def check_adapters(crd, server_pod):
    override = os.environ.get("LORAPLANE_ADAPTER_EXAMPLE")
    example = Path(override) if override else ROOT / "examples" / "k8s" / "adapter.yaml"
    if not report(example.is_file(), f"LoraAdapter example present: {example}",
                  "examples/k8s/adapter.yaml is missing (the operator's example), or set LORAPLANE_ADAPTER_EXAMPLE"):
        return
    if crd is None:
        return report(False, "LoraAdapter examples validated against the CRD", "no valid CRD")
    check_kubectl_names(crd)
    errors = adapter_validator(crd)
    adapters = [(str(example.name), o) for o in load_yaml_docs(example.read_text()) if o.get("kind") == "LoraAdapter"]
    if not report(bool(adapters), f"{example.name} holds a LoraAdapter"):
        return
    adapters += doc_adapters()
    for where, obj in adapters:
        errs = errors(obj)
        report(not errs, f"LoraAdapter {obj.get('metadata', {}).get('name')} ({where}) valid against the CRD schema",
               "; ".join(errs))
    # The check must be able to fail: broken copies of the example are refused.
    good = adapters[0][1]
    version = next(v for v in crd["spec"]["versions"] if v.get("storage", v.get("served")))
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    broken = {
        "spec.pinned as a string": lambda o: o["spec"].__setitem__("pinned", "yes"),
        "an unknown spec field": lambda o: o["spec"].__setitem__("pined", True),
        "spec.replicas as a string": lambda o: o["spec"].__setitem__("replicas", "two"),
        "spec.serverSelector as a list": lambda o: o["spec"].__setitem__("serverSelector", ["app"]),
    }
    for field in spec_schema.get("required", []):
        broken[f"no spec.{field} (required)"] = lambda o, f=field: o["spec"].pop(f, None)
    for what, breaker in broken.items():
        bad = copy.deepcopy(good)
        breaker(bad)
        report(bool(errors(bad)), f"a LoraAdapter with {what} is rejected")
    # The example selects the pods this chart deploys (default values, release "loraplane").
    sel = good["spec"].get("serverSelector", {}) or {}
    labels = server_pod["metadata"]["labels"] if isinstance(server_pod, dict) else {}
    ok = all(labels.get(k) == v for k, v in (sel.get("matchLabels") or {}).items())
    for e in sel.get("matchExpressions") or []:
        present, val = e["key"] in labels, labels.get(e["key"])
        ok &= {"In": present and val in e.get("values", []), "NotIn": not present or val not in e.get("values", []),
               "Exists": present, "DoesNotExist": not present}.get(e["operator"], False)
    report(bool(sel) and ok, f"{example.name} serverSelector matches the chart's server pods (release {RELEASE!r})",
           f"selector {sel} vs pod labels {labels}")


# ---------------------------------------------------------------------------------------------
# Dashboards against the metrics in the code
# ---------------------------------------------------------------------------------------------

def code_metrics():
    """String literals in the server's and operator's Rust code, and the server metrics' label names."""
    literals, labels = set(), {}
    dirs = [ROOT / "server" / "src", ROOT / "operator" / "src"]
    dirs += [Path(d) for d in os.environ.get("LORAPLANE_EXTRA_SRC", "").split(":") if d]
    for d in dirs:
        for f in d.rglob("*.rs"):
            text = f.read_text()
            literals |= set(re.findall(r'"([A-Za-z_:][A-Za-z0-9_:]*)"', text))
            # `Opts::new("name", ..), &["label", ...]` / `HistogramOpts::new("name", ..).buckets(..), &["label"]`
            for m in re.finditer(r'Opts::new\(\s*"([^"]+)".*?\)\s*(?:\.buckets\([^()]*(?:\([^()]*\))?[^()]*\)\s*)?,'
                                 r'\s*&\[([^\]]*)\]', text, re.S):
                labels[m.group(1)] = set(re.findall(r'"([^"]+)"', m.group(2)))
    return literals, labels


def exported(name, literals):
    """A metric name is exported if the code spells it (prometheus-client adds `_total` to counters
    itself, and prefixed registries may split the name at an underscore)."""
    candidates = {name, name.removesuffix("_total")}
    for n in list(candidates):
        parts = n.split("_")
        candidates |= {("_".join(parts[:i]), "_".join(parts[i:])) for i in range(1, len(parts))}
    return any(c in literals if isinstance(c, str) else (c[0] in literals and c[1] in literals) for c in candidates)


PROMQL_WORDS = {"sum", "rate", "increase", "irate", "avg", "max", "min", "count", "by", "without", "on", "ignoring",
                "histogram_quantile", "label_values", "group_left", "group_right", "and", "or", "unless", "offset",
                "bool", "topk", "bottomk", "clamp_min", "clamp_max", "abs", "delta", "deriv", "vector", "scalar",
                "time", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "le"}


def dashboard_queries(d):
    """(where, expr, legend) for every panel target and every query template variable."""
    out = []

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))
    for p in panels(d.get("panels", [])):
        for t in p.get("targets", []):
            out.append((f"panel {p.get('title')!r}", t.get("expr", ""), t.get("legendFormat", "")))
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            query = v.get("query")
            out.append((f"variable ${v['name']}", query.get("query", "") if isinstance(query, dict) else query or "", ""))
    return out


def query_problems(where, expr, legend, literals, metric_labels):
    """Unknown metric names and label names in one PromQL query; returns (metrics used, problems)."""
    problems = []
    clean = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # drop string literals
    clean = re.sub(r"\[[^\]]*\]", "", clean)           # and range selectors
    names = set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{", clean))
    names |= set(re.findall(r"\b((?:loraplane|vllm)[A-Za-z0-9_:]*)", clean))
    names = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names} - PROMQL_WORDS
    if not names:
        problems.append(f"{where}: no metric in {expr!r}")
    problems += [f"{where}: unknown metric {n}" for n in sorted(names) if not exported(n, literals)]
    # Label names used: by/without lists, selector keys, legend {{label}}.
    used = set()
    for grp in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", clean):
        used |= {x.strip() for x in grp.split(",") if x.strip()}
    for sel in re.findall(r"\{([^}]*)\}", clean):
        used |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", sel))
    used |= set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend))
    known = set(TARGET_LABELS) | {"le"}
    for n in names:
        known |= metric_labels.get(n, set()) | metric_labels.get(n + "_total", set())
    problems += [f"{where}: label {lab!r} is not a label of {', '.join(sorted(names))}" for lab in sorted(used - known)]
    return names, problems


def check_dashboards():
    sys.path.insert(0, str(Path(__file__).parent))
    import dashboards as gen
    stale = [n for n, text in gen.render().items() if (CHART / "dashboards" / n).read_text() != text]
    report(not stale, "dashboards/*.json are what scripts/k8s/dashboards.py generates", f"stale: {stale}")

    literals, metric_labels = code_metrics()
    evictions = metric_labels.get("loraplane_lora_adapter_evictions_total")
    report(evictions == {"pool", "policy", "reason"},
           f"label names of {len(metric_labels)} labelled metrics read from the code",
           f"evictions labels read as {evictions}")
    # The check can fail: a made-up metric and a made-up label are caught.
    _, bad = query_problems("self-test", 'sum by (adapter) (rate(loraplane_lora_adapter_loads_total[5m])) '
                            '+ loraplane_no_such_metric{pod="x"}', "", literals, metric_labels)
    report(len(bad) == 2, "a query with an unknown metric or label is reported", f"got {bad}")
    for f in sorted((CHART / "dashboards").glob("*.json")):
        d = json.loads(f.read_text())
        problems, names_all = [], set()
        vars_ = {v["name"] for v in d.get("templating", {}).get("list", [])}
        if not {"datasource", "namespace", "pod"} <= vars_:
            problems.append(f"template variables {sorted(vars_)} lack datasource/namespace/pod")
        for panel in d.get("panels", []):
            ds = panel.get("datasource")
            if panel.get("type") != "row" and (not isinstance(ds, dict) or ds.get("uid") != "${datasource}"):
                problems.append(f"panel {panel.get('title')!r} does not use the $datasource variable")
        queries = dashboard_queries(d)
        for where, expr, legend in queries:
            names, p = query_problems(where, expr, legend, literals, metric_labels)
            names_all |= names
            problems += [x for x in p if x not in problems]
        report(not problems and bool(queries),
               f"dashboard {f.name}: {len(queries)} queries over {len(names_all)} metrics, "
               "names and labels all in the code", "\n     ".join(problems[:30]))


# ---------------------------------------------------------------------------------------------
# Server flags and values.yaml
# ---------------------------------------------------------------------------------------------

def server_flags():
    """(flag name, kind) for every field of ServeArgs in server/src/args.rs; kind: bool, list or value."""
    text = (ROOT / "server" / "src" / "args.rs").read_text()
    body = re.search(r"pub struct ServeArgs \{(.*?)\n\}", text, re.S).group(1)
    flags = []
    for name, ty in re.findall(r"^\s*pub (\w+):\s*([^,\n]+),", body, re.M):
        kind = "bool" if ty.strip() == "bool" else "list" if ty.strip().startswith("Vec<") else "value"
        flags.append((name, kind))
    return flags


def camel(snake):
    head, *rest = snake.split("_")
    return head + "".join(w.capitalize() for w in rest)


def check_flags(chart, helm_bin):
    flags = server_flags()
    args = yaml.safe_load((CHART / "values.yaml").read_text())["server"]["args"]
    in_args = {f: k for f, k in flags if f not in FLAGS_OUTSIDE_ARGS}
    missing = [f"--{f.replace('_', '-')} (server.args.{camel(f)})" for f in in_args if camel(f) not in args]
    extra = [k for k in args if k not in {camel(f) for f in in_args}]
    report(len(flags) > 20 and not missing and not extra,
           f"values.yaml server.args has one key per server flag ({len(flags)} flags in args.rs)",
           f"missing: {missing}; keys that are no flag: {extra}")
    schema = json.loads((CHART / "values.schema.json").read_text())
    schema_args = set(schema["properties"]["server"]["properties"]["args"]["properties"])
    report(schema_args == {camel(f) for f in in_args},
           "values.schema.json server.args lists exactly the server flags (unknown keys are refused)",
           f"missing: {sorted({camel(f) for f in in_args} - schema_args)}; extra: {sorted(schema_args - {camel(f) for f in in_args})}")
    bad = helm(["lint", str(chart), "--set", "server.args.maxLorasPerBach=3"], helm_bin)
    report(bad.returncode != 0, "helm lint refuses a misspelt server.args key")
    # Render with every flag set and find each on the command line.
    sample = {}
    for f, kind in in_args.items():
        sample[camel(f)] = True if kind == "bool" else ["item-a", "item-b"] if kind == "list" else f"value-{f}"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
        yaml.safe_dump({"server": {"args": sample, "port": 31234, "host": "0.0.0.0"}}, tmp)
    try:
        out = helm(["template", RELEASE, str(chart), "-f", tmp.name, "--show-only", "templates/server-deployment.yaml"],
                   helm_bin)
    finally:
        os.unlink(tmp.name)
    if not report(out.returncode == 0, "helm template with every server flag set", out.stderr.strip()[-1000:]):
        return
    argv = load_yaml_docs(out.stdout)[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    absent = []
    for f, kind in flags:
        flag = "--" + f.replace("_", "-")
        if f in FLAGS_OUTSIDE_ARGS:
            ok = f"{flag}=0.0.0.0" in argv or f"{flag}=31234" in argv
        elif kind == "bool":
            ok = flag in argv
        elif kind == "list":
            ok = flag in argv and argv[argv.index(flag) + 1:argv.index(flag) + 3] == ["item-a", "item-b"]
        else:
            ok = f"{flag}=value-{f}" in argv
        if not ok:
            absent.append(flag)
    report(not absent, f"every one of the {len(flags)} server flags reaches the server's command line from values",
           f"not rendered: {absent}")


def check_values_documented():
    """Every key in values.yaml has a comment line right above it (or in a comment block above it)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(\s|$)", line)
        if not m:
            continue
        prev = lines[i - 1].strip() if i else ""
        if not prev.startswith("#") and "#" not in line.split(":", 1)[1]:
            undocumented.append(f"{i + 1}:{m.group(2)}")
    # A mapping key whose children are documented needs no comment of its own when a section comment
    # precedes it (e.g. `image:`): only leaf keys are required to have one.
    leaves = []
    for entry in undocumented:
        n = int(entry.split(":")[0]) - 1
        indent = len(lines[n]) - len(lines[n].lstrip())
        nxt = next((l for l in lines[n + 1:] if l.strip() and not l.strip().startswith("#")), "")
        is_parent = lines[n].rstrip().endswith(":") and (len(nxt) - len(nxt.lstrip())) > indent
        if not is_parent:
            leaves.append(entry)
    report(not leaves, "every value in values.yaml has a comment", f"undocumented: {leaves}")


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--helm", default=os.environ.get("HELM", "helm"))
    helm_bin = ap.parse_args().helm

    with tempfile.TemporaryDirectory() as tmp:
        # Work on a copy so that a CRD given by LORAPLANE_CRD never lands in the repository.
        chart = Path(tmp) / "loraplane"
        shutil.copytree(CHART, chart)
        crd, crd_path = load_crd()
        if crd_path and crd_path.is_file() and crd_path.resolve() != (CHART / "crds" / CRD_FILE).resolve():
            (chart / "crds").mkdir(exist_ok=True)
            shutil.copy(crd_path, chart / "crds" / CRD_FILE)

        server_pod = None
        for values in [None, *sorted((CHART / "ci").glob("*.yaml"))]:
            label = values.relative_to(CHART).as_posix() if values else "default values"
            objs = check_render(chart, values, helm_bin)
            if not objs:
                continue
            v = merged_values(values)
            crds = find(objs, "CustomResourceDefinition")
            report(crd is not None and [c["metadata"]["name"] for c in crds] == [CRD_NAME],
                   f"helm template --include-crds renders the {CRD_NAME} CRD ({label})")
            validate_builtin(objs, label)
            check_service_monitors(objs, label)
            pod = check_server_pod(objs, v, label)
            check_operator(objs, v, label)
            check_dashboard_configmaps(objs, v, label)
            if values is None:
                server_pod = pod
                report(not find(objs, "ServiceMonitor"), "no ServiceMonitor by default")
        check_adapters(crd, server_pod)
        check_flags(chart, helm_bin)
    check_values_documented()
    check_dashboards()

    print(f"{len(passed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
