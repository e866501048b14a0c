//! Shared helpers for the integration tests: fixture paths and reading reference safetensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("server/ has a parent")
        .to_path_buf()
}

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(rel)
}

/// The default model GGUF (SmolLM2-135M-Instruct), fetched by `scripts/fetch-default-model.sh`.
///
/// Panics with the command to run when it is missing: tests that need it must not pass silently.
pub fn default_gguf() -> PathBuf {
    let p = std::env::var_os("LORAPLANE_DEFAULT_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-default-model.sh (or set LORAPLANE_DEFAULT_GGUF)",
        p.display()
    );
    p
}

/// A tensor from the reference file: its shape and values as f64 (ids are exact in f64).
pub struct RefTensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f64>,
}

impl RefTensor {
    /// Values as token ids.
    pub fn ids(&self) -> Vec<u32> {
        self.data.iter().map(|&v| v as u32).collect()
    }
}

/// Reads every tensor of a safetensors file (F32, F16, BF16, I64, I32).
pub fn read_safetensors(path: &Path) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let b = v.data();
            let data: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F32 => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I32 => b
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::F16 => b
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
                safetensors::Dtype::BF16 => b
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
                d => panic!("{name}: unexpected dtype {d:?}"),
            };
            (
                name,
                RefTensor {
                    shape: v.shape().to_vec(),
                    data,
                },
            )
        })
        .collect()
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}
