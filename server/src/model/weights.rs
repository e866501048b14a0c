//! HF safetensors weights: single or sharded (`model.safetensors.index.json`), f32/bf16/f16,
//! converted to f32 host tensors keyed by their HF names.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Converts one safetensors view to an f32 tensor (F32, BF16 and F16 are accepted).
pub fn tensor_from_view(view: &TensorView<'_>) -> std::result::Result<Tensor, String> {
    let bytes = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => return Err(format!("dtype {other:?} is not supported (F32, BF16, F16)")),
    };
    Ok(Tensor::new(view.shape().to_vec(), data))
}

/// Loads every tensor of an HF model directory.
pub fn load_hf_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: invalid JSON: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Model(format!("{}: no weight_map", index.display())))?;
        let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else if dir.join("model.safetensors").exists() {
        vec![dir.join("model.safetensors")]
    } else {
        return Err(Error::Model(format!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        )));
    };
    let mut out = HashMap::new();
    for file in files {
        let f = std::fs::File::open(&file).map_err(|e| Error::io(&file, e))?;
        // SAFETY: the file is opened read-only and only read while the map lives.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&file, e))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::Model(format!("{}: not a safetensors file: {e}", file.display())))?;
        for (name, view) in st.tensors() {
            let t = tensor_from_view(&view)
                .map_err(|e| Error::Model(format!("{}: {name}: {e}", file.display())))?;
            out.insert(name, t);
        }
    }
    Ok(out)
}
