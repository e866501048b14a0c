//! Talking to loraplane servers: reading what a server has loaded (`GET /get_server_info`) and
//! loading or unloading one adapter (`POST /load_lora_adapter`, `POST /unload_lora_adapter`).
//! [`AdapterServers`] is the seam: [`HttpServers`] speaks HTTP to real pods, tests may fake it.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{json, Value};

use crate::{Error, Result};

/// An adapter as a server reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedAdapter {
    /// `lora_name`.
    pub name: String,
    /// `lora_path`.
    pub path: String,
    /// `pinned`.
    pub pinned: bool,
}

/// What one server reports about itself (`/get_server_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerState {
    /// `served_model_name`: the base model.
    pub served_model_name: String,
    /// `enable_lora`: adapters can be loaded at runtime.
    pub lora_enabled: bool,
    /// `max_loras_per_batch`: the adapter slot pool.
    pub max_loras_per_batch: usize,
    /// `loaded_adapters`.
    pub loaded: Vec<ServedAdapter>,
}

impl ServerState {
    /// The loaded adapter called `name`.
    pub fn find(&self, name: &str) -> Option<&ServedAdapter> {
        self.loaded.iter().find(|a| a.name == name)
    }

    /// Adapter slots not taken by a loaded adapter (negative when more adapters are loaded than
    /// the pool holds and they take turns).
    ///
    /// NB: the slot pool (`max_loras_per_batch`) is what adapters contend for in every batch;
    /// adapters beyond it still serve but swap in and out, so it is the capacity placement uses.
    pub fn free_slots(&self) -> i64 {
        self.max_loras_per_batch as i64 - self.loaded.len() as i64
    }

    /// Another adapter can be pinned: at most `max_loras_per_batch - 1` are.
    pub fn can_pin(&self) -> bool {
        let pinned = self.loaded.iter().filter(|a| a.pinned).count();
        pinned + 1 < self.max_loras_per_batch
    }

    /// Reads a `/get_server_info` answer.
    pub fn from_server_info(endpoint: &str, v: &Value) -> Result<ServerState> {
        let bad = |message: String| Error::ServerAnswer {
            endpoint: endpoint.to_string(),
            message,
        };
        let served_model_name = v["served_model_name"]
            .as_str()
            .ok_or_else(|| bad("/get_server_info has no served_model_name".into()))?
            .to_string();
        let max_loras_per_batch = v["max_loras_per_batch"]
            .as_u64()
            .ok_or_else(|| bad("/get_server_info has no max_loras_per_batch".into()))?
            as usize;
        let list = v["loaded_adapters"].as_array().ok_or_else(|| {
            bad("/get_server_info has no loaded_adapters list (is it a loraplane server?)".into())
        })?;
        let loaded = list
            .iter()
            .map(|a| {
                Ok(ServedAdapter {
                    name: a["lora_name"]
                        .as_str()
                        .ok_or_else(|| bad("a loaded adapter has no lora_name".into()))?
                        .to_string(),
                    path: a["lora_path"].as_str().unwrap_or_default().to_string(),
                    pinned: a["pinned"].as_bool().unwrap_or(false),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ServerState {
            served_model_name,
            lora_enabled: v["enable_lora"].as_bool().unwrap_or(true),
            max_loras_per_batch,
            loaded,
        })
    }
}

/// The calls the operator makes on a server, by endpoint (`http://IP:PORT`).
pub trait AdapterServers: Send + Sync {
    /// What the server serves and has loaded.
    fn state<'a>(&'a self, endpoint: &'a str) -> BoxFuture<'a, Result<ServerState>>;
    /// Loads `adapter` (the name must not be loaded).
    fn load<'a>(&'a self, endpoint: &'a str, adapter: &'a ServedAdapter) -> BoxFuture<'a, Result<()>>;
    /// Unloads the adapter called `name`.
    fn unload<'a>(&'a self, endpoint: &'a str, name: &'a str) -> BoxFuture<'a, Result<()>>;
}

/// [`AdapterServers`] over HTTP.
#[derive(Clone)]
pub struct HttpServers {
    client: reqwest::Client,
    api_key: Option<String>,
}

impl HttpServers {
    /// A client with `timeout` per call (loading a large adapter from disk takes a while) and an
    /// optional Bearer key for servers started with `--api-key`.
    pub fn new(timeout: Duration, api_key: Option<String>) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3).min(timeout))
            .timeout(timeout)
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            client,
            api_key: api_key.filter(|k| !k.is_empty()),
        })
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    /// Sends `req`; returns the status and the JSON body.
    async fn call(&self, endpoint: &str, req: reqwest::RequestBuilder) -> Result<(u16, Value)> {
        let unreachable = |e: reqwest::Error| Error::ServerUnreachable {
            endpoint: endpoint.to_string(),
            message: e.without_url().to_string(),
        };
        let resp = self.auth(req).send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(unreachable)?;
        let body = serde_json::from_str(&text).map_err(|_| Error::ServerAnswer {
            endpoint: endpoint.to_string(),
            message: format!("HTTP {status}, not JSON: {}", truncate(&text, 200)),
        })?;
        Ok((status, body))
    }

    /// `{success, error_message}` answers of load/unload.
    async fn manage(&self, endpoint: &str, action: &'static str, path: &str, body: Value) -> Result<()> {
        let req = self.client.post(format!("{endpoint}{path}")).json(&body);
        let (status, v) = self.call(endpoint, req).await?;
        if (200..300).contains(&status) && v["success"].as_bool() == Some(true) {
            return Ok(());
        }
        let message = v["error_message"]
            .as_str()
            .filter(|m| !m.is_empty())
            .or_else(|| v["error"]["message"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}: {}", truncate(&v.to_string(), 200)));
        Err(Error::ServerRefused {
            endpoint: endpoint.to_string(),
            action,
            message,
        })
    }
}

impl AdapterServers for HttpServers {
    fn state<'a>(&'a self, endpoint: &'a str) -> BoxFuture<'a, Result<ServerState>> {
        Box::pin(async move {
            let req = self.client.get(format!("{endpoint}/get_server_info"));
            let (status, v) = self.call(endpoint, req).await?;
            if status != 200 {
                return Err(Error::ServerAnswer {
                    endpoint: endpoint.to_string(),
                    message: format!(
                        "/get_server_info answered HTTP {status}: {}",
                        truncate(&v.to_string(), 200)
                    ),
                });
            }
            ServerState::from_server_info(endpoint, &v)
        })
    }

    fn load<'a>(&'a self, endpoint: &'a str, adapter: &'a ServedAdapter) -> BoxFuture<'a, Result<()>> {
        let body = json!({"lora_name": adapter.name, "lora_path": adapter.path, "pinned": adapter.pinned});
        Box::pin(self.manage(endpoint, "load", "/load_lora_adapter", body))
    }

    fn unload<'a>(&'a self, endpoint: &'a str, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.manage(
            endpoint,
            "unload",
            "/unload_lora_adapter",
            json!({"lora_name": name}),
        ))
    }
}

/// At most `n` characters of `s`.
pub(crate) fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> Value {
        json!({
            "served_model_name": "tiny", "enable_lora": true, "max_loras_per_batch": 3,
            "loaded_adapters": [
                {"lora_name": "a", "lora_path": "/x/a", "pinned": true},
                {"lora_name": "b", "lora_path": "/x/b", "pinned": false},
            ]
        })
    }

    #[test]
    fn server_info_is_read() {
        let s = ServerState::from_server_info("http://h:1", &info()).unwrap();
        assert_eq!(s.served_model_name, "tiny");
        assert_eq!(s.free_slots(), 1);
        assert!(s.can_pin(), "3 slots: at most 2 pinned, 1 is");
        assert_eq!(s.find("b").map(|a| a.path.as_str()), Some("/x/b"));
        let mut v = info();
        v["max_loras_per_batch"] = json!(2);
        assert!(!ServerState::from_server_info("e", &v).unwrap().can_pin());
    }

    #[test]
    fn answers_without_adapters_are_refused_by_name() {
        let mut v = info();
        v.as_object_mut().unwrap().remove("loaded_adapters");
        let e = ServerState::from_server_info("http://h:1", &v).unwrap_err();
        assert!(e.to_string().contains("loaded_adapters"), "{e}");
        assert!(e.to_string().contains("http://h:1"), "{e}");
    }

    #[test]
    fn truncate_counts_chars() {
        assert_eq!(truncate("héllo", 2), "hé...");
        assert_eq!(truncate("ab", 5), "ab");
    }
}
