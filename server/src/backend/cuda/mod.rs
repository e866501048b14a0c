//! The CUDA backend: one GPU context with its stream, cuBLAS handle and kernels ([`Gpu`]), the
//! element types the model runs in ([`GpuFloat`]), and the Llama model on the device
//! ([`CudaLlama`], with its LoRA slot pool in [`lora`] and token sampling on the device in
//! [`sampling`]).
//!
//! Everything is issued on one non-default stream with cudarc's cross-stream event tracking
//! off, so a decode step can be captured once as a CUDA graph and replayed. A second stream
//! ([`Gpu::side`]) runs work that overlaps the main stream's, forked from and joined back into it
//! with events, which graph capture records as edges.

mod graph;
mod llama;
pub mod lora;
pub mod sampling;

use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use loraplane_kernels::{Kernels, DECODE_GEMM_TILE_K};

pub use llama::{
    CudaLlama, CudaModel, CudaOptions, DeviceDtype, LoraKernelMode, DECODE_ATTENTION_TENSOR_CORES_MIN_PAIRS,
    PREFILL_ATTENTION_MIN_ROWS,
};

use crate::error::{Error, Result};

/// An element type the device model computes in.
pub trait GpuFloat: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + Unpin + 'static {
    /// Kernel name suffix (`f32`, `bf16`, `f16`).
    const SUFFIX: &'static str;
    /// cuBLAS data type.
    const BLAS_TYPE: blas_sys::cudaDataType;
    /// Rounds an f32.
    fn from_f32(v: f32) -> Self;
}

impl GpuFloat for f32 {
    const SUFFIX: &'static str = "f32";
    const BLAS_TYPE: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_32F;
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl GpuFloat for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const BLAS_TYPE: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_16BF;
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

impl GpuFloat for half::f16 {
    const SUFFIX: &'static str = "f16";
    const BLAS_TYPE: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_16F;
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// cuBLAS scratch space, set once so that GEMMs never allocate (required inside graph capture).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// A GPU with its stream, cuBLAS handle and loaded kernels.
pub struct Gpu {
    /// The driver context.
    pub ctx: Arc<CudaContext>,
    /// The stream every operation is issued on.
    pub stream: Arc<CudaStream>,
    /// A stream for kernels that overlap the main stream's, between [`Gpu::fork_side`] and
    /// [`Gpu::join_side`].
    pub side: Arc<CudaStream>,
    fork_event: CudaEvent,
    join_event: CudaEvent,
    blas: CudaBlas,
    _blas_workspace: CudaSlice<u8>,
    /// The compiled kernels.
    pub kernels: Kernels,
    /// Device name, as the driver reports it.
    pub name: String,
    /// Streaming multiprocessors: how many blocks make a full grid.
    pub sms: usize,
}

fn cuda_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Model(format!("CUDA: {what}: {e}"))
}

impl Gpu {
    /// Opens GPU `ordinal`, or explains why there is none: no driver library on this machine,
    /// no such device, or kernels that do not compile.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        // NB: CudaContext::new panics instead of failing when libcuda is missing.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Model(
                "--device cuda: no NVIDIA driver found (libcuda.so could not be loaded); \
                 run on a machine with an NVIDIA GPU and driver, or use --device cpu"
                    .into(),
            ));
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } || !unsafe { blas_sys::is_culib_present() } {
            return Err(Error::Model(
                "--device cuda: libnvrtc or libcublas not found; add the CUDA toolkit's lib64 \
                 directory (e.g. /usr/local/cuda/lib64) to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err(&format!("opening device {ordinal}"), e))?;
        // NB: one stream only, so cudarc's per-buffer events would only add work (and break
        // graph capture).
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda_err("reading the multiprocessor count", e))? as usize;
        let stream = ctx.new_stream().map_err(|e| cuda_err("creating a stream", e))?;
        let side = ctx.new_stream().map_err(|e| cuda_err("creating a stream", e))?;
        let event = || ctx.new_event(None).map_err(|e| cuda_err("creating an event", e));
        let (fork_event, join_event) = (event()?, event()?);
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("creating the cuBLAS handle", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
            .map_err(|e| cuda_err("allocating the cuBLAS workspace", e))?;
        {
            let (ptr, _g) = workspace.device_ptr(&stream);
            unsafe {
                blas_sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, BLAS_WORKSPACE_BYTES)
                    .result()
                    .map_err(|e| cuda_err("setting the cuBLAS workspace", e))?;
            }
        }
        let kernels = Kernels::load(&ctx).map_err(|e| cuda_err("kernels", e))?;
        Ok(Arc::new(Self {
            ctx,
            stream,
            side,
            fork_event,
            join_event,
            blas,
            _blas_workspace: workspace,
            kernels,
            name,
            sms,
        }))
    }

    /// Has cuBLAS choose its GEMM kernels (from the next call on) for `sms` multiprocessors
    /// instead of all of them, as when another stream's kernels run beside; `None` restores the
    /// whole GPU. Only the choice of kernel changes, so a graph captured meanwhile keeps it.
    pub fn set_blas_sm_target(&self, sms: Option<usize>) -> Result<()> {
        let n = sms.map_or(0, |n| n.min(i32::MAX as usize) as i32);
        // SAFETY: the handle is live for `self`'s lifetime; the call only sets a field of it.
        unsafe { blas_sys::cublasSetSmCountTarget(*self.blas.handle(), n) }
            .result()
            .map_err(|e| cuda_err("setting cuBLAS's SM count target", e))
    }

    /// Waits for every queued operation.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("synchronize", e))
    }

    /// Makes the side stream wait for the main stream's work so far: what is issued on it next
    /// may read everything the main stream has written.
    pub fn fork_side(&self) -> Result<()> {
        self.fork_event
            .record(&self.stream)
            .and_then(|_| self.side.wait(&self.fork_event))
            .map_err(|e| cuda_err("forking the side stream", e))
    }

    /// Makes the main stream wait for the side stream's work so far (and, inside a graph
    /// capture, rejoins the side stream's branch).
    pub fn join_side(&self) -> Result<()> {
        self.join_event
            .record(&self.side)
            .and_then(|_| self.stream.wait(&self.join_event))
            .map_err(|e| cuda_err("joining the side stream", e))
    }

    /// Zeros `bytes` bytes of device memory from `ptr`, in stream order.
    pub fn zero_bytes(&self, ptr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("memset", e))
    }

    /// Raw device address of a buffer (the stream is the only user, so no event guards).
    pub fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _guard) = s.device_ptr(&self.stream);
        p
    }

    /// Row-major `out[rows, n] = x[rows, k] · W[n, k]ᵀ + beta · out`, with row strides
    /// `ld_out` and `ld_x` (W is dense). `T` is the type of x and W; `out_f32` makes out f32.
    /// Accumulation is always f32.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_nt<T: GpuFloat>(
        &self,
        out: u64,
        ld_out: usize,
        out_f32: bool,
        x: u64,
        ld_x: usize,
        w: u64,
        rows: usize,
        n: usize,
        k: usize,
        beta: f32,
    ) -> Result<()> {
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let alpha = 1.0f32;
        let c_type = if out_f32 {
            blas_sys::cudaDataType::CUDA_R_32F
        } else {
            T::BLAS_TYPE
        };
        // Column-major view: C[n, rows] = W[k, n]ᵀ · X[k, rows].
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                w as *const _,
                T::BLAS_TYPE,
                k as i32,
                x as *const _,
                T::BLAS_TYPE,
                ld_x as i32,
                (&beta) as *const f32 as *const _,
                out as *mut _,
                c_type,
                ld_out as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_err("cuBLAS GEMM", e))
    }

    /// A 2D TMA tensor map of a row-major `[outer, inner]` matrix of `T` at `ptr` with rows
    /// `row_stride` elements apart, for boxes of [`DECODE_GEMM_TILE_K`] x `box_rows` in the
    /// 128-byte swizzle that `decode_gemm.cu` reads; elements past the bounds load as zeros.
    /// The map is 128 bytes for the device (kernels read it from global memory).
    pub fn decode_gemm_map<T: GpuFloat>(
        &self,
        ptr: u64,
        (outer, inner): (usize, usize),
        row_stride: usize,
        box_rows: usize,
    ) -> Result<[u64; 16]> {
        use cudarc::driver::sys as drv;
        let dtype = match T::SUFFIX {
            "bf16" => drv::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            "f16" => drv::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
            other => {
                return Err(Error::Model(format!(
                    "decode GEMM tensor maps take bf16 or f16, not {other}"
                )))
            }
        };
        let mut map = drv::CUtensorMap { opaque: [0; 16] };
        let dims = [inner as u64, outer as u64];
        let strides = [(row_stride * std::mem::size_of::<T>()) as u64];
        let boxes = [DECODE_GEMM_TILE_K as u32, box_rows as u32];
        let steps = [1u32, 1];
        // SAFETY: every pointer argument points at a live local of the length the rank (2) asks for.
        let r = unsafe {
            drv::cuTensorMapEncodeTiled(
                &mut map,
                dtype,
                2,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                steps.as_ptr(),
                drv::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                drv::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                drv::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                drv::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != drv::CUresult::CUDA_SUCCESS {
            return Err(cuda_err(
                &format!("encoding a tensor map of [{outer}, {inner}] with row stride {row_stride}"),
                format!("{r:?}"),
            ));
        }
        Ok(map.opaque)
    }

    /// `out[rows, n] = beta · out + x · Wᵀ` in `decode_gemm.cu` with plan `p`, the weight's and
    /// x's tensor maps ([`Self::decode_gemm_map`], boxes of `p.tile_n` weight rows and `p.tokens` rows
    /// of x) in device memory at `maps`, and the plan's workspace and tile counters.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_gemm(
        &self,
        p: &loraplane_kernels::DecodeGemmPlan,
        (w_map, x_map): (u64, u64),
        out: u64,
        ld_out: usize,
        (rows, n, k): (usize, usize, usize),
        beta: f32,
        (workspace, counters): (u64, u64),
    ) -> Result<()> {
        launch!(
            self,
            &p.kernel,
            (p.blocks, 1, 1),
            (p.threads, 1, 1),
            shared = p.shared_bytes,
            w_map,
            x_map,
            out,
            ld_out as i32,
            rows as i32,
            n as i32,
            k as i32,
            beta,
            p.stages as i32,
            p.k_blocks as i32,
            i32::from(p.evict_first),
            workspace,
            counters
        )
    }

    /// Column-major strided batched GEMM, `C_b = alpha · op(A_b) · op(B_b) + beta · C_b` for
    /// `batch` items (cuBLAS's own convention; element offsets between items in `s_*`).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_batched(
        &self,
        trans_a: bool,
        trans_b: bool,
        (m, n, k): (usize, usize, usize),
        (alpha, beta): (f32, f32),
        (a, a_type, lda, sa): (u64, blas_sys::cudaDataType, usize, usize),
        (b, b_type, ldb, sb): (u64, blas_sys::cudaDataType, usize, usize),
        (c, c_type, ldc, sc): (u64, blas_sys::cudaDataType, usize, usize),
        batch: usize,
    ) -> Result<()> {
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        unsafe {
            blas::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(trans_a),
                op(trans_b),
                m as i32,
                n as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                a as *const _,
                a_type,
                lda as i32,
                sa as i64,
                b as *const _,
                b_type,
                ldb as i32,
                sb as i64,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                c_type,
                ldc as i32,
                sc as i64,
                batch as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_err("cuBLAS batched GEMM", e))
    }

    /// Allocates `n` zeroed elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| cuda_err(&format!("allocating {n} elements"), e))
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(data)
            .map_err(|e| cuda_err("host-to-device copy", e))
    }

    /// Copies a device buffer to the host (synchronous).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, s: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        self.stream
            .memcpy_dtoh(&s.slice(..n), &mut out)
            .map_err(|e| cuda_err("device-to-host copy", e))?;
        Ok(out)
    }
}

/// Launches kernel `$name` (already suffixed) with a grid and block and by-value arguments on the
/// main stream, or on `on = stream`; `shared = bytes` before the arguments sets the dynamic
/// shared memory.
macro_rules! launch {
    ($gpu:expr, on = $stream:expr, $name:expr, $grid:expr, $block:expr, shared = $smem:expr, $($arg:expr),* $(,)?) => {{
        use cudarc::driver::PushKernelArg;
        let f = $gpu.kernels.get($name);
        let mut b = $stream.launch_builder(f);
        $( let a = $arg; b.arg(&a); )*
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: $grid,
            block_dim: $block,
            shared_mem_bytes: $smem,
        };
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| crate::error::Error::Model(format!("CUDA: launching {}: {e}", $name)))
    }};
    ($gpu:expr, on = $stream:expr, $name:expr, $grid:expr, $block:expr, $($arg:expr),* $(,)?) => {
        $crate::backend::cuda::launch!($gpu, on = $stream, $name, $grid, $block, shared = 0, $($arg),*)
    };
    ($gpu:expr, $name:expr, $grid:expr, $block:expr, shared = $smem:expr, $($arg:expr),* $(,)?) => {
        $crate::backend::cuda::launch!($gpu, on = $gpu.stream, $name, $grid, $block, shared = $smem, $($arg),*)
    };
    ($gpu:expr, $name:expr, $grid:expr, $block:expr, $($arg:expr),* $(,)?) => {
        $crate::backend::cuda::launch!($gpu, $name, $grid, $block, shared = 0, $($arg),*)
    };
}
pub(crate) use launch;
