//! Compiles the kernel sources (`llama.cu` + `sampling.cu`, as `Kernels::load` does) with NVRTC,
//! checks that every kernel `Kernels::load` asks for is exported, and prints the PTX's
//! register-free summary: a check that needs no GPU, only `libnvrtc` (e.g. from the
//! `nvidia-cuda-nvrtc` wheel) and the CUDA headers; `LORAPLANE_PTX_OUT=file` also writes the PTX.
//! Usage: `CUDA_HOME=<dir with include/> cargo run -p loraplane-kernels --example nvrtc_check [arch]`.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

fn main() {
    let arch: &'static str = match std::env::args().nth(1).as_deref() {
        Some("sm_80") => "sm_80",
        _ => "sm_90a",
    };
    let include =
        std::env::var("CUDA_HOME").map_or("/usr/local/cuda/include".into(), |h| format!("{h}/include"));
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: vec![include],
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    match compile_ptx_with_opts(loraplane_kernels::source(), opts) {
        Ok(ptx) => {
            let src = ptx.to_src();
            if let Ok(path) = std::env::var("LORAPLANE_PTX_OUT") {
                std::fs::write(&path, &src).expect("writing the PTX");
            }
            let entries = src.lines().filter(|l| l.contains(".entry")).count();
            // Kernels::load fails on the GPU for a listed name the PTX lacks: catch it here.
            let missing: Vec<String> = loraplane_kernels::kernel_names()
                .into_iter()
                .filter(|n| !src.contains(&format!(".entry {n}(")))
                .collect();
            if !missing.is_empty() {
                eprintln!("listed but not exported: {}", missing.join(", "));
                std::process::exit(1);
            }
            println!("ok: {entries} kernels, {} bytes of PTX for {arch}", src.len());
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
