//! Token sampling on the device for the serving path: the per-row parameters of the `sample_f32`
//! kernel (`kernels/src/sampling.cu`) and its launch (after `penalize_f32` for rows with
//! penalties) and of `top_logprobs_f32` for the alternatives a request wants, the copy of only
//! those logits rows the host still needs, and the split of one forward pass's results into sampled tokens and host logits
//! ([`split_outputs`], behind `CudaLlama::forward_sampled`).

use std::collections::VecDeque;
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};

use super::{cuda_err, launch, Gpu};
use crate::engine::request::TokenLogprob;
use crate::error::{Error, Result};
use crate::model::llama::{LogitsWanted, SeqInput};
use crate::model::{DevicePenalties, DeviceSample, SeqOutput};

/// Threads per sampled row: the kernel reads the row about ten times, so one full block per row.
pub const SAMPLE_THREADS: u32 = 1024;

/// Largest vocabulary the kernel's fixed-point masses (2^40 per unit weight, 64-bit sums) allow.
pub const MAX_SAMPLE_VOCAB: usize = (1 << 24) - 1;

/// One row to sample: which logits row and how. Laid out as `SampleRow` in `sampling.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SampleRow {
    /// 0 (or below): greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Relative floor in [0, 1]; 0 disables.
    pub min_p: f32,
    /// 0 disables; 1 is greedy.
    pub top_k: i32,
    /// Row of the logits matrix.
    pub row: i32,
    /// Row of the penalised copies to draw from; -1: the logits row itself.
    penalized: i32,
    /// Randomness of this draw.
    pub seed: u64,
}

// SAFETY: plain `repr(C)` data with the kernel's layout (checked by the size assertion below);
// all-zero bits are a valid value.
unsafe impl DeviceRepr for SampleRow {}
unsafe impl ValidAsZeroBits for SampleRow {}
const _: () = assert!(std::mem::size_of::<SampleRow>() == 32);

impl SampleRow {
    /// Sampling of logits row `row` as `s` says.
    pub fn new(row: usize, s: &DeviceSample) -> Self {
        Self {
            temperature: s.temperature,
            top_p: s.top_p,
            min_p: s.min_p,
            // Any k at or above the vocabulary keeps everything, as 0 does.
            top_k: s.top_k.min(i32::MAX as usize) as i32,
            row: row as i32,
            penalized: -1,
            seed: s.seed,
        }
    }
}

/// One row's penalties for `penalize_f32`: its tokens are `[first, first + count)` of the
/// uploaded token and count lists. Laid out as `PenaltyRow` in `sampling.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct PenaltyRow {
    row: i32,
    first: i32,
    count: i32,
    repetition: f32,
    frequency: f32,
    presence: f32,
}

// SAFETY: plain `repr(C)` data with the kernel's layout.
unsafe impl DeviceRepr for PenaltyRow {}
const _: () = assert!(std::mem::size_of::<PenaltyRow>() == 24);

/// The kernel's answer for one row. Laid out as `SampleOut` in `sampling.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SampleOut {
    token: i32,
    logprob: f32,
}

// SAFETY: plain `repr(C)` data; all-zero bits are a valid value.
unsafe impl DeviceRepr for SampleOut {}
unsafe impl ValidAsZeroBits for SampleOut {}

impl From<&SampleOut> for TokenLogprob {
    fn from(o: &SampleOut) -> Self {
        TokenLogprob {
            token_id: o.token as u32,
            logprob: o.logprob,
            top: Vec::new(),
        }
    }
}

/// Refuses a vocabulary the sampling kernel cannot draw from.
fn check_vocab(vocab: usize) -> Result<()> {
    if vocab == 0 || vocab > MAX_SAMPLE_VOCAB {
        return Err(Error::Model(format!(
            "device sampling supports vocabularies of 1 to {MAX_SAMPLE_VOCAB} tokens, not {vocab}"
        )));
    }
    Ok(())
}

/// Samples one token per entry of `rows` from the f32 logits at device address `logits`
/// (`[_, vocab]`, row-major) and returns each with its log-probability under the unmodified
/// distribution. Waits for the result.
pub fn sample_rows(gpu: &Gpu, logits: u64, vocab: usize, rows: &[SampleRow]) -> Result<Vec<TokenLogprob>> {
    sample_rows_penalized(gpu, logits, vocab, rows, &vec![None; rows.len()])
}

/// [`sample_rows`] where `penalties[i]`, when set, applies to `rows[i]`: that row is first
/// copied and penalised on the device, and drawn from the copy; its log-probability is still
/// under the unmodified row.
pub fn sample_rows_penalized(
    gpu: &Gpu,
    logits: u64,
    vocab: usize,
    rows: &[SampleRow],
    penalties: &[Option<&DevicePenalties>],
) -> Result<Vec<TokenLogprob>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    check_vocab(vocab)?;
    let mut rows = rows.to_vec();
    let (mut pen_rows, mut tokens, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for (r, p) in rows.iter_mut().zip(penalties) {
        let Some(p) = p else { continue };
        r.penalized = pen_rows.len() as i32;
        pen_rows.push(PenaltyRow {
            row: r.row,
            first: tokens.len() as i32,
            count: p.tokens.len() as i32,
            repetition: p.repetition,
            frequency: p.frequency,
            presence: p.presence,
        });
        tokens.extend(p.tokens.iter().map(|&t| t as i32));
        counts.extend(p.output_counts.iter().map(|&c| c as i32));
    }
    // The penalised copies, with what the kernel reads, kept alive until the results are read.
    let penalized = if pen_rows.is_empty() {
        None
    } else {
        tokens.push(0); // never empty (a row may list no tokens)
        counts.push(0);
        let copies = gpu.zeros::<f32>(pen_rows.len() * vocab)?;
        let (pr, tk, ct) = (gpu.upload(&pen_rows)?, gpu.upload(&tokens)?, gpu.upload(&counts)?);
        launch!(
            gpu,
            "penalize_f32",
            (pen_rows.len() as u32, 1, 1),
            (SAMPLE_THREADS, 1, 1),
            gpu.ptr(&copies),
            logits,
            gpu.ptr(&pr),
            gpu.ptr(&tk),
            gpu.ptr(&ct),
            vocab as i32
        )?;
        Some((copies, pr, tk, ct))
    };
    let params = gpu.upload(&rows)?;
    let out = gpu.zeros::<SampleOut>(rows.len())?;
    launch!(
        gpu,
        "sample_f32",
        (rows.len() as u32, 1, 1),
        (SAMPLE_THREADS, 1, 1),
        gpu.ptr(&out),
        logits,
        gpu.ptr(&params),
        vocab as i32,
        penalized.as_ref().map_or(0, |p| gpu.ptr(&p.0))
    )?;
    Ok(gpu
        .download(&out, rows.len())?
        .iter()
        .map(TokenLogprob::from)
        .collect())
}

/// The `n` most likely tokens of logits row `row`, for each `(row, n)` of `rows`, with their
/// log-probabilities under that row, best first (ties: lower id first): what
/// `engine::sampling::top_logprobs` returns for the row's log-softmax. Waits for the result.
pub fn top_logprobs_rows(
    gpu: &Gpu,
    logits: u64,
    vocab: usize,
    rows: &[(usize, usize)],
) -> Result<Vec<Vec<(u32, f32)>>> {
    let max_n = rows.iter().map(|&(_, n)| n.min(vocab)).max().unwrap_or(0);
    if max_n == 0 {
        return Ok(vec![Vec::new(); rows.len()]);
    }
    let index: Vec<i32> = rows.iter().map(|&(r, _)| r as i32).collect();
    let ns: Vec<i32> = rows.iter().map(|&(_, n)| n.min(vocab) as i32).collect();
    let (index, ns) = (gpu.upload(&index)?, gpu.upload(&ns)?);
    let out = gpu.zeros::<SampleOut>(rows.len() * max_n)?;
    launch!(
        gpu,
        "top_logprobs_f32",
        (rows.len() as u32, 1, 1),
        (SAMPLE_THREADS, 1, 1),
        gpu.ptr(&out),
        logits,
        gpu.ptr(&index),
        gpu.ptr(&ns),
        vocab as i32,
        max_n as i32
    )?;
    let host = gpu.download(&out, rows.len() * max_n)?;
    Ok(rows
        .iter()
        .zip(host.chunks(max_n))
        .map(|(&(_, n), got)| {
            // A row with fewer than `n` non-NaN logits ends in entries with no token.
            got[..n.min(vocab)]
                .iter()
                .filter(|o| o.token >= 0)
                .map(|o| (o.token as u32, o.logprob))
                .collect()
        })
        .collect())
}

/// Logits rows `rows` (in that order) of the `[_, vocab]` matrix `logits`, concatenated on the
/// host. A run of consecutive rows is one copy; anything else is first packed on the device.
pub fn download_rows(gpu: &Gpu, logits: &CudaSlice<f32>, vocab: usize, rows: &[usize]) -> Result<Vec<f32>> {
    let Some(&first) = rows.first() else {
        return Ok(Vec::new());
    };
    let mut host = vec![0f32; rows.len() * vocab];
    let consecutive = rows.iter().enumerate().all(|(i, &r)| r == first + i);
    if consecutive {
        let view = logits.slice(first * vocab..(first + rows.len()) * vocab);
        gpu.stream
            .memcpy_dtoh(&view, &mut host)
            .map_err(|e| cuda_err("device-to-host copy", e))?;
        return Ok(host);
    }
    let index: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
    let index = gpu.upload(&index)?;
    let packed = gpu.zeros::<f32>(rows.len() * vocab)?;
    launch!(
        gpu,
        "gather_rows_f32",
        (rows.len() as u32, 1, 1),
        (256, 1, 1),
        gpu.ptr(&packed),
        gpu.ptr(logits),
        gpu.ptr(&index),
        vocab as i32
    )?;
    gpu.stream
        .memcpy_dtoh(&packed, &mut host)
        .map_err(|e| cuda_err("device-to-host copy", e))?;
    Ok(host)
}

/// Checks that every sequence with `Some` in `sampling` wants exactly one logits row.
pub fn check_sampling(seqs: &[SeqInput<'_>], sampling: &[Option<DeviceSample>]) -> Result<()> {
    if sampling.len() != seqs.len() {
        return Err(Error::Model(format!(
            "{} sampling entries for {} sequences",
            sampling.len(),
            seqs.len()
        )));
    }
    for (s, p) in seqs.iter().zip(sampling) {
        if p.is_some() && (s.logits != LogitsWanted::Last || s.tokens.is_empty()) {
            return Err(Error::Model(
                "a sequence sampled on the device must want its last logits only".into(),
            ));
        }
    }
    Ok(())
}

/// The results of a forward pass whose wanted logits are in `logits`, sequence `i` owning rows
/// `per_seq[i] = (first, count)`: the sequences with `Some` in `sampling` (one row each) are
/// sampled on the device, the others get their rows copied to the host.
pub fn split_outputs(
    gpu: &Gpu,
    logits: &CudaSlice<f32>,
    vocab: usize,
    per_seq: &[(usize, usize)],
    sampling: &[Option<DeviceSample>],
) -> Result<Vec<SeqOutput>> {
    // The device-sampled sequences, each with its one logits row.
    let sampled: Vec<(usize, &DeviceSample)> = per_seq
        .iter()
        .zip(sampling)
        .filter_map(|(&(first, _), s)| s.as_ref().map(|s| (first, s)))
        .collect();
    let rows: Vec<SampleRow> = sampled
        .iter()
        .map(|&(first, s)| SampleRow::new(first, s))
        .collect();
    let penalties: Vec<Option<&DevicePenalties>> =
        sampled.iter().map(|(_, s)| s.penalties.as_ref()).collect();
    let host_rows: Vec<usize> = per_seq
        .iter()
        .zip(sampling)
        .filter(|(_, s)| s.is_none())
        .flat_map(|(&(first, count), _)| first..first + count)
        .collect();
    let mut tokens = sample_rows_penalized(gpu, gpu.ptr(logits), vocab, &rows, &penalties)?;
    if sampled.iter().any(|(_, s)| s.top_logprobs > 0) {
        let top: Vec<(usize, usize)> = sampled
            .iter()
            .map(|&(first, s)| (first, s.top_logprobs))
            .collect();
        let alternatives = top_logprobs_rows(gpu, gpu.ptr(logits), vocab, &top)?;
        for (t, alts) in tokens.iter_mut().zip(alternatives) {
            t.top = alts;
        }
    }
    let mut tokens = tokens.into_iter();
    let host = download_rows(gpu, logits, vocab, &host_rows)?;
    let mut next = 0;
    per_seq
        .iter()
        .zip(sampling)
        .map(|(&(_, count), s)| match s {
            Some(_) => tokens
                .next()
                .map(SeqOutput::Sampled)
                .ok_or_else(|| Error::Model("device sampling returned too few tokens".into())),
            None => {
                let l = host[next * vocab..(next + count) * vocab].to_vec();
                next += count;
                Ok(SeqOutput::Logits(l))
            }
        })
        .collect()
}

/// Device sampling for steps the engine overlaps ([`Forward::launch_sampled`]): each launch
/// samples into one device buffer, which the next step's embedding reads for its
/// [`pending_token`]s, and copies the tokens into page-locked host memory without waiting; the
/// host reads them at [`SamplePipe::collect`]. Two launches may be uncollected at once, so the
/// host buffers (and the device's parameter rows) alternate.
///
/// The parameter upload and the copy back run on the pipe's own stream, so that the main stream
/// goes from one step's sampling kernel straight to the next step's metadata: on the H100 the
/// two copies cost about 13 us a step between the graphs when they were on the main stream.
///
/// [`Forward::launch_sampled`]: crate::model::Forward::launch_sampled
/// [`pending_token`]: crate::model::pending_token
pub struct SamplePipe {
    /// The last launched step's draws, `[cap]`: what pending tokens resolve to.
    out: CudaSlice<SampleOut>,
    params: [CudaSlice<SampleRow>; 2],
    host_out: [PinnedHostSlice<SampleOut>; 2],
    host_params: [PinnedHostSlice<SampleRow>; 2],
    /// The stream of the parameter uploads and the copies back.
    copies: Arc<CudaStream>,
    /// Recorded on `copies` after each launch's parameter upload.
    uploaded: [CudaEvent; 2],
    /// Recorded on the main stream after each launch's sampling kernel.
    sampled: [CudaEvent; 2],
    /// Recorded on `copies` after each launch's copy to `host_out`; also guards `host_params`
    /// and `params` (the kernel that read them ran before that copy).
    done: [CudaEvent; 2],
    /// The buffers the next launch uses.
    turn: usize,
    /// Uncollected launches, oldest first.
    in_flight: VecDeque<Launched>,
}

/// Page-locked host memory for `n` values of `T`.
fn pinned<T: DeviceRepr>(gpu: &Gpu, n: usize) -> Result<PinnedHostSlice<T>> {
    // SAFETY: the pipe writes a row before uploading it and reads a row only after the device
    // wrote it (`collect` waits for the launch's copy).
    unsafe { gpu.ctx.alloc_pinned_with_flags::<T>(n, 0) }
        .map_err(|e| cuda_err("allocating pinned memory for sampled steps", e))
}

/// One uncollected launch: its host buffers and, per sequence, whether it was sampled.
struct Launched {
    turn: usize,
    sampled: Vec<bool>,
}

impl SamplePipe {
    /// Buffers for steps of up to `cap` sampled rows.
    pub fn new(gpu: &Gpu, cap: usize) -> Result<Self> {
        let cap = cap.max(1);
        let event = || {
            gpu.ctx
                .new_event(None)
                .map_err(|e| cuda_err("creating an event", e))
        };
        Ok(Self {
            out: gpu.zeros(cap)?,
            params: [gpu.zeros(cap)?, gpu.zeros(cap)?],
            host_out: [pinned(gpu, cap)?, pinned(gpu, cap)?],
            host_params: [pinned(gpu, cap)?, pinned(gpu, cap)?],
            copies: gpu
                .ctx
                .new_stream()
                .map_err(|e| cuda_err("creating the sampling copy stream", e))?,
            uploaded: [event()?, event()?],
            sampled: [event()?, event()?],
            done: [event()?, event()?],
            turn: 0,
            in_flight: VecDeque::new(),
        })
    }

    /// Device address of the last launch's draws (`SampleOut` rows, token first), for the
    /// embedding of the next step.
    pub fn prev_tokens(&self, gpu: &Gpu) -> u64 {
        gpu.ptr(&self.out)
    }

    /// How many tokens the last launch samples when it is still uncollected (the pending
    /// tokens a step may use), else 0.
    pub fn pending_rows(&self) -> usize {
        self.in_flight
            .back()
            .map_or(0, |l| l.sampled.iter().filter(|&&s| s).count())
    }

    /// Samples the step whose wanted logits are in `logits` (sequence `i` owning row
    /// `per_seq[i].0` when sampled) and starts copying the tokens to the host.
    pub fn launch(
        &mut self,
        gpu: &Gpu,
        logits: u64,
        vocab: usize,
        per_seq: &[(usize, usize)],
        sampling: &[Option<DeviceSample>],
    ) -> Result<()> {
        if self.in_flight.len() >= 2 {
            return Err(Error::Model("two launched steps are still uncollected".into()));
        }
        check_vocab(vocab)?;
        let t = self.turn;
        let rows: Vec<SampleRow> = per_seq
            .iter()
            .zip(sampling)
            .filter_map(|(&(first, _), s)| s.as_ref().map(|s| SampleRow::new(first, s)))
            .collect();
        if rows.len() > self.params[t].len() {
            return Err(Error::Model(format!(
                "{} sampled rows, above the pipe's {}",
                rows.len(),
                self.params[t].len()
            )));
        }
        // The launch that last used these buffers has been copied back, so its kernel is done
        // with `params[t]` and the host with both host buffers.
        self.done[t]
            .synchronize()
            .map_err(|e| cuda_err("waiting for a sampled step", e))?;
        let n = rows.len();
        if n > 0 {
            let host = self.host_params[t]
                .as_mut_slice()
                .map_err(|e| cuda_err("sampling rows", e))?;
            host[..n].copy_from_slice(&rows);
            let params = gpu.ptr(&self.params[t]);
            // SAFETY: both buffers hold at least `n` rows; the pinned source is not rewritten
            // before `done[t]` fires, which follows this copy on `copies`.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(params, &host[..n], self.copies.cu_stream())
                    .map_err(|e| cuda_err("uploading sampling rows", e))?;
            }
            let record = |e: &CudaEvent, s: &CudaStream, what| e.record(s).map_err(|e| cuda_err(what, e));
            let wait = |s: &CudaStream, e: &CudaEvent, what| s.wait(e).map_err(|e| cuda_err(what, e));
            record(&self.uploaded[t], &self.copies, "recording a sampling upload")?;
            wait(&gpu.stream, &self.uploaded[t], "waiting for a sampling upload")?;
            // The previous launch's copy back reads `out`, which this kernel rewrites.
            wait(
                &gpu.stream,
                &self.done[t ^ 1],
                "waiting for a copy of sampled tokens",
            )?;
            launch!(
                gpu,
                "sample_f32",
                (n as u32, 1, 1),
                (SAMPLE_THREADS, 1, 1),
                gpu.ptr(&self.out),
                logits,
                params,
                vocab as i32,
                0u64
            )?;
            record(&self.sampled[t], &gpu.stream, "recording a sampled step")?;
            wait(&self.copies, &self.sampled[t], "waiting for a sampled step")?;
            let dst = self.host_out[t]
                .as_mut_slice()
                .map_err(|e| cuda_err("sampled tokens", e))?;
            // SAFETY: as above; the host reads `dst` only after `done[t]` fired.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut dst[..n],
                    gpu.ptr(&self.out),
                    self.copies.cu_stream(),
                )
                .map_err(|e| cuda_err("copying sampled tokens", e))?;
            }
        }
        self.done[t]
            .record(&self.copies)
            .map_err(|e| cuda_err("recording a sampled step", e))?;
        self.in_flight.push_back(Launched {
            turn: t,
            sampled: sampling.iter().map(Option::is_some).collect(),
        });
        self.turn ^= 1;
        Ok(())
    }

    /// The oldest uncollected launch's tokens, one output per sequence (empty logits for the
    /// ones not sampled). Waits for them.
    pub fn collect(&mut self) -> Result<Vec<SeqOutput>> {
        let l = self
            .in_flight
            .pop_front()
            .ok_or_else(|| Error::Model("no launched step to collect".into()))?;
        self.done[l.turn]
            .synchronize()
            .map_err(|e| cuda_err("waiting for a sampled step", e))?;
        let host = self.host_out[l.turn]
            .as_slice()
            .map_err(|e| cuda_err("sampled tokens", e))?;
        let mut next = host.iter();
        l.sampled
            .iter()
            .map(|&sampled| {
                if !sampled {
                    return Ok(SeqOutput::Logits(Vec::new()));
                }
                next.next()
                    .map(|o| SeqOutput::Sampled(o.into()))
                    .ok_or_else(|| Error::Model("device sampling returned too few tokens".into()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_row_carries_the_request_and_clamps_k() {
        let s = DeviceSample {
            temperature: 0.7,
            top_k: usize::MAX,
            top_p: 0.9,
            min_p: 0.05,
            seed: u64::MAX - 3,
            penalties: None,
            top_logprobs: 0,
        };
        let r = SampleRow::new(5, &s);
        assert_eq!((r.temperature, r.top_p, r.min_p), (0.7, 0.9, 0.05));
        assert_eq!((r.top_k, r.row, r.seed), (i32::MAX, 5, u64::MAX - 3));
        assert_eq!(std::mem::align_of::<SampleRow>(), 8);
    }
}
