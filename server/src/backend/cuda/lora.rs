//! The LoRA slot pool in device memory (S-LoRA/SGLang style): per layer and per fused group of
//! targets, `A` as `[slots, targets · R, in]` and `Bᵀ` as `[slots, R, out_total]`, zero-padded to
//! the pool's rank `R`, plus each slot's rank and scaling. Loading an adapter into a slot is a
//! host-to-device copy into the slot the engine's adapter pool chose ([`LoraSlots::load`]); callers
//! without an engine let [`LoraSlots::assign`] pick LRU victims.
//!
//! With overlap loading, the copy reads a pinned host image of the adapter in the device dtype
//! (kept for the `2 · slots` most recently staged adapters, as SGLang limits `--max-loaded-loras`,
//! and dropped when the engine drops the adapter's host copy) on a side stream, and records an
//! event that the compute stream waits on before its first use of the slot. Images are converted on
//! a worker thread ([`Staging`]), so that registering or reloading an adapter does not stall the
//! engine thread's forward passes (a rank-16 Llama-3.1-8B adapter's first overlapped load,
//! conversion and copy, took 60-90 ms on the H100 machine's host with reused pinned buffers and
//! 110-150 ms with fresh ones, twenty-third session). The copy is queued, then issued right after
//! the first forward pass that follows its image's conversion has issued its own uploads and
//! kernels ([`LoraSlots::issue_copies`]): issued earlier, it would hold the copy engine while that
//! pass's small uploads waited behind it. An image that cannot be made (pinned memory ran out)
//! falls back to a synchronous copy ([`LoraSlots::ready`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};

use super::{Gpu, GpuFloat};
use crate::adapter::{LoraAdapter, LoraTarget, LoraWeights};
use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// The four fused groups one layer applies LoRA in: their targets share an input.
pub const GROUPS: [&[LoraTarget]; 4] = [
    &[LoraTarget::QProj, LoraTarget::KProj, LoraTarget::VProj],
    &[LoraTarget::OProj],
    &[LoraTarget::GateProj, LoraTarget::UpProj],
    &[LoraTarget::DownProj],
];

/// Shape of one group: input width and each target's output width.
pub fn group_dims(c: &ModelConfig, g: usize) -> (usize, Vec<usize>) {
    let in_dim = GROUPS[g][0].shape(c).0;
    (in_dim, GROUPS[g].iter().map(|t| t.shape(c).1).collect())
}

/// One group's factors for every slot.
pub struct GroupBuffers<T> {
    /// `[slots, targets · R, in]`.
    pub a: CudaSlice<T>,
    /// `[slots, R, out_total]`.
    pub bt: CudaSlice<T>,
}

/// One contiguous run of a slot's factors: `len` elements at element `dst` of a layer's group
/// buffer (`A`, or `Bᵀ` when `bt`), taken from element `src` of the adapter's slot image.
struct Piece {
    layer: usize,
    group: usize,
    bt: bool,
    dst: usize,
    src: usize,
    len: usize,
}

/// An adapter's slot image in pinned host memory for asynchronous copies, one buffer per layer,
/// filled by a worker thread: `image` is set once, to the buffers or to why they could not be
/// made.
struct Staging<T> {
    rank: usize,
    image: OnceLock<std::result::Result<Vec<PinnedHostSlice<T>>, String>>,
    /// Where the image's buffers go when it is dropped.
    recycled: Arc<Mutex<Recycled<PinnedHostSlice<T>>>>,
}

impl<T> Drop for Staging<T> {
    fn drop(&mut self) {
        if let Some(Ok(buffers)) = self.image.take() {
            let mut free = self.recycled.lock().unwrap_or_else(|e| e.into_inner());
            for b in buffers {
                free.give(b);
            }
        }
    }
}

/// Something with a length in elements: a pinned buffer ([`Recycled`] is generic for tests).
trait Elements {
    fn elements(&self) -> usize;
}

impl<T> Elements for PinnedHostSlice<T> {
    fn elements(&self) -> usize {
        self.len()
    }
}

/// Layer buffers of dropped staged images, which the next images take before allocating:
/// allocating and freeing pinned memory took about a quarter of a first overlapped load on the
/// H100 machine (136 -> 99 ms with reuse, `bench_gpu --slot-loads`). Holds at most `cap`
/// buffers (one image's layers), dropping the oldest beyond that.
struct Recycled<B> {
    free: VecDeque<B>,
    cap: usize,
}

impl<B: Elements> Recycled<B> {
    fn new(cap: usize) -> Self {
        Self {
            free: VecDeque::new(),
            cap,
        }
    }

    /// The smallest free buffer of at least `len` elements.
    fn take(&mut self, len: usize) -> Option<B> {
        let best = (0..self.free.len())
            .filter(|&i| self.free[i].elements() >= len)
            .min_by_key(|&i| self.free[i].elements())?;
        self.free.remove(best)
    }

    fn give(&mut self, b: B) {
        self.free.push_back(b);
        while self.free.len() > self.cap {
            self.free.pop_front();
        }
    }
}

impl<T: GpuFloat> Staging<T> {
    /// Queues the conversion of `a` on `stager`; the returned staging is filled when it is done
    /// (or with the reason, when it no longer matters or fails).
    fn start(
        stager: &rayon::ThreadPool,
        ctx: &Arc<cudarc::driver::CudaContext>,
        c: &ModelConfig,
        a: &Arc<LoraAdapter>,
        recycled: &Arc<Mutex<Recycled<PinnedHostSlice<T>>>>,
    ) -> Arc<Self> {
        let staging = Arc::new(Staging {
            rank: a.rank,
            image: OnceLock::new(),
            recycled: recycled.clone(),
        });
        let (ctx, c, a, out) = (ctx.clone(), c.clone(), a.clone(), staging.clone());
        stager.spawn_fifo(move || {
            // Only this job still holds it: evicted from the cache before its turn.
            let image = if Arc::strong_count(&out) == 1 {
                Err("dropped before its conversion".to_string())
            } else {
                // A panic must not leave waiters blocked on an image that never comes.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    pinned_image(&ctx, &c, &a, &out.recycled)
                }))
                .unwrap_or_else(|_| Err(format!("converting adapter {} panicked", a.name)))
            };
            let _ = out.image.set(image);
        });
        staging
    }

    /// A staging that failed already, with `why`.
    fn failed(a: &LoraAdapter, recycled: &Arc<Mutex<Recycled<PinnedHostSlice<T>>>>, why: &str) -> Arc<Self> {
        Arc::new(Staging {
            rank: a.rank,
            image: OnceLock::from(Err(format!("adapter {}: {why}", a.name))),
            recycled: recycled.clone(),
        })
    }

    /// The image once converted (`None` while converting); with `wait`, blocks until it is.
    fn image(&self, wait: bool) -> Option<Result<&[PinnedHostSlice<T>]>> {
        let done = if wait {
            Some(self.image.wait())
        } else {
            self.image.get()
        };
        done.map(|r| r.as_deref().map_err(|e| Error::Model(e.clone())))
    }
}

/// `a`'s slot image converted into pinned memory, a buffer per layer: a recycled one where one
/// is large enough, else one allocated just before it is filled. On the H100 machine, one 84 MB
/// buffer, or the layers' buffers allocated back to back and then filled in parallel, made
/// batch-64 decode steps 4x slower while an adapter was staged; this way they were 1.2x slower.
fn pinned_image<T: GpuFloat>(
    ctx: &Arc<cudarc::driver::CudaContext>,
    c: &ModelConfig,
    a: &LoraAdapter,
    recycled: &Mutex<Recycled<PinnedHostSlice<T>>>,
) -> std::result::Result<Vec<PinnedHostSlice<T>>, String> {
    let len = image_layer_len(c, a.rank);
    a.layers
        .iter()
        .map(|layer| {
            let reused = recycled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(len.max(1));
            // SAFETY: `fill_layer_image` writes every element before the buffer is read. A
            // recycled buffer has no reader left: a staging is dropped only after the copies
            // that read it (their `Pending` holds it until their event fires).
            let mut pinned = match reused {
                Some(b) => b,
                None => unsafe { ctx.alloc_pinned::<T>(len.max(1)) }
                    .map_err(|e| format!("CUDA: allocating pinned memory for adapter {}: {e}", a.name))?,
            };
            let image = pinned
                .as_mut_slice()
                .map_err(|e| format!("CUDA: writing a staged adapter: {e}"))?;
            fill_layer_image(c, a.rank, layer, &mut image[..len]);
            Ok(pinned)
        })
        .collect()
}

/// An overlapped copy into a slot: queued (`done` is `None`) until a forward pass issues it
/// after `after`, the compute stream's work when it was queued, and its image is converted;
/// then in flight until `done`.
struct Pending<T> {
    after: CudaEvent,
    done: Option<CudaEvent>,
    image: Arc<Staging<T>>,
    /// The adapter, for a synchronous copy should its image fail.
    adapter: Arc<LoraAdapter>,
}

impl<T> Pending<T> {
    fn finished(&self) -> Result<bool> {
        match &self.done {
            None => Ok(false),
            Some(e) => e
                .try_is_complete()
                .map_err(|e| cuda_copy_err("checking a slot copy", e)),
        }
    }
}

/// The pool.
pub struct LoraSlots<T> {
    /// Slots.
    pub slots: usize,
    /// Rank every slot is padded to.
    pub rank: usize,
    /// Per layer, per group.
    pub layers: Vec<[GroupBuffers<T>; 4]>,
    /// Each slot's rank (0 when empty).
    pub slot_rank: CudaSlice<i32>,
    /// Each slot's `lora_alpha / r` (or rsLoRA) factor.
    pub slot_scale: CudaSlice<f32>,
    resident: Vec<Option<u64>>,
    last_use: Vec<u64>,
    tick: u64,
    host_rank: Vec<i32>,
    host_scale: Vec<f32>,
    /// Side stream for overlapped copies, created on first use.
    copy_stream: Option<Arc<CudaStream>>,
    staged: HashMap<u64, Arc<Staging<T>>>,
    /// Layer buffers of dropped staged images, for the next ones.
    recycled: Arc<Mutex<Recycled<PinnedHostSlice<T>>>>,
    /// Converts staged images one at a time, in order (one thread, `spawn_fifo`), so that
    /// many adapters registered at once take one core and one pinned allocation at a time.
    /// Started on first use.
    stager: Option<rayon::ThreadPool>,
    /// Staged ids, least recently staged or used first.
    staged_order: VecDeque<u64>,
    pending: Vec<Option<Pending<T>>>,
    /// Staged images fail at once instead of being converted (see [`LoraSlots::fail_staging`]).
    fail_staging: bool,
    /// Copies superseded by a newer copy into the same slot, kept until done so that the
    /// image they read stays alive.
    superseded: Vec<Pending<T>>,
    /// Each group's input width and target output widths.
    dims: Vec<(usize, Vec<usize>)>,
    /// [`image_layer_len`] at rank 1 (it grows linearly with the rank).
    layer_image_len_per_rank: usize,
    /// Host buffer synchronous loads convert into, kept so that its pages are touched once
    /// (first-touch faults cost more than the conversion).
    scratch: Vec<T>,
}

impl<T: GpuFloat> LoraSlots<T> {
    /// Allocates `slots` slots of rank `rank` for every layer.
    pub fn new(gpu: &Gpu, c: &ModelConfig, slots: usize, rank: usize) -> Result<Self> {
        let mut layers = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            let mut groups = Vec::with_capacity(4);
            for g in 0..4 {
                let (in_dim, outs) = group_dims(c, g);
                let nt = outs.len();
                let out_total: usize = outs.iter().sum();
                groups.push(GroupBuffers {
                    a: gpu.zeros::<T>(slots * nt * rank * in_dim)?,
                    bt: gpu.zeros::<T>(slots * rank * out_total)?,
                });
            }
            let groups: [GroupBuffers<T>; 4] = groups.try_into().unwrap_or_else(|_| unreachable!());
            layers.push(groups);
        }
        Ok(Self {
            slots,
            rank,
            layers,
            slot_rank: gpu.zeros::<i32>(slots)?,
            slot_scale: gpu.zeros::<f32>(slots)?,
            resident: vec![None; slots],
            last_use: vec![0; slots],
            tick: 0,
            host_rank: vec![0; slots],
            host_scale: vec![0.0; slots],
            copy_stream: None,
            staged: HashMap::new(),
            recycled: Arc::new(Mutex::new(Recycled::new(c.num_layers))),
            stager: None,
            staged_order: VecDeque::new(),
            pending: (0..slots).map(|_| None).collect(),
            fail_staging: false,
            superseded: Vec::new(),
            scratch: Vec::new(),
            dims: (0..GROUPS.len()).map(|g| group_dims(c, g)).collect(),
            layer_image_len_per_rank: image_layer_len(c, 1),
        })
    }

    /// A slot's rank (0 when empty) and scaling.
    pub fn slot_params(&self, slot: usize) -> (usize, f32) {
        (self.host_rank[slot] as usize, self.host_scale[slot])
    }

    /// Device bytes the pool holds.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.iter())
            .map(|g| (g.a.len() + g.bt.len()) * std::mem::size_of::<T>())
            .sum()
    }

    /// Slot indices for `adapters` (distinct by id), loading any that are not resident into
    /// slots whose adapter is not among them, least recently used first.
    pub fn assign(&mut self, gpu: &Gpu, c: &ModelConfig, adapters: &[&LoraAdapter]) -> Result<Vec<usize>> {
        if adapters.len() > self.slots {
            return Err(Error::InvalidRequest(format!(
                "{} distinct adapters in one batch, but the device pool has {} slots",
                adapters.len(),
                self.slots
            )));
        }
        self.tick += 1;
        let mut out = vec![usize::MAX; adapters.len()];
        for (i, a) in adapters.iter().enumerate() {
            if let Some(s) = self.resident.iter().position(|r| *r == Some(a.id)) {
                out[i] = s;
                self.last_use[s] = self.tick;
            }
        }
        for (i, a) in adapters.iter().enumerate() {
            if out[i] != usize::MAX {
                continue;
            }
            let victim = (0..self.slots)
                .filter(|&s| self.last_use[s] != self.tick)
                .min_by_key(|&s| (self.resident[s].is_some(), self.last_use[s]))
                .expect("fewer adapters than slots");
            self.copy_now(gpu, c, victim, a)?;
            self.last_use[victim] = self.tick;
            out[i] = victim;
        }
        for &s in &out {
            self.order_after_copy(gpu, s)?;
        }
        Ok(out)
    }

    /// Makes the compute stream wait for an overlapped copy into `slot` that may still be in
    /// flight (the engine admits a request only once its copy is done, so this rarely waits).
    fn order_after_copy(&mut self, gpu: &Gpu, slot: usize) -> Result<()> {
        if let Some(p) = self.pending[slot].as_ref().filter(|p| p.done.is_none()) {
            // The slot is about to be read: its copy must be issued now, so its image must be
            // converted. If that failed, the slot holds nothing usable.
            if let Some(Err(e)) = p.image.image(true) {
                self.pending[slot] = None;
                self.resident[slot] = None;
                return Err(e);
            }
            self.issue_copies(gpu)?;
        }
        if let Some(p) = &self.pending[slot] {
            if p.finished()? {
                self.pending[slot] = None;
            } else if let Some(done) = &p.done {
                gpu.stream
                    .wait(done)
                    .map_err(|e| cuda_copy_err("ordering after a slot copy", e))?;
            }
        }
        Ok(())
    }

    /// Issues, on the copy stream, the queued overlapped copies whose images are converted.
    /// Called after a forward pass has issued its work, so the copies overlap it without
    /// delaying its uploads.
    pub fn issue_copies(&mut self, gpu: &Gpu) -> Result<()> {
        let queued: Vec<usize> = (0..self.slots)
            .filter(|&s| {
                self.pending[s]
                    .as_ref()
                    .is_some_and(|p| p.done.is_none() && matches!(p.image.image(false), Some(Ok(_))))
            })
            .collect();
        if queued.is_empty() {
            return Ok(());
        }
        let stream = match &self.copy_stream {
            Some(s) => s.clone(),
            None => {
                let s = gpu
                    .ctx
                    .new_stream()
                    .map_err(|e| cuda_copy_err("creating the adapter copy stream", e))?;
                self.copy_stream = Some(s.clone());
                s
            }
        };
        for slot in queued {
            let p = self.pending[slot].as_ref().expect("queued above");
            // Forward passes issued before the copy was queued may still read the slot's
            // previous adapter; the pass just issued does not use the slot.
            stream
                .wait(&p.after)
                .map_err(|e| cuda_copy_err("ordering a slot copy", e))?;
            let layers = p.image.image(false).expect("converted: filtered above")?;
            let layer_len = p.image.rank * self.layer_image_len_per_rank;
            for piece in self.pieces(slot, p.image.rank) {
                let image = layers[piece.layer]
                    .as_slice()
                    .map_err(|e| cuda_copy_err("reading a staged adapter", e))?;
                let src = piece.src - piece.layer * layer_len;
                let dst = self.piece_ptr(gpu, &piece);
                // SAFETY: `dst` lies inside the slot's buffer (pieces stay within the slot) and
                // the pinned image outlives the copy: `pending` (or `superseded`) holds it
                // until the event fires.
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(
                        dst,
                        &image[src..src + piece.len],
                        stream.cu_stream(),
                    )
                }
                .map_err(|e| cuda_copy_err("copying an adapter to its slot", e))?;
            }
            let done = stream
                .record_event(None)
                .map_err(|e| cuda_copy_err("recording a slot copy", e))?;
            self.pending[slot].as_mut().expect("queued above").done = Some(done);
        }
        Ok(())
    }

    /// Copies `a` into `slot`, the slot the engine's pool chose for it. Without `overlap` the
    /// copy is issued on the compute stream, so it is ordered before any later forward pass.
    /// With `overlap` it reads `a`'s pinned image (whose conversion starts now if it was not
    /// staged) on the copy stream, after the compute stream's work so far and once the image is
    /// converted, and [`LoraSlots::ready`] says when it is done.
    pub fn load(
        &mut self,
        gpu: &Gpu,
        c: &ModelConfig,
        slot: usize,
        a: &Arc<LoraAdapter>,
        overlap: bool,
    ) -> Result<()> {
        if !overlap {
            return self.copy_now(gpu, c, slot, a);
        }
        self.check_slot(slot)?;
        self.check_rank(a)?;
        let image = self.staging(gpu, c, a)?;
        let after = gpu
            .stream
            .record_event(None)
            .map_err(|e| cuda_copy_err("ordering a slot copy", e))?;
        let queued = Pending {
            after,
            done: None,
            image,
            adapter: a.clone(),
        };
        // A copy already issued into this slot is ahead on the same copy stream; one still
        // queued is simply replaced.
        self.superseded.retain(|p| !p.finished().unwrap_or(true));
        if let Some(old) = self.pending[slot].replace(queued) {
            if old.done.is_some() {
                self.superseded.push(old);
            }
        }
        self.mark_resident(gpu, slot, a)
    }

    /// Copies `a` into `slot` on the compute stream, converting it on this thread.
    fn copy_now(&mut self, gpu: &Gpu, c: &ModelConfig, slot: usize, a: &LoraAdapter) -> Result<()> {
        self.check_slot(slot)?;
        self.check_rank(a)?;
        // A copy still queued never happens; one in flight must land before this one
        // overwrites the slot.
        if self.pending[slot].as_ref().is_some_and(|p| p.done.is_none()) {
            self.pending[slot] = None;
        }
        self.order_after_copy(gpu, slot)?;
        let len = slot_image_len(c, a);
        if self.scratch.len() < len {
            self.scratch.resize(len, T::from_f32(0.0));
        }
        fill_slot_image(c, a, &mut self.scratch[..len]);
        let image = &self.scratch[..len];
        for p in self.pieces(slot, a.rank) {
            let bufs = &mut self.layers[p.layer][p.group];
            let buf = if p.bt { &mut bufs.bt } else { &mut bufs.a };
            gpu.stream
                .memcpy_htod(
                    &image[p.src..p.src + p.len],
                    &mut buf.slice_mut(p.dst..p.dst + p.len),
                )
                .map_err(|e| cuda_copy_err(&format!("copying adapter {} to its slot", a.name), e))?;
        }
        self.mark_resident(gpu, slot, a)
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.slots {
            return Err(Error::Model(format!(
                "LoRA slot {slot} is outside the device pool's {} slots",
                self.slots
            )));
        }
        Ok(())
    }

    /// Records `a` as `slot`'s adapter and uploads the slots' ranks and scalings.
    fn mark_resident(&mut self, gpu: &Gpu, slot: usize, a: &LoraAdapter) -> Result<()> {
        self.resident[slot] = Some(a.id);
        self.last_use[slot] = self.tick;
        self.host_rank[slot] = a.rank as i32;
        self.host_scale[slot] = a.scaling;
        self.upload_slot_params(gpu)
    }

    /// Whether the last copy into `slot` is done; with `wait`, issues it if it is still queued
    /// (once its image is converted) and blocks until it is done. When the image could not be
    /// made (pinned memory ran out, say) the adapter is copied synchronously instead, so the
    /// request that needs it only loses the overlap.
    pub fn ready(&mut self, gpu: &Gpu, c: &ModelConfig, slot: usize, wait: bool) -> Result<bool> {
        if let Some(p) = self.pending[slot].as_ref().filter(|p| p.done.is_none()) {
            // Still queued: its image may be converting, or may have failed to.
            match p.image.image(wait) {
                Some(Err(e)) => {
                    let a = p.adapter.clone();
                    tracing::warn!(
                        adapter = %a.name,
                        error = %e,
                        "staging the adapter in pinned memory failed; copying it synchronously"
                    );
                    self.copy_now(gpu, c, slot, &a)?;
                    return Ok(true);
                }
                Some(Ok(_)) if wait => self.issue_copies(gpu)?,
                _ => {}
            }
        }
        let Some(p) = &self.pending[slot] else {
            return Ok(true);
        };
        let done = match (&p.done, wait) {
            (Some(e), true) => {
                e.synchronize()
                    .map_err(|e| cuda_copy_err("waiting for a slot copy", e))?;
                true
            }
            _ => p.finished()?,
        };
        if done {
            self.pending[slot] = None;
        }
        Ok(done)
    }

    /// Drops the staged image of the adapter with id `adapter_id`, if any: its pinned buffers
    /// go to the recycled pool once no copy reads them (a queued or in-flight copy holds the
    /// image until it is done).
    pub fn unstage(&mut self, adapter_id: u64) {
        self.staged.remove(&adapter_id);
        self.staged_order.retain(|&id| id != adapter_id);
    }

    /// With `fail`, every image staged from now on fails at once, as if pinned memory had run
    /// out: for checks of the synchronous fallback in [`LoraSlots::ready`].
    pub fn fail_staging(&mut self, fail: bool) {
        self.fail_staging = fail;
    }

    /// Starts converting `a`'s slot image into pinned host memory on a worker thread, unless
    /// it is staged already; returns at once. The `2 · slots` most recently used images are
    /// kept; images a copy still reads stay alive through that copy.
    pub fn stage(&mut self, gpu: &Gpu, c: &ModelConfig, a: &Arc<LoraAdapter>) -> Result<()> {
        self.staging(gpu, c, a).map(|_| ())
    }

    fn staging(&mut self, gpu: &Gpu, c: &ModelConfig, a: &Arc<LoraAdapter>) -> Result<Arc<Staging<T>>> {
        self.check_rank(a)?;
        self.staged_order.retain(|&id| id != a.id);
        self.staged_order.push_back(a.id);
        // A conversion that failed (pinned memory ran out, say) is tried again.
        if let Some(s) = self
            .staged
            .get(&a.id)
            .filter(|s| !matches!(s.image(false), Some(Err(_))))
        {
            return Ok(s.clone());
        }
        let stager = match &mut self.stager {
            Some(pool) => pool,
            empty => empty.insert(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(|_| "lora-staging".into())
                    .build()
                    .map_err(|e| Error::Model(format!("starting the adapter staging thread: {e}")))?,
            ),
        };
        // Make room first, so that the new image can take the evicted one's buffers.
        self.staged.remove(&a.id);
        while self.staged.len() >= 2 * self.slots {
            let Some(old) = self.staged_order.pop_front() else {
                break;
            };
            self.staged.remove(&old);
        }
        let staged = if self.fail_staging {
            Staging::failed(a, &self.recycled, "staging disabled by fail_staging")
        } else {
            Staging::start(stager, &gpu.ctx, c, a, &self.recycled)
        };
        self.staged.insert(a.id, staged.clone());
        Ok(staged)
    }

    fn check_rank(&self, a: &LoraAdapter) -> Result<()> {
        if a.rank > self.rank {
            return Err(Error::InvalidRequest(format!(
                "adapter {} has rank {}, above the device pool's rank {} (--max-lora-rank)",
                a.name, a.rank, self.rank
            )));
        }
        Ok(())
    }

    /// Where each run of a rank-`r` slot image goes in `slot`, in image order: per layer and
    /// group, the rows below `r` of each target's `A` block, then the rows below `r` of `Bᵀ`.
    /// Rows from `r` up to the pool's rank are never read (every kernel and GEMM stops at the
    /// slot's rank), so a rank-16 adapter in a rank-64 pool moves a quarter of the padded bytes.
    fn pieces(&self, slot: usize, r: usize) -> Vec<Piece> {
        let r_pool = self.rank;
        let mut out = Vec::new();
        let mut src = 0;
        for layer in 0..self.layers.len() {
            for group in 0..GROUPS.len() {
                let (in_dim, outs) = &self.dims[group];
                let in_dim = *in_dim;
                let nt = outs.len();
                let out_total: usize = outs.iter().sum();
                for t in 0..nt {
                    let len = r * in_dim;
                    let dst = (slot * nt + t) * r_pool * in_dim;
                    out.push(Piece {
                        layer,
                        group,
                        bt: false,
                        dst,
                        src,
                        len,
                    });
                    src += len;
                }
                let len = r * out_total;
                out.push(Piece {
                    layer,
                    group,
                    bt: true,
                    dst: slot * r_pool * out_total,
                    src,
                    len,
                });
                src += len;
            }
        }
        out
    }

    fn piece_ptr(&self, gpu: &Gpu, p: &Piece) -> u64 {
        let bufs = &self.layers[p.layer][p.group];
        let buf = if p.bt { &bufs.bt } else { &bufs.a };
        gpu.ptr(buf) + (p.dst * std::mem::size_of::<T>()) as u64
    }

    /// Fills `slot` with random factors of rank `rank` on `targets` (benchmarks): no host copy.
    pub fn fill_dummy(
        &mut self,
        gpu: &Gpu,
        c: &ModelConfig,
        slot: usize,
        rank: usize,
        targets: &[LoraTarget],
        seed: u64,
    ) -> Result<()> {
        let r_pool = self.rank;
        let fill = format!("fill_uniform_{}", T::SUFFIX);
        for (li, groups) in self.layers.iter_mut().enumerate() {
            for (g, bufs) in groups.iter_mut().enumerate() {
                let (in_dim, outs) = group_dims(c, g);
                let nt = outs.len();
                let out_total: usize = outs.iter().sum();
                let a_len = nt * r_pool * in_dim;
                let bt_len = r_pool * out_total;
                if !GROUPS[g].iter().any(|t| targets.contains(t)) {
                    continue;
                }
                // Whole-slot fill: padded ranks carry values too, but kernels stop at the slot's
                // rank, so they are never read.
                let s = seed ^ ((li as u64) << 8 | g as u64).wrapping_mul(0x9E37_79B9);
                let pa = gpu.ptr(&bufs.a) + (slot * a_len * std::mem::size_of::<T>()) as u64;
                let pb = gpu.ptr(&bufs.bt) + (slot * bt_len * std::mem::size_of::<T>()) as u64;
                let scale_a = 1.0 / (in_dim as f32).sqrt();
                super::launch!(
                    gpu,
                    &fill,
                    (1024, 1, 1),
                    (256, 1, 1),
                    pa,
                    a_len as u64,
                    s,
                    scale_a
                )?;
                super::launch!(
                    gpu,
                    &fill,
                    (1024, 1, 1),
                    (256, 1, 1),
                    pb,
                    bt_len as u64,
                    s + 1,
                    0.01f32
                )?;
            }
        }
        self.host_rank[slot] = rank as i32;
        self.host_scale[slot] = 2.0;
        // A dummy has no host id: mark the slot taken by a synthetic one.
        self.resident[slot] = Some(u64::MAX - slot as u64);
        self.upload_slot_params(gpu)
    }

    /// Copies every slot's rank and scaling to the device.
    fn upload_slot_params(&mut self, gpu: &Gpu) -> Result<()> {
        gpu.stream
            .memcpy_htod(&self.host_rank, &mut self.slot_rank)
            .and_then(|_| gpu.stream.memcpy_htod(&self.host_scale, &mut self.slot_scale))
            .map_err(|e| Error::Model(format!("CUDA: uploading slot ranks: {e}")))
    }
}

fn cuda_copy_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Model(format!("CUDA: {what}: {e}"))
}

/// Elements of a rank-`r` slot image per layer (see [`fill_slot_image`]).
fn image_layer_len(c: &ModelConfig, r: usize) -> usize {
    (0..GROUPS.len())
        .map(|g| {
            let (in_dim, outs) = group_dims(c, g);
            r * (outs.len() * in_dim + outs.iter().sum::<usize>())
        })
        .sum()
}

/// Elements of `a`'s slot image.
fn slot_image_len(c: &ModelConfig, a: &LoraAdapter) -> usize {
    a.layers.len() * image_layer_len(c, a.rank)
}

/// Writes `a`'s factors in the device dtype into `out` (`slot_image_len` elements), in the
/// order of [`LoraSlots::pieces`] for its rank: per layer and group, each target's `A` rows
/// (zeros for targets it does not adapt), then `Bᵀ`. Layers convert in parallel, each writing
/// its part in whole-line runs (the pinned buffer is write-combined).
fn fill_slot_image<T: GpuFloat>(c: &ModelConfig, a: &LoraAdapter, out: &mut [T]) {
    use rayon::prelude::*;
    out.par_chunks_mut(image_layer_len(c, a.rank))
        .zip(a.layers.par_iter())
        .for_each(|(dst, layer)| fill_layer_image(c, a.rank, layer, dst));
}

/// Output rows of `B` per transposed block in [`fill_layer_image`]: a block's row of `Bᵀ` is
/// 128 bytes in bf16, two whole lines of the write-combined pinned buffer.
const BT_BLOCK: usize = 64;

/// One layer's part of [`fill_slot_image`]. `A` converts front to back; `Bᵀ` goes through a
/// small transposed block, so that `B` is read in order and `Bᵀ` written in whole-line runs.
/// Reading `B` a column at a time, as before, cost rank 64 6.6x rank 16's time, not 4x (one
/// core, a Llama-3.1-8B adapter: 42 and 277 ms into ordinary memory, now 30 and 112).
fn fill_layer_image<T: GpuFloat>(c: &ModelConfig, r: usize, layer: &[Option<LoraWeights>; 7], dst: &mut [T]) {
    let zero = T::from_f32(0.0);
    let mut block = vec![zero; r * BT_BLOCK];
    let mut at = 0;
    for (g, targets) in GROUPS.iter().enumerate() {
        let (in_dim, outs) = group_dims(c, g);
        for target in targets.iter() {
            let part = &mut dst[at..at + r * in_dim];
            match layer[target.index()].as_ref() {
                Some(w) => part
                    .iter_mut()
                    .zip(&w.a.data[..r * in_dim])
                    .for_each(|(d, &v)| *d = T::from_f32(v)),
                None => part.fill(zero),
            }
            at += r * in_dim;
        }
        // Bᵀ: row k holds column k of every target's B, side by side.
        let total: usize = outs.iter().sum();
        let bt = &mut dst[at..at + r * total];
        let mut col = 0;
        for (t, target) in targets.iter().enumerate() {
            // Where row k of Bᵀ holds this target's columns.
            let row = |k: usize| k * total + col;
            match layer[target.index()].as_ref() {
                Some(w) => {
                    for o0 in (0..outs[t]).step_by(BT_BLOCK) {
                        let n = BT_BLOCK.min(outs[t] - o0);
                        for (i, b_row) in w.b.data[o0 * r..(o0 + n) * r].chunks_exact(r).enumerate() {
                            for (k, &v) in b_row.iter().enumerate() {
                                block[k * BT_BLOCK + i] = T::from_f32(v);
                            }
                        }
                        for k in 0..r {
                            let run = row(k) + o0;
                            bt[run..run + n].copy_from_slice(&block[k * BT_BLOCK..k * BT_BLOCK + n]);
                        }
                    }
                }
                None => (0..r).for_each(|k| bt[row(k)..row(k) + outs[t]].fill(zero)),
            }
            col += outs[t];
        }
        at += r * total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::LoraTarget;

    impl Elements for Vec<u8> {
        fn elements(&self) -> usize {
            self.len()
        }
    }

    #[test]
    fn recycled_buffers_are_the_smallest_that_fit_and_the_oldest_go_first() {
        let mut r = Recycled::new(3);
        for n in [40, 10, 30] {
            r.give(vec![0u8; n]);
        }
        assert_eq!(r.take(20).map(|b| b.len()), Some(30));
        assert_eq!(r.take(50), None);
        r.give(vec![0u8; 20]);
        r.give(vec![0u8; 50]); // over the cap: the 40 (the oldest) goes
        assert_eq!(r.free.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 20, 50]);
        assert_eq!(r.take(1).map(|b| b.len()), Some(10));
    }

    /// Staged images are copied from per-layer buffers located by `rank · image_layer_len(1)`.
    #[test]
    fn a_layer_image_grows_linearly_with_the_rank() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/tiny/llama/config.json"
        );
        let c = ModelConfig::from_hf_file(std::path::Path::new(path)).unwrap();
        for r in [1, 3, 16, 64] {
            assert_eq!(image_layer_len(&c, r), r * image_layer_len(&c, 1));
            let a = LoraAdapter::dummy("x", &c, r, &LoraTarget::ALL, 1);
            assert_eq!(slot_image_len(&c, &a), c.num_layers * image_layer_len(&c, r));
        }
    }

    /// The image holds each target's `A` rows and `Bᵀ` where `pieces` says, for a rank below
    /// the pool's and targets on only some projections.
    #[test]
    fn slot_image_matches_the_factors() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/tiny/llama/config.json"
        );
        let c = ModelConfig::from_hf_file(std::path::Path::new(path)).unwrap();
        let a = LoraAdapter::dummy("x", &c, 3, &[LoraTarget::KProj, LoraTarget::UpProj], 5);
        let mut img = vec![0.0f32; slot_image_len(&c, &a)];
        fill_slot_image(&c, &a, &mut img);
        let mut at = 0;
        for layer in &a.layers {
            for (g, targets) in GROUPS.iter().enumerate() {
                let (in_dim, outs) = group_dims(&c, g);
                let out_total: usize = outs.iter().sum();
                for t in targets.iter() {
                    for k in 0..3 {
                        let row = &img[at + k * in_dim..at + (k + 1) * in_dim];
                        match &layer[t.index()] {
                            Some(w) => assert_eq!(row, w.a.row(k)),
                            None => assert!(row.iter().all(|&v| v == 0.0)),
                        }
                    }
                    at += 3 * in_dim;
                }
                let mut col = 0;
                for (ti, t) in targets.iter().enumerate() {
                    for j in 0..outs[ti] {
                        for k in 0..3 {
                            let want = layer[t.index()].as_ref().map_or(0.0, |w| w.b.row(j)[k]);
                            assert_eq!(img[at + k * out_total + col + j], want);
                        }
                    }
                    col += outs[ti];
                }
                at += 3 * out_total;
            }
        }
        assert_eq!(at, img.len());
    }
}
