//! The `LoraAdapter` custom resource (`loraplane.io/v1alpha1`): its spec, its status, and the
//! checks on the spec that need no cluster (adapter name, source scheme, replica count).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The finalizer the operator puts on every `LoraAdapter` so it can unload it before it goes.
pub const FINALIZER: &str = "loraplane.io/unload";

/// One LoRA adapter kept loaded on the loraplane server pods that `serverSelector` selects.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "loraplane.io",
    version = "v1alpha1",
    kind = "LoraAdapter",
    namespaced,
    shortname = "lora",
    category = "loraplane",
    status = "LoraAdapterStatus",
    derive = "PartialEq",
    doc = "A LoRA adapter the loraplane operator keeps loaded on the server pods it selects",
    // NB: raw JSON columns: the structured form trips clippy's duplicated_attributes.
    printcolumn = r#"{"name": "Adapter", "type": "string", "jsonPath": ".status.adapterName"}"#,
    printcolumn = r#"{"name": "Base Model", "type": "string", "jsonPath": ".spec.baseModel"}"#,
    printcolumn = r#"{"name": "Pinned", "type": "boolean", "jsonPath": ".spec.pinned"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Loaded", "type": "integer", "jsonPath": ".status.loadedCount",
                      "description": "Pods the adapter is loaded on"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LoraAdapterSpec {
    /// The name requests use for this adapter (the servers' `lora_name`); defaults to
    /// `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"))]
    pub adapter_name: Option<String>,
    /// The base model the adapter was trained for; it must equal the servers' served model name
    /// (`/get_server_info` `served_model_name`), or the adapter is not loaded there.
    #[schemars(length(min = 1))]
    pub base_model: String,
    /// Where the servers read the adapter (a PEFT directory): an absolute path on the servers'
    /// filesystem or volume, or `file:///path`. `s3://`, `gs://`, `hf://` and `http(s)://` are
    /// recognised but not implemented yet: the resource says so in its conditions.
    #[schemars(length(min = 1))]
    pub source: String,
    /// Keep the adapter in a GPU slot for good (never evicted); a server pins at most
    /// `max_loras_per_batch - 1` adapters.
    #[serde(default)]
    pub pinned: bool,
    /// Which loraplane server pods (in this namespace) to load the adapter on.
    pub server_selector: LabelSelector,
    /// Load on this many of the selected pods, chosen by most free adapter slots and kept where
    /// they are; unset: on every selected pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub replicas: Option<i32>,
}

/// The observed state of a `LoraAdapter`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraAdapterStatus {
    /// Summary: `Pending`, `Ready`, `Degraded` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The effective adapter name (`spec.adapterName` or `metadata.name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_name: Option<String>,
    /// `Ready`, `Loaded` and `Degraded`, each with a reason and a message.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The pods the adapter is loaded on, as read back from their servers.
    #[serde(default)]
    pub loaded_on: Vec<LoadedOn>,
    /// `loadedOn`'s length (for `kubectl get`).
    #[serde(default)]
    pub loaded_count: i32,
    /// Pods the adapter should be loaded on (`replicas`, or the selected pods).
    #[serde(default)]
    pub desired_count: i32,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One pod holding the adapter.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadedOn {
    /// The pod's name.
    pub pod: String,
    /// The pod's IP when the adapter was loaded.
    #[serde(rename = "podIP")]
    pub pod_ip: String,
    /// When the operator first saw it loaded there (reset by a reload).
    pub since: Time,
    /// Whether it is pinned there.
    pub pinned: bool,
}

/// The adapter at a glance: `Pending`, `Ready`, `Degraded` or `Failed`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Nothing loaded yet and nothing failed (no ready pod selected yet).
    Pending,
    /// Loaded on every pod it should be on.
    Ready,
    /// Loaded somewhere, but not everywhere it should be.
    Degraded,
    /// Not loaded anywhere, and something is wrong (spec, servers or loads).
    Failed,
}

/// Where an adapter comes from, once `spec.source` is understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A directory on the servers' filesystem: passed as `lora_path`.
    Path(String),
}

/// Why `spec` cannot be acted on; each is a condition reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecProblem {
    /// A scheme we know but do not fetch yet (`s3`, `hf`, ...).
    UnsupportedSource(String),
    /// Anything else wrong with the spec.
    InvalidSpec(String),
}

impl SpecProblem {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SpecProblem::UnsupportedSource(_) => "UnsupportedSource",
            SpecProblem::InvalidSpec(_) => "InvalidSpec",
        }
    }

    /// The human message.
    pub fn message(&self) -> &str {
        match self {
            SpecProblem::UnsupportedSource(m) | SpecProblem::InvalidSpec(m) => m,
        }
    }
}

/// Schemes that name a remote store: refused until the operator can fetch from them.
const REMOTE_SCHEMES: [&str; 6] = ["s3", "gs", "gcs", "hf", "http", "https"];

/// Reads `spec.source`: an absolute path or `file:///path`.
pub fn parse_source(source: &str) -> Result<Source, SpecProblem> {
    let s = source.trim();
    if let Some((scheme, rest)) = s.split_once("://") {
        let scheme = scheme.to_ascii_lowercase();
        if scheme == "file" {
            // NB: file://host/path is not a path on the servers; only file:///path is.
            if !rest.starts_with('/') {
                return Err(SpecProblem::InvalidSpec(format!(
                    "source {source:?}: a file URL must be file:///absolute/path"
                )));
            }
            return parse_source(rest);
        }
        if REMOTE_SCHEMES.contains(&scheme.as_str()) {
            return Err(SpecProblem::UnsupportedSource(format!(
                "source {source:?}: {scheme}:// sources are not implemented yet; put the adapter on a \
                 volume the servers mount and give its absolute path"
            )));
        }
        return Err(SpecProblem::InvalidSpec(format!(
            "source {source:?}: unknown scheme {scheme:?}; give an absolute path on the servers"
        )));
    }
    if !s.starts_with('/') {
        return Err(SpecProblem::InvalidSpec(format!(
            "source {source:?}: the path must be absolute (it is read on the server pods)"
        )));
    }
    if s.split('/').any(|c| c == "..") {
        return Err(SpecProblem::InvalidSpec(format!(
            "source {source:?}: `..` is not allowed"
        )));
    }
    let trimmed = s.trim_end_matches('/');
    Ok(Source::Path(if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    }))
}

/// Paths as servers report them, compared without trailing slashes.
pub fn same_path(a: &str, b: &str) -> bool {
    let norm = |p: &str| p.trim().trim_end_matches('/').to_string();
    norm(a) == norm(b)
}

/// What one `LoraAdapter` asks for, once its spec has been checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// The adapter name on the servers.
    pub name: String,
    /// The path the servers load it from.
    pub path: String,
    /// Pinned in a GPU slot.
    pub pinned: bool,
    /// The served model name the servers must report.
    pub base_model: String,
    /// `None`: every selected pod.
    pub replicas: Option<usize>,
}

impl LoraAdapter {
    /// The adapter name on the servers: `spec.adapterName` or `metadata.name`.
    pub fn adapter_name(&self) -> String {
        match &self.spec.adapter_name {
            Some(n) if !n.trim().is_empty() => n.trim().to_string(),
            _ => self.metadata.name.clone().unwrap_or_default(),
        }
    }

    /// The `serverSelector` as a label selector.
    pub fn selector(&self) -> Result<kube::core::Selector, SpecProblem> {
        kube::core::Selector::try_from(self.spec.server_selector.clone())
            .map_err(|e| SpecProblem::InvalidSpec(format!("serverSelector: {e}")))
    }

    /// Checks the spec and says what it asks for.
    pub fn desired(&self) -> Result<Desired, SpecProblem> {
        let name = self.adapter_name();
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == ':') {
            return Err(SpecProblem::InvalidSpec(format!(
                "adapter name {name:?} must be non-empty, without spaces or ':'"
            )));
        }
        if self.spec.base_model.trim().is_empty() {
            return Err(SpecProblem::InvalidSpec("baseModel is required".into()));
        }
        let replicas = match self.spec.replicas {
            None => None,
            Some(n) if n >= 1 => Some(n as usize),
            Some(n) => {
                return Err(SpecProblem::InvalidSpec(format!(
                    "replicas is {n}; give at least 1, or leave it unset for every selected pod"
                )))
            }
        };
        self.selector()?;
        let Source::Path(path) = parse_source(&self.spec.source)?;
        Ok(Desired {
            name,
            path,
            pinned: self.spec.pinned,
            base_model: self.spec.base_model.trim().to_string(),
            replicas,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_file_urls_are_accepted() {
        assert_eq!(
            parse_source("/adapters/a/"),
            Ok(Source::Path("/adapters/a".into()))
        );
        assert_eq!(
            parse_source(" file:///adapters/a "),
            Ok(Source::Path("/adapters/a".into()))
        );
        assert_eq!(parse_source("FILE:///x"), Ok(Source::Path("/x".into())));
    }

    #[test]
    fn remote_schemes_are_refused_as_unsupported() {
        for s in [
            "s3://b/k",
            "hf://org/repo",
            "https://h/x",
            "http://h/x",
            "gs://b/x",
        ] {
            match parse_source(s) {
                Err(SpecProblem::UnsupportedSource(m)) => assert!(m.contains("not implemented"), "{m}"),
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_sources_are_invalid() {
        for s in ["relative/dir", "ftp://x/y", "file://host/x", "/a/../etc", ""] {
            let e = parse_source(s).unwrap_err();
            assert_eq!(e.reason(), "InvalidSpec", "{s}: {e:?}");
        }
    }

    #[test]
    fn same_path_ignores_trailing_slashes() {
        assert!(same_path("/a/b/", "/a/b"));
        assert!(!same_path("/a/b", "/a/c"));
    }

    fn adapter(name: &str, spec_name: Option<&str>, replicas: Option<i32>) -> LoraAdapter {
        LoraAdapter::new(
            name,
            LoraAdapterSpec {
                adapter_name: spec_name.map(Into::into),
                base_model: "tiny".into(),
                source: "/adapters/x".into(),
                pinned: true,
                server_selector: LabelSelector::default(),
                replicas,
            },
        )
    }

    #[test]
    fn desired_defaults_the_name_and_checks_replicas() {
        let d = adapter("meta-name", None, None).desired().unwrap();
        assert_eq!(
            d,
            Desired {
                name: "meta-name".into(),
                path: "/adapters/x".into(),
                pinned: true,
                base_model: "tiny".into(),
                replicas: None
            }
        );
        assert_eq!(
            adapter("m", Some("given"), Some(2)).desired().unwrap().name,
            "given"
        );
        assert_eq!(adapter("m", None, Some(2)).desired().unwrap().replicas, Some(2));
        let e = adapter("m", None, Some(0)).desired().unwrap_err();
        assert!(e.message().contains("at least 1"), "{e:?}");
        let e = adapter("m", Some("a:b"), None).desired().unwrap_err();
        assert_eq!(e.reason(), "InvalidSpec");
    }
}
