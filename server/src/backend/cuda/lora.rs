//! The LoRA slot pool in device memory (S-LoRA/SGLang style): per layer and per fused group of
//! targets, `A` as `[slots, targets · R, in]` and `Bᵀ` as `[slots, R, out_total]`, zero-padded to
//! the pool's rank `R`, plus each slot's rank and scaling. Loading an adapter into a slot is a
//! host-to-device copy; which adapter leaves a full pool follows the engine's host-side pool
//! (LRU among adapters not in the current batch).

use cudarc::driver::CudaSlice;

use super::{Gpu, GpuFloat};
use crate::adapter::{LoraAdapter, LoraTarget};
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
        let mut changed = false;
        for (i, a) in adapters.iter().enumerate() {
            if out[i] != usize::MAX {
                continue;
            }
            let victim = (0..self.slots)
                .filter(|&s| self.last_use[s] != self.tick)
                .min_by_key(|&s| (self.resident[s].is_some(), self.last_use[s]))
                .expect("fewer adapters than slots");
            self.write_slot(gpu, c, victim, a)?;
            self.resident[victim] = Some(a.id);
            self.last_use[victim] = self.tick;
            out[i] = victim;
            changed = true;
        }
        if changed {
            self.upload_slot_params(gpu)?;
        }
        Ok(out)
    }

    /// Copies `a`'s factors into `slot`: the rows below its rank of every target's `A` block and
    /// of `Bᵀ` (zeros for targets it does not adapt). Rows from its rank up to the pool's are
    /// never read (every kernel and GEMM stops at the slot's rank), so they are not copied: a
    /// rank-16 adapter in a rank-64 pool moves a quarter of the padded bytes.
    fn write_slot(&mut self, gpu: &Gpu, c: &ModelConfig, slot: usize, a: &LoraAdapter) -> Result<()> {
        let r_pool = self.rank;
        if a.rank > r_pool {
            return Err(Error::InvalidRequest(format!(
                "adapter {} has rank {}, above the device pool's rank {r_pool} (--max-lora-rank)",
                a.name, a.rank
            )));
        }
        let r = a.rank;
        let copy_err = |e| Error::Model(format!("CUDA: copying adapter {} to its slot: {e}", a.name));
        for (li, groups) in self.layers.iter_mut().enumerate() {
            for (g, bufs) in groups.iter_mut().enumerate() {
                let (in_dim, outs) = group_dims(c, g);
                let nt = outs.len();
                let out_total: usize = outs.iter().sum();
                let mut host_bt = vec![T::from_f32(0.0); r * out_total];
                let mut host_a = vec![T::from_f32(0.0); r * in_dim];
                let mut col = 0;
                for (t, target) in GROUPS[g].iter().enumerate() {
                    let w = a.layers[li][target.index()].as_ref();
                    for (k, dst) in host_a.chunks_mut(in_dim).enumerate() {
                        match w {
                            Some(w) => dst
                                .iter_mut()
                                .zip(w.a.row(k))
                                .for_each(|(d, s)| *d = T::from_f32(*s)),
                            None => dst.fill(T::from_f32(0.0)),
                        }
                    }
                    if let Some(w) = w {
                        for j in 0..outs[t] {
                            let brow = w.b.row(j);
                            for k in 0..r {
                                host_bt[k * out_total + col + j] = T::from_f32(brow[k]);
                            }
                        }
                    }
                    // Rows [t·R, t·R + r) of the slot's A block.
                    let first = (slot * nt + t) * r_pool * in_dim;
                    gpu.stream
                        .memcpy_htod(&host_a, &mut bufs.a.slice_mut(first..first + r * in_dim))
                        .map_err(copy_err)?;
                    col += outs[t];
                }
                let first = slot * r_pool * out_total;
                gpu.stream
                    .memcpy_htod(&host_bt, &mut bufs.bt.slice_mut(first..first + r * out_total))
                    .map_err(copy_err)?;
            }
        }
        self.host_rank[slot] = a.rank as i32;
        self.host_scale[slot] = a.scaling;
        Ok(())
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
