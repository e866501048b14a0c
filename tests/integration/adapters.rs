//! Adapter refusals: every bad adapter is refused with an error naming the file and the reason.

use std::path::Path;

use crate::common::fixture;
use loraplane_server::adapter::LoraAdapter;
use loraplane_server::model::ModelConfig;

fn config(model: &str) -> ModelConfig {
    ModelConfig::from_hf_file(&fixture(&format!("tiny/{model}/config.json"))).unwrap()
}

/// A writable copy of a fixture adapter.
fn copy_adapter(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture(&format!("tiny/adapters/{name}/{f}")), dir.path().join(f)).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Rewrites the adapter's weights through `edit(name, shape, values)`.
fn edit_weights(dir: &Path, edit: impl Fn(&str, &mut Vec<usize>, &mut Vec<f32>)) {
    let p = dir.join("adapter_model.safetensors");
    let tensors = crate::common::read_safetensors(&p);
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let mut shape = t.shape.clone();
        let mut vals: Vec<f32> = t.data.iter().map(|&v| v as f32).collect();
        edit(&name, &mut shape, &mut vals);
        owned.push((name, shape, vals.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &p).unwrap();
}

fn refusal(dir: &Path, cfg: &ModelConfig) -> String {
    match LoraAdapter::load("x", dir, cfg) {
        Ok(_) => panic!("{} was accepted", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_refused(dir: &Path, cfg: &ModelConfig, reason: &str) {
    let msg = refusal(dir, cfg);
    assert!(
        msg.contains(&dir.display().to_string()),
        "error does not name the path: {msg}"
    );
    assert!(msg.contains(reason), "error {msg:?} does not say {reason:?}");
}

#[test]
fn fixture_adapters_load_with_their_scaling_and_targets() {
    let cfg = config("llama");
    let a = LoraAdapter::load("all", &fixture("tiny/adapters/all_r16"), &cfg).unwrap();
    assert_eq!((a.rank, a.targets.len(), a.scaling), (16, 7, 0.5));
    let a = LoraAdapter::load("mlp", &fixture("tiny/adapters/mlp_r8_rslora"), &cfg).unwrap();
    assert_eq!(a.rank, 8);
    assert!(
        (a.scaling - 16.0 / 8f32.sqrt()).abs() < 1e-6,
        "rslora scaling {}",
        a.scaling
    );
    assert_eq!(
        a.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
        ["gate_proj", "up_proj", "down_proj"]
    );
}

#[test]
fn missing_paths_and_files_are_refused() {
    let cfg = config("llama");
    let missing = Path::new("/nonexistent/adapter");
    assert_refused(missing, &cfg, "does not exist");
    let file = fixture("tiny/adapters/qv_r2/adapter_config.json");
    assert_refused(&file, &cfg, "is a file");
    let d = copy_adapter("qv_r2");
    std::fs::remove_file(d.path().join("adapter_config.json")).unwrap();
    assert_refused(d.path(), &cfg, "adapter_config.json is missing");
    let d = copy_adapter("qv_r2");
    std::fs::remove_file(d.path().join("adapter_model.safetensors")).unwrap();
    assert_refused(d.path(), &cfg, "adapter_model.safetensors is missing");
}

#[test]
fn unsupported_configs_are_refused() {
    let cfg = config("llama");
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: [(&str, Edit); 5] = [
        ("use_dora", Box::new(|v| v["use_dora"] = true.into())),
        ("rank r must be positive", Box::new(|v| v["r"] = 0.into())),
        (
            "embed_tokens",
            Box::new(|v| v["target_modules"] = serde_json::json!(["q_proj", "embed_tokens"])),
        ),
        (
            "lm_head",
            Box::new(|v| v["target_modules"] = serde_json::json!(["lm_head"])),
        ),
        (
            "not selected by target_modules",
            Box::new(|v| v["target_modules"] = serde_json::json!(["k_proj"])),
        ),
    ];
    for (reason, edit) in cases {
        let d = copy_adapter("qv_r2");
        edit_config(d.path(), |v| edit(v));
        let msg = refusal(d.path(), &cfg);
        assert!(msg.contains(reason), "expected {reason:?}, got {msg:?}");
        assert!(
            msg.contains(&d.path().display().to_string()),
            "error does not name the path: {msg}"
        );
    }
}

#[test]
fn weights_that_do_not_fit_are_refused() {
    // qv_r2 targets v_proj with 2 kv heads; the mistral fixture has 1, so v_proj is narrower.
    let d = copy_adapter("qv_r2");
    assert_refused(d.path(), &config("mistral"), "does not match the base model");

    let d = copy_adapter("qv_r2");
    edit_weights(d.path(), |name, _, vals| {
        if name.contains("layers.1.self_attn.q_proj.lora_B") {
            vals[3] = f32::NAN;
        }
    });
    assert_refused(d.path(), &config("llama"), "NaN or infinite");

    let d = copy_adapter("qv_r2");
    edit_weights(d.path(), |name, shape, vals| {
        if name.contains("layers.0.self_attn.q_proj.lora_A") {
            shape[0] = 1;
            vals.truncate(vals.len() / 2);
        }
    });
    assert_refused(d.path(), &config("llama"), "does not match the base model");
}
