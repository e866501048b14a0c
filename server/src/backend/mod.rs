//! Compute backends. The CPU backend serves tests, CI and small models; every op the model needs
//! is a plain function over f32 slices. The CUDA backend runs the same model on an NVIDIA GPU
//! through `cudarc` (cuBLAS GEMMs, NVRTC-compiled kernels from `loraplane-kernels`) and loads
//! its driver libraries at run time, so one binary serves both.

pub mod cpu;
pub mod cuda;
