//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, validated against the
//! base model at load so that a bad adapter is refused with a reason instead of failing mid-batch.
//!
//! An adapter contributes `y += s * (x Aᵀ) Bᵀ` to each targeted projection, with
//! `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA). Weights are never merged into the base.

mod peft_config;

use std::path::{Path, PathBuf};

pub use peft_config::{PeftConfig, TargetModules};

use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::tensor::Tensor;

/// The projections a LoRA adapter may target, in the order the forward pass applies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    /// `self_attn.q_proj`
    QProj,
    /// `self_attn.k_proj`
    KProj,
    /// `self_attn.v_proj`
    VProj,
    /// `self_attn.o_proj`
    OProj,
    /// `mlp.gate_proj`
    GateProj,
    /// `mlp.up_proj`
    UpProj,
    /// `mlp.down_proj`
    DownProj,
}

impl LoraTarget {
    /// Every supported target.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    /// The module's short name (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::QProj => "q_proj",
            LoraTarget::KProj => "k_proj",
            LoraTarget::VProj => "v_proj",
            LoraTarget::OProj => "o_proj",
            LoraTarget::GateProj => "gate_proj",
            LoraTarget::UpProj => "up_proj",
            LoraTarget::DownProj => "down_proj",
        }
    }

    /// Parses a short module name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The parent module in HF naming (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj | LoraTarget::OProj => "self_attn",
            _ => "mlp",
        }
    }

    /// Position in per-layer arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// `(in_features, out_features)` of the targeted projection.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        match self {
            LoraTarget::QProj => (c.hidden_size, c.q_dim()),
            LoraTarget::KProj | LoraTarget::VProj => (c.hidden_size, c.kv_dim()),
            LoraTarget::OProj => (c.q_dim(), c.hidden_size),
            LoraTarget::GateProj | LoraTarget::UpProj => (c.hidden_size, c.intermediate_size),
            LoraTarget::DownProj => (c.intermediate_size, c.hidden_size),
        }
    }
}

/// The two low-rank factors of one adapted projection.
#[derive(Clone, Debug)]
pub struct LoraWeights {
    /// Down-projection `A`: `[r, in_features]`.
    pub a: Tensor,
    /// Up-projection `B`: `[out_features, r]`.
    pub b: Tensor,
}

/// A loaded, validated LoRA adapter.
#[derive(Debug)]
pub struct LoraAdapter {
    /// Process-unique id of this copy of the weights: device slot pools key residency on it,
    /// so a reload (new weights under the same name) is never mistaken for the old copy.
    pub id: u64,
    /// The name requests use to select it.
    pub name: String,
    /// Directory it was loaded from.
    pub path: PathBuf,
    /// LoRA rank `r`.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f32,
    /// Factor applied to the low-rank product.
    pub scaling: f32,
    /// Targets present in at least one layer, sorted.
    pub targets: Vec<LoraTarget>,
    /// Per layer, per [`LoraTarget::index`], the factors when that projection is adapted.
    pub layers: Vec<[Option<LoraWeights>; 7]>,
}

fn next_adapter_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The scheme of random adapters made from their source alone (benchmarks).
pub const DUMMY_SCHEME: &str = "dummy://";

impl LoraAdapter {
    /// Loads the PEFT adapter in `dir` for a base model with `config`, or makes the random one
    /// a `dummy://` source describes (see [`LoraAdapter::from_dummy_source`]).
    pub fn load(name: &str, dir: &Path, config: &ModelConfig) -> Result<Self> {
        if let Some(query) = dir.to_str().and_then(|s| s.strip_prefix(DUMMY_SCHEME)) {
            return Self::from_dummy_source(name, query, config)
                .map_err(|reason| Error::adapter(dir, reason));
        }
        if !dir.exists() {
            return Err(Error::adapter(dir, "directory does not exist"));
        }
        if !dir.is_dir() {
            return Err(Error::adapter(
                dir,
                "is a file, expected a PEFT adapter directory",
            ));
        }
        let peft = PeftConfig::from_dir(dir)?;
        let scaling = peft.scaling();
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            let reason = if dir.join("adapter_model.bin").exists() {
                "adapter_model.bin (pickle) is not supported; save the adapter with safetensors"
            } else {
                "adapter_model.safetensors is missing"
            };
            return Err(Error::adapter(dir, reason));
        }
        let bytes = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::adapter(&weights_path, format!("not a safetensors file: {e}")))?;

        let mut layers: Vec<[Option<LoraWeights>; 7]> =
            (0..config.num_layers).map(|_| Default::default()).collect();
        let mut pending: std::collections::HashMap<(usize, LoraTarget), (Option<Tensor>, Option<Tensor>)> =
            Default::default();
        for (key, view) in st.tensors() {
            let (layer, target, is_a) =
                parse_key(&key).map_err(|reason| Error::adapter(&weights_path, reason))?;
            if layer >= config.num_layers {
                return Err(Error::adapter(
                    &weights_path,
                    format!(
                        "{key}: layer {layer} does not exist (base model has {} layers)",
                        config.num_layers
                    ),
                ));
            }
            if !peft.targets_module(layer, target) {
                return Err(Error::adapter(
                    &weights_path,
                    format!(
                        "{key}: module is not selected by target_modules {}",
                        peft.target_modules
                    ),
                ));
            }
            let t = crate::model::weights::tensor_from_view(&view)
                .map_err(|reason| Error::adapter(&weights_path, format!("{key}: {reason}")))?;
            if !t.all_finite() {
                return Err(Error::adapter(
                    &weights_path,
                    format!("{key}: contains NaN or infinite values"),
                ));
            }
            let (in_f, out_f) = target.shape(config);
            let want = if is_a {
                vec![peft.r, in_f]
            } else {
                vec![out_f, peft.r]
            };
            if t.shape != want {
                return Err(Error::adapter(
                    &weights_path,
                    format!(
                        "{key}: shape {:?} does not match the base model (expected {want:?} for r={})",
                        t.shape, peft.r
                    ),
                ));
            }
            let slot = pending.entry((layer, target)).or_default();
            if is_a {
                slot.0 = Some(t);
            } else {
                slot.1 = Some(t);
            }
        }
        let mut targets = std::collections::BTreeSet::new();
        for ((layer, target), pair) in pending {
            match pair {
                (Some(a), Some(b)) => {
                    targets.insert(target);
                    layers[layer][target.index()] = Some(LoraWeights { a, b });
                }
                (a, _) => {
                    let missing = if a.is_none() { "lora_A" } else { "lora_B" };
                    return Err(Error::adapter(
                        &weights_path,
                        format!("layer {layer} {}: {missing} weight is missing", target.name()),
                    ));
                }
            }
        }
        if targets.is_empty() {
            return Err(Error::adapter(&weights_path, "contains no LoRA weights"));
        }
        Ok(Self {
            id: next_adapter_id(),
            name: name.to_string(),
            path: dir.to_path_buf(),
            rank: peft.r,
            alpha: peft.lora_alpha,
            scaling,
            targets: targets.into_iter().collect(),
            layers,
        })
    }

    /// The random adapter of `dummy://?rank=R&targets=T,...&seed=S` (the part after the
    /// scheme is `query`; every key is optional): rank 16, every target and a seed taken from
    /// `name` unless given, so adapters of different names differ and a reload is identical.
    pub fn from_dummy_source(
        name: &str,
        source: &str,
        config: &ModelConfig,
    ) -> std::result::Result<Self, String> {
        let query = match source.strip_prefix('?') {
            Some(q) => q,
            None if source.is_empty() => "",
            None => return Err(format!("expected {DUMMY_SCHEME}?rank=R&targets=T,...&seed=S")),
        };
        let (mut rank, mut targets, mut seed) = (16, LoraTarget::ALL.to_vec(), None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            match key {
                "rank" => {
                    rank = value
                        .parse()
                        .ok()
                        .filter(|r| (1..=1024).contains(r))
                        .ok_or_else(|| format!("rank {value:?} is not a whole number from 1 to 1024"))?;
                }
                "targets" if value == "all" => targets = LoraTarget::ALL.to_vec(),
                "targets" => {
                    targets = value
                        .split(',')
                        .map(|t| {
                            LoraTarget::from_name(t).ok_or_else(|| {
                                let names: Vec<_> = LoraTarget::ALL.iter().map(|t| t.name()).collect();
                                format!(
                                    "unknown target {t:?} (expected all or some of {})",
                                    names.join(",")
                                )
                            })
                        })
                        .collect::<std::result::Result<_, _>>()?;
                }
                "seed" => {
                    seed = Some(
                        value
                            .parse()
                            .map_err(|_| format!("seed {value:?} is not a whole number"))?,
                    )
                }
                other => return Err(format!("unknown key {other:?} (expected rank, targets, seed)")),
            }
        }
        // FNV-1a of the name.
        let seed = seed.unwrap_or_else(|| {
            name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
            })
        });
        let mut a = Self::dummy(name, config, rank, &targets, seed);
        a.path = PathBuf::from(format!("{DUMMY_SCHEME}{source}"));
        Ok(a)
    }

    /// A random adapter of rank `rank` on `targets` (for benchmarks and `--load-format dummy`).
    ///
    /// Values come from a fixed-seed generator, scaled so the delta is small but not zero.
    pub fn dummy(name: &str, config: &ModelConfig, rank: usize, targets: &[LoraTarget], seed: u64) -> Self {
        use rayon::prelude::*;
        // A stream per layer, so that layers generate in parallel (an 8B-shaped rank-16 adapter
        // is 42 M values) and the values do not depend on the thread count.
        let layers = (0..config.num_layers)
            .into_par_iter()
            .map(|li| {
                // Layers' streams differ by a large odd multiple, so small seeds (1, 2, ...) never
                // share a layer's stream.
                let mut state = (seed ^ (li as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(1);
                let mut next = move || {
                    // xorshift64*: cheap, deterministic, good enough for benchmark weights.
                    state ^= state >> 12;
                    state ^= state << 25;
                    state ^= state >> 27;
                    let v = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
                    (v >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                };
                let mut rand = |shape: Vec<usize>, scale: f32| {
                    let n = shape.iter().product();
                    Tensor::new(shape, (0..n).map(|_| next() * scale).collect())
                };
                let mut l: [Option<LoraWeights>; 7] = Default::default();
                for &t in targets {
                    let (in_f, out_f) = t.shape(config);
                    l[t.index()] = Some(LoraWeights {
                        a: rand(vec![rank, in_f], 0.1),
                        b: rand(vec![out_f, rank], 0.1),
                    });
                }
                l
            })
            .collect();
        let mut targets = targets.to_vec();
        targets.sort();
        targets.dedup();
        Self {
            id: next_adapter_id(),
            name: name.to_string(),
            path: PathBuf::from(format!("dummy://{name}")),
            rank,
            alpha: rank as f32,
            scaling: 1.0,
            targets,
            layers,
        }
    }

    /// Writes this adapter as a PEFT directory (`adapter_config.json` + f32
    /// `adapter_model.safetensors`) that [`LoraAdapter::load`] and PEFT itself can read.
    pub fn save_peft(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "r": self.rank,
            "lora_alpha": self.scaling * self.rank as f32,
            "use_rslora": false,
            "target_modules": self.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "bias": "none",
        });
        let path = dir.join("adapter_config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&config).expect("valid JSON"))
            .map_err(|e| Error::io(&path, e))?;
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for t in LoraTarget::ALL {
                let Some(w) = &layer[t.index()] else { continue };
                let prefix = format!("base_model.model.model.layers.{i}.{}.{}", t.parent(), t.name());
                for (name, tensor) in [("lora_A", &w.a), ("lora_B", &w.b)] {
                    let bytes = tensor.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                    owned.push((format!("{prefix}.{name}.weight"), tensor.shape.clone(), bytes));
                }
            }
        }
        let views = owned.iter().map(|(n, shape, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .expect("shape matches data");
            (n.clone(), view)
        });
        let path = dir.join("adapter_model.safetensors");
        safetensors::serialize_to_file(views, None, &path)
            .map_err(|e| Error::adapter(dir, format!("cannot write safetensors: {e}")))
    }

    /// Bytes of weights this adapter holds (for memory caps).
    pub fn size_bytes(&self) -> usize {
        let per_weights = |w: &LoraWeights| (w.a.data.len() + w.b.data.len()) * std::mem::size_of::<f32>();
        self.layers.iter().flatten().flatten().map(per_weights).sum()
    }
}

/// Splits a PEFT tensor name into (layer, target, is_lora_A).
///
/// Accepts `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}[.{adapter}].weight`.
fn parse_key(key: &str) -> std::result::Result<(usize, LoraTarget, bool), String> {
    let unsupported = || {
        format!(
            "tensor {key:?} is not a supported LoRA weight (supported targets: {})",
            LoraTarget::ALL.map(|t| t.name()).join(", ")
        )
    };
    let rest = key
        .strip_prefix("base_model.model.model.layers.")
        .or_else(|| key.strip_prefix("base_model.model.layers."))
        .ok_or_else(unsupported)?;
    let parts: Vec<&str> = rest.split('.').collect();
    // [i, parent, proj, lora_X, (adapter_name,)? weight]
    if parts.len() < 5 || parts.last() != Some(&"weight") {
        return Err(unsupported());
    }
    let layer: usize = parts[0].parse().map_err(|_| unsupported())?;
    let target = LoraTarget::from_name(parts[2]).ok_or_else(unsupported)?;
    if parts[1] != target.parent() {
        return Err(unsupported());
    }
    let is_a = match parts[3] {
        "lora_A" => true,
        "lora_B" => false,
        "lora_magnitude_vector" => return Err(format!("tensor {key:?}: DoRA is not supported")),
        _ => return Err(unsupported()),
    };
    if parts.len() > 6 {
        return Err(unsupported());
    }
    Ok((layer, target, is_a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dummy_sources_make_seeded_adapters_and_name_their_problems() {
        let config = ModelConfig::tiny_for_tests();
        let load = |name: &str, src: &str| LoraAdapter::load(name, Path::new(src), &config);
        let a = load("a", "dummy://").unwrap();
        assert_eq!(
            (a.rank, a.targets.as_slice(), a.scaling),
            (16, &LoraTarget::ALL[..], 1.0)
        );
        assert_eq!(a.path, Path::new("dummy://"));
        // The name seeds the weights: the same name gives the same adapter, another name another.
        let q = |x: &LoraAdapter| x.layers[1][0].as_ref().unwrap().a.data.clone();
        assert_eq!(q(&a), q(&load("a", "dummy://?").unwrap()));
        assert_ne!(q(&a), q(&load("b", "dummy://").unwrap()));
        let b = load("b", "dummy://?rank=4&targets=q_proj,down_proj&seed=3").unwrap();
        assert_eq!(
            (b.rank, b.targets.as_slice()),
            (4, &[LoraTarget::QProj, LoraTarget::DownProj][..])
        );
        let same = LoraAdapter::dummy("b", &config, 4, &[LoraTarget::QProj, LoraTarget::DownProj], 3);
        assert_eq!(q(&b), q(&same));
        assert!(b.layers[0][LoraTarget::VProj.index()].is_none());
        for (src, why) in [
            (
                "dummy://?rank=0",
                "rank \"0\" is not a whole number from 1 to 1024",
            ),
            ("dummy://?rank=x", "rank \"x\""),
            ("dummy://?targets=q_proj,lm_head", "unknown target \"lm_head\""),
            ("dummy://?seed=-1", "seed \"-1\""),
            ("dummy://?ranks=4", "unknown key \"ranks\""),
            ("dummy://?rank", "\"rank\" is not key=value"),
            ("dummy://r16", "expected dummy://?rank=R"),
        ] {
            let e = load("x", src).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(src), "{src}: {e}");
        }
    }

    #[test]
    fn dummy_adapters_round_trip_through_peft_files() {
        let config = ModelConfig::tiny_for_tests();
        let a = LoraAdapter::dummy("d", &config, 4, &[LoraTarget::QProj, LoraTarget::DownProj], 3);
        let dir = std::env::temp_dir().join(format!("loraplane-dummy-{}", std::process::id()));
        a.save_peft(&dir).unwrap();
        let b = LoraAdapter::load("d", &dir, &config).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((b.rank, b.scaling, &b.targets), (4, 1.0, &a.targets));
        let (wa, wb) = (
            a.layers[1][LoraTarget::DownProj.index()].as_ref().unwrap(),
            b.layers[1][6].as_ref().unwrap(),
        );
        assert_eq!((&wa.a, &wa.b), (&wb.a, &wb.b));
    }

    #[test]
    fn parses_peft_tensor_names() {
        assert_eq!(
            parse_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight").unwrap(),
            (3, LoraTarget::QProj, true)
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight").unwrap(),
            (0, LoraTarget::DownProj, false)
        );
        assert!(parse_key("base_model.model.lm_head.lora_A.weight")
            .unwrap_err()
            .contains("not a supported"));
        assert!(parse_key("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight").is_err());
        assert!(parse_key("base_model.model.model.embed_tokens.lora_embedding_A").is_err());
    }
}
