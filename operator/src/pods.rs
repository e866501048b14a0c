//! Server pods as the operator sees them: whether a pod can be asked now (ready, has an IP, not
//! going away) and the endpoint of its server (the container port named `http`, else a default).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::core::{Selector, SelectorExt};
use kube::ResourceExt;

use crate::crd::LoraAdapter;

/// The container port name the server listens on.
pub const HTTP_PORT_NAME: &str = "http";

/// One pod the operator may talk to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTarget {
    /// The pod's name.
    pub name: String,
    /// Its IP ("" when it has none yet).
    pub ip: String,
    /// `http://IP:PORT`, or why the pod cannot be asked now.
    pub endpoint: Result<String, String>,
    /// Selected by the adapter's `serverSelector` (false: only listed in its status, so it may
    /// hold the adapter and must lose it).
    pub selected: bool,
}

/// The pod as a target: ready, with an IP, not being deleted; port `http` or `default_port`.
pub fn target(pod: &Pod, default_port: u16, selected: bool) -> PodTarget {
    let name = pod.name_any();
    let status = pod.status.as_ref();
    let ip = status.and_then(|s| s.pod_ip.clone()).unwrap_or_default();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        .unwrap_or(false);
    let endpoint = if pod.metadata.deletion_timestamp.is_some() {
        Err("terminating".to_string())
    } else if !ready {
        Err("not ready".to_string())
    } else if ip.is_empty() {
        Err("no pod IP yet".to_string())
    } else {
        let port = http_port(pod).unwrap_or(default_port);
        // NB: IPv6 pod IPs need brackets in a URL.
        Ok(if ip.contains(':') {
            format!("http://[{ip}]:{port}")
        } else {
            format!("http://{ip}:{port}")
        })
    };
    PodTarget {
        name,
        ip,
        endpoint,
        selected,
    }
}

/// The first container port named `http`.
pub fn http_port(pod: &Pod) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(HTTP_PORT_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// Whether `adapter` selects or has loaded `pod`: the pod-to-adapter mapping of the pod watch.
pub fn concerns(adapter: &LoraAdapter, pod: &Pod) -> bool {
    if adapter.namespace() != pod.namespace() {
        return false;
    }
    let name = pod.name_any();
    let listed = adapter
        .status
        .as_ref()
        .is_some_and(|s| s.loaded_on.iter().any(|l| l.pod == name));
    listed || selects(adapter, pod.labels())
}

/// Whether the adapter's `serverSelector` matches `labels` (an invalid selector matches nothing).
pub fn selects(adapter: &LoraAdapter, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(adapter.spec.server_selector.clone()).is_ok_and(|s| s.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{LoadedOn, LoraAdapterSpec, LoraAdapterStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, Time};
    use serde_json::json;

    fn pod(name: &str, ready: bool, ip: Option<&str>, port_name: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "labels": {"app": "srv", "tier": "gpu"}},
            "spec": {"containers": [{"name": "c", "ports": [
                {"name": "metrics", "containerPort": 9000},
                {"name": port_name, "containerPort": 31000}
            ]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    #[test]
    fn ready_pods_get_the_http_port_others_say_why_not() {
        let t = target(&pod("a", true, Some("10.0.0.1"), "http"), 30000, true);
        assert_eq!(t.endpoint, Ok("http://10.0.0.1:31000".into()));
        let t = target(&pod("a", true, Some("10.0.0.1"), "grpc"), 30000, true);
        assert_eq!(
            t.endpoint,
            Ok("http://10.0.0.1:30000".into()),
            "falls back to the default port"
        );
        let t = target(&pod("a", true, Some("fd00::1"), "http"), 30000, true);
        assert_eq!(t.endpoint, Ok("http://[fd00::1]:31000".into()));
        assert_eq!(
            target(&pod("a", false, Some("10.0.0.1"), "http"), 1, true).endpoint,
            Err("not ready".into())
        );
        assert_eq!(
            target(&pod("a", true, None, "http"), 1, true).endpoint,
            Err("no pod IP yet".into())
        );
        let mut p = pod("a", true, Some("10.0.0.1"), "http");
        p.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert_eq!(target(&p, 1, true).endpoint, Err("terminating".into()));
    }

    fn adapter(selector: LabelSelector) -> LoraAdapter {
        let mut a = LoraAdapter::new(
            "x",
            LoraAdapterSpec {
                adapter_name: None,
                base_model: "m".into(),
                source: "/a".into(),
                pinned: false,
                server_selector: selector,
                replicas: None,
            },
        );
        a.metadata.namespace = Some("ns".into());
        a
    }

    #[test]
    fn pods_map_to_the_adapters_that_select_or_hold_them() {
        let p = pod("a", true, Some("10.0.0.1"), "http");
        let by_label = adapter(LabelSelector {
            match_labels: Some([("app".to_string(), "srv".to_string())].into()),
            ..Default::default()
        });
        assert!(concerns(&by_label, &p));
        let by_expr = adapter(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "In".into(),
                values: Some(vec!["cpu".into()]),
            }]),
            ..Default::default()
        });
        assert!(!concerns(&by_expr, &p));
        let mut holding = by_expr.clone();
        holding.status = Some(LoraAdapterStatus {
            loaded_on: vec![LoadedOn {
                pod: "a".into(),
                pod_ip: "10.0.0.1".into(),
                since: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                pinned: false,
            }],
            ..Default::default()
        });
        assert!(
            concerns(&holding, &p),
            "a pod that holds the adapter must be looked at"
        );
        let mut elsewhere = by_label.clone();
        elsewhere.metadata.namespace = Some("other".into());
        assert!(!concerns(&elsewhere, &p));
    }
}
