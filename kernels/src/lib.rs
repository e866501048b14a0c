//! CUDA kernel sources for loraplane's GPU backend, compiled at run time with NVRTC.
//!
//! The CUDA backend is not built yet: the CPU backend in `loraplane-server` is the only one. This
//! crate exists so the workspace layout matches the design; its `.cu` files arrive with the GPU
//! backend.
