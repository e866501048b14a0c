//! CUDA kernels for loraplane's GPU backend: `.cu` sources compiled at run time with NVRTC.
//!
//! [`Kernels::load`] compiles the sources once per process (the PTX is also cached on disk,
//! keyed by a hash of the source and the target architecture), loads the module and hands out
//! functions by name. Kernels are templates over the activation type, exported with the suffixes
//! in [`TYPE_SUFFIXES`]; see `llama.cu`, `flash_attention.cu`, `decode_attention.cu`, `lora_mma.cu`
//! and `sampling.cu` for each kernel's contract. The files are compiled as one program ([`source`]).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

/// The Llama-family kernels (embedding, RMSNorm, RoPE + paged KV write, SiLU-and-multiply, paged
/// GQA attention, KV gather and causal softmax for GEMM prefill attention, LoRA shrink/expand over
/// work items, argmax, dummy-weight fill).
pub const LLAMA_CU: &str = include_str!("llama.cu");

/// The activation types every typed kernel is instantiated for: float32, bfloat16, float16.
pub const TYPE_SUFFIXES: &[&str] = &["f32", "bf16", "f16"];

/// Token sampling on the device (greedy, temperature, top-k, top-p, min-p) and the gather of the
/// logits rows the host still needs.
pub const SAMPLING_CU: &str = include_str!("sampling.cu");

/// Flash-style causal prefill attention over the paged KV cache on tensor cores (bf16 and f16
/// only; uses `llama.cu`'s helpers).
pub const FLASH_ATTENTION_CU: &str = include_str!("flash_attention.cu");

/// Paged decode attention on tensor cores (bf16 and f16 only; uses `llama.cu`'s and
/// `flash_attention.cu`'s helpers).
pub const DECODE_ATTENTION_CU: &str = include_str!("decode_attention.cu");

/// LoRA shrink and expand on tensor cores (bf16 and f16 only; uses `llama.cu`'s and
/// `flash_attention.cu`'s helpers).
pub const LORA_MMA_CU: &str = include_str!("lora_mma.cu");

/// The whole program NVRTC compiles: `llama.cu`, `flash_attention.cu`, `decode_attention.cu`,
/// `lora_mma.cu`, then `sampling.cu`, each under its own file name for compiler messages.
pub fn source() -> String {
    format!(
        "#line 1 \"llama.cu\"\n{LLAMA_CU}\n#line 1 \"flash_attention.cu\"\n{FLASH_ATTENTION_CU}\n\
         #line 1 \"decode_attention.cu\"\n{DECODE_ATTENTION_CU}\n\
         #line 1 \"lora_mma.cu\"\n{LORA_MMA_CU}\n#line 1 \"sampling.cu\"\n{SAMPLING_CU}"
    )
}

/// Largest pool rank the tensor-core LoRA kernels take: their expand stages 16 rows of `y` for up
/// to three targets in shared memory.
pub const LORA_MMA_MAX_RANK: usize = 256;

/// The tensor-core LoRA kernels (`lora_mma.cu`) are built for these element types only.
pub fn lora_mma_built_for(suffix: &str) -> bool {
    matches!(suffix, "bf16" | "f16")
}

/// Head sizes `flash_attention.cu` is built for (a multiple of the 16-wide tensor-core step).
pub const FLASH_HEAD_DIMS: &[usize] = &[16, 32, 64, 128];

/// The flash prefill kernel for element type `suffix` and head size `head_dim`, where one is
/// built: `flash_attention_{bf16,f16}_d{16,32,64,128}`.
pub fn flash_attention_kernel(suffix: &str, head_dim: usize) -> Option<String> {
    (matches!(suffix, "bf16" | "f16") && FLASH_HEAD_DIMS.contains(&head_dim))
        .then(|| format!("flash_attention_{suffix}_d{head_dim}"))
}

/// Most query heads per kv head `decode_attention.cu` takes (DA_MAX_GROUP: rows of the mma's 16).
pub const DECODE_ATTENTION_MAX_GROUP: usize = 8;

/// The tensor-core decode attention kernel for element type `suffix`, head size `head_dim` and
/// `group` query heads per kv head, where one is built: `decode_attention_{bf16,f16}_d{16,32,64,128}`.
pub fn decode_attention_kernel(suffix: &str, head_dim: usize, group: usize) -> Option<String> {
    (matches!(suffix, "bf16" | "f16")
        && FLASH_HEAD_DIMS.contains(&head_dim)
        && (1..=DECODE_ATTENTION_MAX_GROUP).contains(&group))
    .then(|| format!("decode_attention_{suffix}_d{head_dim}"))
}

/// Every kernel name `llama.cu` exports, without the type suffix.
pub const TYPED_KERNELS: &[&str] = &[
    "embed",
    "rms_norm",
    "rope_cache",
    "silu_mul",
    "add_bias",
    "fill_uniform",
    "gather_kv",
    "causal_softmax",
];

/// Kernels that exist in one version only.
pub const UNTYPED_KERNELS: &[&str] = &["argmax_f32", "rope_table_f32"];

/// The kernels `sampling.cu` exports (f32 logits only).
pub const SAMPLING_KERNELS: &[&str] = &[
    "sample_f32",
    "penalize_f32",
    "gather_rows_f32",
    "top_logprobs_f32",
];

/// Kernel families with compile-time shape variants: `{name}_{type}_{variant}`.
pub const VARIANT_KERNELS: &[(&str, &[&str])] = &[
    (
        "attention",
        &[
            "g1_d1", "g1_d2", "g1_d4", "g1_d8", "g2_d1", "g2_d2", "g2_d4", "g2_d8", "g4_d1", "g4_d2",
            "g4_d4", "g4_d8", "g8_d1", "g8_d2", "g8_d4", "g8_d8",
        ],
    ),
    ("lora_expand", &["c1", "vec"]),
    ("lora_expand_store", &["c1", "vec"]),
    ("lora_shrink", &["kw1", "kw4"]),
];

/// Every exported kernel name, with its suffixes: what [`Kernels::load`] loads.
pub fn kernel_names() -> Vec<String> {
    let variants = VARIANT_KERNELS.iter().flat_map(|(k, vs)| {
        vs.iter()
            .flat_map(move |v| TYPE_SUFFIXES.iter().map(move |t| format!("{k}_{t}_{v}")))
    });
    TYPED_KERNELS
        .iter()
        .flat_map(|k| TYPE_SUFFIXES.iter().map(move |t| format!("{k}_{t}")))
        .chain(UNTYPED_KERNELS.iter().map(|s| s.to_string()))
        .chain(SAMPLING_KERNELS.iter().map(|s| s.to_string()))
        .chain(variants)
        .chain(["bf16", "f16"].iter().flat_map(|t| {
            FLASH_HEAD_DIMS
                .iter()
                .filter_map(move |&d| flash_attention_kernel(t, d))
        }))
        .chain(["bf16", "f16"].iter().flat_map(|t| {
            FLASH_HEAD_DIMS
                .iter()
                .filter_map(move |&d| decode_attention_kernel(t, d, 1))
        }))
        .chain(["bf16", "f16"].iter().flat_map(|t| {
            ["lora_shrink", "lora_expand", "lora_expand_store"].map(|k| format!("{k}_mma_{t}"))
        }))
        .collect()
}

/// The loaded module and its functions.
pub struct Kernels {
    _module: Arc<CudaModule>,
    funcs: HashMap<String, CudaFunction>,
}

impl Kernels {
    /// Compiles (or reads cached PTX) for the device of `ctx` and loads every kernel.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self, String> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| format!("reading the compute capability: {e}"))?;
        // sm_90a unlocks Hopper-only instructions; other chips get their plain target.
        let arch: &'static str = match (major, minor) {
            (9, 0) => "sm_90a",
            (8, 0) => "sm_80",
            (8, 6) => "sm_86",
            (8, 9) => "sm_89",
            (10, 0) => "sm_100",
            (12, 0) => "sm_120",
            _ => {
                return Err(format!(
                    "compute capability {major}.{minor} is not supported (needs 8.0 or newer)"
                ))
            }
        };
        let ptx = cached_ptx(arch)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| format!("loading the kernel module: {e}"))?;
        let mut funcs = HashMap::new();
        for name in kernel_names() {
            let f = module
                .load_function(&name)
                .map_err(|e| format!("kernel {name}: {e}"))?;
            funcs.insert(name, f);
        }
        Ok(Self {
            _module: module,
            funcs,
        })
    }

    /// The function `name` (with its type suffix); panics on a name the sources do not export,
    /// which is a programming error caught by the first GPU test.
    pub fn get(&self, name: &str) -> &CudaFunction {
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("no kernel named {name}"))
    }
}

fn cuda_include_dir() -> String {
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = std::env::var(var) {
            return format!("{p}/include");
        }
    }
    "/usr/local/cuda/include".to_string()
}

/// PTX for `arch`, from `$XDG_CACHE_HOME/loraplane` (or `~/.cache`) when a previous process
/// compiled the same source, else compiled now (about a second) and written there.
fn cached_ptx(arch: &'static str) -> Result<Ptx, String> {
    let src = source();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&src, arch).hash(&mut h);
    let key = format!("llama-{arch}-{:016x}.ptx", h.finish());
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("loraplane"));
    if let Some(path) = dir.as_ref().map(|d| d.join(&key)) {
        if let Ok(src) = std::fs::read_to_string(&path) {
            return Ok(Ptx::from_src(src));
        }
    }
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: vec![cuda_include_dir()],
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(&src, opts).map_err(|e| format!("NVRTC compile failed: {e}"))?;
    if let Some(d) = dir {
        // Best effort: a read-only home only costs a recompile next time.
        if std::fs::create_dir_all(&d).is_ok() {
            let _ = std::fs::write(d.join(&key), ptx.to_src());
        }
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain (non-macro) kernels each source defines, so one missing from the lists above
    /// fails here rather than as a panic on the first GPU launch.
    #[test]
    fn every_plain_kernel_in_the_sources_is_loaded() {
        let names = kernel_names();
        let src = source();
        let mut seen = 0;
        for def in src.split("extern \"C\" __global__").skip(1) {
            let mut rest = def.trim_start().strip_prefix("void").unwrap_or(def).trim_start();
            if let Some(after) = rest.strip_prefix("__launch_bounds__(") {
                // The name may follow on the macro's next line.
                rest = after
                    .split_once(')')
                    .map_or(after, |(_, r)| r)
                    .trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '#')
                .collect();
            if name.contains('#') {
                continue; // a macro's template, checked through its instantiations
            }
            assert!(names.contains(&name), "{name} is defined but not loaded");
            seen += 1;
        }
        assert!(seen >= 6, "found only {seen} plain kernels");
    }

    #[test]
    fn flash_kernels_exist_only_for_half_types_and_tensor_core_head_sizes() {
        assert_eq!(
            flash_attention_kernel("bf16", 128).as_deref(),
            Some("flash_attention_bf16_d128")
        );
        assert_eq!(
            flash_attention_kernel("f16", 64).as_deref(),
            Some("flash_attention_f16_d64")
        );
        // f32 and head sizes the kernel is not built for fall back to GEMM attention.
        assert_eq!(flash_attention_kernel("f32", 128), None);
        assert_eq!(flash_attention_kernel("bf16", 96), None);
        assert_eq!(flash_attention_kernel("bf16", 256), None);
        // Kernels::load asks for every instantiated variant, and the source defines each one.
        let names = kernel_names();
        let src = source();
        for t in ["bf16", "f16"] {
            for &d in FLASH_HEAD_DIMS {
                let name = format!("flash_attention_{t}_d{d}");
                assert!(names.contains(&name), "{name} not loaded");
                assert!(
                    src.contains(&format!(
                        "INSTANTIATE_FLASH(__{}, {t}, {d})",
                        if t == "bf16" { "nv_bfloat16" } else { "half" }
                    )),
                    "{name} not instantiated"
                );
            }
        }
    }

    #[test]
    fn decode_attention_kernels_cover_groups_up_to_eight() {
        // Llama-3.1-8B (4 heads per kv head, d 128) and SmolLM2 (3, d 64).
        assert_eq!(
            decode_attention_kernel("bf16", 128, 4).as_deref(),
            Some("decode_attention_bf16_d128")
        );
        assert_eq!(
            decode_attention_kernel("f16", 64, 3).as_deref(),
            Some("decode_attention_f16_d64")
        );
        // Past 8 heads per kv head, f32, and other head sizes keep the CUDA-core kernel.
        assert_eq!(decode_attention_kernel("bf16", 128, 9), None);
        assert_eq!(decode_attention_kernel("bf16", 128, 0), None);
        assert_eq!(decode_attention_kernel("f32", 128, 4), None);
        assert_eq!(decode_attention_kernel("f16", 96, 4), None);
        let names = kernel_names();
        let src = source();
        for t in ["bf16", "f16"] {
            for &d in FLASH_HEAD_DIMS {
                let name = format!("decode_attention_{t}_d{d}");
                assert!(names.contains(&name), "{name} not loaded");
                assert!(
                    src.contains(&format!(
                        "INSTANTIATE_DECODE_ATTN(__{}, {t}, {d})",
                        if t == "bf16" { "nv_bfloat16" } else { "half" }
                    )),
                    "{name} not instantiated"
                );
            }
        }
    }
}
