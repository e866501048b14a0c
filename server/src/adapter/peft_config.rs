//! `adapter_config.json`: the subset of PEFT's `LoraConfig` that decides how an adapter applies.

use std::fmt;
use std::path::Path;

use regex::Regex;
use serde::Deserialize;

use super::LoraTarget;
use crate::error::{Error, Result};

/// Which modules an adapter targets, as PEFT writes `target_modules`.
#[derive(Clone, Debug)]
pub enum TargetModules {
    /// Module names; a module matches when its full name equals one or ends with `.{name}`
    /// (PEFT's rule, so both `q_proj` and `model.layers.0.self_attn.q_proj` work).
    List(Vec<String>),
    /// A regex that must match the full module name (`model.layers.0.self_attn.q_proj`).
    Regex(Regex),
    /// `"all-linear"`: every linear layer but the output head.
    AllLinear,
}

impl fmt::Display for TargetModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetModules::List(l) => write!(f, "{l:?}"),
            TargetModules::Regex(r) => write!(f, "{:?}", r.as_str()),
            TargetModules::AllLinear => f.write_str("\"all-linear\""),
        }
    }
}

/// The parsed and validated adapter configuration.
#[derive(Clone, Debug)]
pub struct PeftConfig {
    /// Rank.
    pub r: usize,
    /// `lora_alpha`.
    pub lora_alpha: f32,
    /// rsLoRA scaling (`alpha / sqrt(r)`).
    pub use_rslora: bool,
    /// Selected modules.
    pub target_modules: TargetModules,
    /// `layers_to_transform`, when PEFT restricted the adapter to some layers.
    pub layers_to_transform: Option<Vec<usize>>,
    /// `base_model_name_or_path`, informational.
    pub base_model_name_or_path: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    r: Option<i64>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    target_modules: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
    modules_to_save: Option<serde_json::Value>,
    layers_to_transform: Option<serde_json::Value>,
    bias: Option<String>,
    #[serde(default)]
    lora_bias: bool,
    exclude_modules: Option<serde_json::Value>,
    layer_replication: Option<serde_json::Value>,
    #[serde(default)]
    fan_in_fan_out: bool,
    base_model_name_or_path: Option<String>,
}

impl PeftConfig {
    /// Reads and validates `dir/adapter_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        if !path.exists() {
            return Err(Error::adapter(dir, "adapter_config.json is missing"));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::parse(&text).map_err(|reason| Error::adapter(&path, reason))
    }

    /// Parses the text of an `adapter_config.json`.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        if let Some(t) = &raw.peft_type {
            if t != "LORA" {
                return Err(format!("peft_type {t:?} is not supported (only LORA)"));
            }
        }
        if raw.use_dora {
            return Err(
                "use_dora is not supported (DoRA adapters need a magnitude vector per module)".into(),
            );
        }
        let r = raw.r.ok_or("missing r")?;
        if r <= 0 {
            return Err(format!("rank r must be positive, got {r}"));
        }
        let r = r as usize;
        let lora_alpha = raw.lora_alpha.unwrap_or(8.0) as f32;
        if !lora_alpha.is_finite() {
            return Err("lora_alpha must be finite".into());
        }
        if !raw.rank_pattern.is_empty() || !raw.alpha_pattern.is_empty() {
            return Err("rank_pattern/alpha_pattern (per-module ranks) are not supported yet".into());
        }
        if raw.fan_in_fan_out {
            return Err("fan_in_fan_out=true is not supported (Conv1D-style weights)".into());
        }
        if let Some(b) = &raw.bias {
            if b != "none" {
                return Err(format!("bias={b:?} is not supported (only \"none\")"));
            }
        }
        if raw.lora_bias {
            return Err("lora_bias=true is not supported".into());
        }
        for (key, value) in [
            ("exclude_modules", &raw.exclude_modules),
            ("layer_replication", &raw.layer_replication),
        ] {
            if !matches!(value, None | Some(serde_json::Value::Null)) {
                return Err(format!("{key} is not supported yet"));
            }
        }
        match &raw.modules_to_save {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(a)) if a.is_empty() => {}
            Some(v) => {
                return Err(format!(
                    "modules_to_save {v} is not supported (fully trained modules)"
                ))
            }
        }
        let layers_to_transform = match raw.layers_to_transform {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => {
                Some(vec![n.as_u64().ok_or("bad layers_to_transform")? as usize])
            }
            Some(serde_json::Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_u64().map(|n| n as usize).ok_or("bad layers_to_transform"))
                    .collect::<std::result::Result<_, _>>()?,
            ),
            Some(v) => return Err(format!("bad layers_to_transform {v}")),
        };
        let target_modules = parse_targets(raw.target_modules.as_ref().ok_or("missing target_modules")?)?;
        Ok(Self {
            r,
            lora_alpha,
            use_rslora: raw.use_rslora,
            target_modules,
            layers_to_transform,
            base_model_name_or_path: raw.base_model_name_or_path,
        })
    }

    /// The factor on the low-rank product.
    pub fn scaling(&self) -> f32 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f32).sqrt()
        } else {
            self.lora_alpha / self.r as f32
        }
    }

    /// Whether this config selects `target` in `layer`.
    pub fn targets_module(&self, layer: usize, target: LoraTarget) -> bool {
        if let Some(layers) = &self.layers_to_transform {
            if !layers.contains(&layer) {
                return false;
            }
        }
        match &self.target_modules {
            TargetModules::List(l) => {
                let full = module_name(layer, target);
                l.iter().any(|t| full == *t || full.ends_with(&format!(".{t}")))
            }
            TargetModules::AllLinear => true,
            TargetModules::Regex(re) => re.is_match(&module_name(layer, target)),
        }
    }
}

/// Full module name as PEFT sees it on a `*ForCausalLM`.
fn module_name(layer: usize, target: LoraTarget) -> String {
    format!("model.layers.{layer}.{}.{}", target.parent(), target.name())
}

/// Modules a regex might select that loraplane cannot adapt.
const UNSUPPORTED_MODULES: [&str; 2] = ["model.embed_tokens", "lm_head"];

fn parse_targets(v: &serde_json::Value) -> std::result::Result<TargetModules, String> {
    let supported = || LoraTarget::ALL.map(|t| t.name()).join(", ");
    match v {
        serde_json::Value::String(s) if s == "all-linear" => Ok(TargetModules::AllLinear),
        serde_json::Value::String(s) => {
            // PEFT uses re.fullmatch.
            let re =
                Regex::new(&format!("^(?:{s})$")).map_err(|e| format!("target_modules regex {s:?}: {e}"))?;
            if let Some(m) = UNSUPPORTED_MODULES.iter().find(|m| re.is_match(m)) {
                return Err(format!(
                    "target_modules {s:?} selects {m}, which is not supported (supported: {})",
                    supported()
                ));
            }
            if !(0..4096).any(|l| LoraTarget::ALL.iter().any(|t| re.is_match(&module_name(l, *t)))) {
                return Err(format!(
                    "target_modules {s:?} selects none of the supported modules ({})",
                    supported()
                ));
            }
            Ok(TargetModules::Regex(re))
        }
        serde_json::Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                let name = item
                    .as_str()
                    .ok_or_else(|| format!("target_modules item {item} is not a string"))?;
                // PEFT matches suffixes; the last component names the projection.
                let short = name.rsplit('.').next().unwrap_or(name);
                if LoraTarget::from_name(short).is_none() {
                    return Err(format!(
                        "target module {name:?} is not supported (supported: {})",
                        supported()
                    ));
                }
                if !out.iter().any(|o| o == name) {
                    out.push(name.to_string());
                }
            }
            if out.is_empty() {
                return Err("target_modules is empty".into());
            }
            Ok(TargetModules::List(out))
        }
        other => Err(format!(
            "target_modules must be a list, a regex string or \"all-linear\", got {other}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> std::result::Result<PeftConfig, String> {
        PeftConfig::parse(json)
    }

    #[test]
    fn scaling_plain_and_rslora() {
        let c = parse(r#"{"r":8,"lora_alpha":16,"target_modules":["q_proj"]}"#).unwrap();
        assert_eq!(c.scaling(), 2.0);
        let c = parse(r#"{"r":16,"lora_alpha":8,"use_rslora":true,"target_modules":"all-linear"}"#).unwrap();
        assert_eq!(c.scaling(), 2.0);
    }

    #[test]
    fn regex_targets_use_full_match() {
        let c = parse(r#"{"r":2,"lora_alpha":2,"target_modules":".*\\.mlp\\.(gate_proj|up_proj)"}"#).unwrap();
        assert!(c.targets_module(0, LoraTarget::GateProj));
        assert!(!c.targets_module(0, LoraTarget::DownProj));
        assert!(!c.targets_module(0, LoraTarget::QProj));
    }

    #[test]
    fn list_targets_match_suffixes_like_peft() {
        let c = parse(
            r#"{"r":2,"lora_alpha":2,"target_modules":["model.layers.1.self_attn.q_proj","down_proj"]}"#,
        )
        .unwrap();
        assert!(c.targets_module(1, LoraTarget::QProj));
        assert!(
            !c.targets_module(0, LoraTarget::QProj),
            "full paths select one layer"
        );
        assert!(c.targets_module(0, LoraTarget::DownProj) && c.targets_module(5, LoraTarget::DownProj));
    }

    #[test]
    fn refusals_name_the_reason() {
        let cases = [
            (
                r#"{"r":0,"lora_alpha":1,"target_modules":["q_proj"]}"#,
                "rank r must be positive",
            ),
            (
                r#"{"r":4,"lora_alpha":1,"use_dora":true,"target_modules":["q_proj"]}"#,
                "use_dora",
            ),
            (
                r#"{"r":4,"lora_alpha":1,"target_modules":["embed_tokens"]}"#,
                "embed_tokens",
            ),
            (
                r#"{"r":4,"lora_alpha":1,"target_modules":["q_proj","lm_head"]}"#,
                "lm_head",
            ),
            (
                r#"{"r":4,"lora_alpha":1,"target_modules":".*lm_head"}"#,
                "lm_head",
            ),
            (r#"{"r":4,"lora_alpha":1,"target_modules":"foo"}"#, "selects none"),
            (
                r#"{"r":4,"lora_alpha":1,"target_modules":["q_proj"],"modules_to_save":["lm_head"]}"#,
                "modules_to_save",
            ),
            (r#"{"r":4,"target_modules":["q_proj"],"peft_type":"IA3"}"#, "IA3"),
            (r#"{"r":4,"lora_alpha":1}"#, "missing target_modules"),
            ("{not json", "invalid JSON"),
        ];
        for (json, want) in cases {
            let e = parse(json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
    }
}
