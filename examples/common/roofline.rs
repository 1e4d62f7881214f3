//! Same-stream reference kernels: the attainable speed of an optimizer step on this machine.
//!
//! An optimizer step is a stream over memory: it reads weights, gradients and each state buffer
//! and writes weights and state. [`SameStream`] reads and writes exactly the same streams with
//! trivial arithmetic (one add per written stream), as a plain rayon loop over AVX2 code (or
//! portable code elsewhere). Its speed is what the memory system allows; an optimizer's speed
//! divided by it is the fraction of attainable bandwidth. The benches, `examples/perf.rs` and
//! `examples/tune.rs` report both.

use aligned_vec::{AVec, ConstAlign};
use fusedopt::{SimdLevel, StepError};
use rayon::prelude::*;

/// Bytes of memory traffic per parameter of an `f32` optimizer with `state_buffers` state
/// buffers: read weights, gradients and each state buffer; write weights and each state buffer.
/// SGD 12, Momentum/NAG/AdaGrad/RMSProp 20, Adam 28.
pub fn bytes_per_param(state_buffers: usize) -> usize {
    4 * (3 + 2 * state_buffers)
}

/// Largest number of state buffers [`SameStream`] models (Adam with AMSGrad has three).
pub const MAX_STATES: usize = 3;

/// A same-stream reference: the memory traffic of an optimizer with `states` state buffers of
/// `len` elements, with trivial arithmetic (`s ← s + g` for each state, `w ← w + g`).
#[derive(Debug)]
pub struct SameStream {
    states: Vec<AVec<f32, ConstAlign<64>>>,
    len: usize,
    chunk: usize,
}

impl SameStream {
    /// Allocates `states` zeroed 64-byte aligned buffers of `len` elements (at most
    /// [`MAX_STATES`]; more are clamped).
    pub fn new(states: usize, len: usize) -> SameStream {
        let states = (0..states.min(MAX_STATES))
            .map(|_| AVec::from_iter(64, core::iter::repeat_n(0.0, len)))
            .collect();
        SameStream {
            states,
            len,
            chunk: 1 << 16,
        }
    }

    /// Bytes per parameter this reference moves ([`bytes_per_param`]).
    pub fn bytes_per_param(&self) -> usize {
        bytes_per_param(self.states.len())
    }

    /// Elements per rayon task (default 65,536). `0` is treated as 1.
    pub fn set_chunk_len(&mut self, len: usize) {
        self.chunk = len.max(1);
    }

    fn check(&self, w: &[f32], g: &[f32]) -> Result<(), StepError> {
        if w.len() != g.len() {
            return Err(StepError::LengthMismatch {
                tensor: 0,
                weights: w.len(),
                grads: g.len(),
            });
        }
        if w.len() != self.len {
            return Err(StepError::TensorLen {
                tensor: 0,
                expected: self.len,
                found: w.len(),
            });
        }
        Ok(())
    }

    /// One pass over all streams, one rayon task per chunk on the current pool.
    ///
    /// # Errors
    /// [`StepError::LengthMismatch`] or [`StepError::TensorLen`] if the lengths differ from each
    /// other or from `len`; nothing is modified then.
    pub fn pass(&mut self, w: &mut [f32], g: &[f32]) -> Result<(), StepError> {
        self.check(w, g)?;
        let c = self.chunk;
        let avx2 = SimdLevel::detect() == SimdLevel::Avx2;
        let wg = w.par_chunks_mut(c).zip(g.par_chunks(c));
        match self.states.as_mut_slice() {
            [] => wg.for_each(|(w, g)| stream(avx2, w, g, [])),
            [a] => wg
                .zip(a.par_chunks_mut(c))
                .for_each(|((w, g), a)| stream(avx2, w, g, [a])),
            [a, b] => wg
                .zip(a.par_chunks_mut(c))
                .zip(b.par_chunks_mut(c))
                .for_each(|(((w, g), a), b)| stream(avx2, w, g, [a, b])),
            [a, b, s, ..] => wg
                .zip(a.par_chunks_mut(c))
                .zip(b.par_chunks_mut(c))
                .zip(s.par_chunks_mut(c))
                .for_each(|((((w, g), a), b), s)| stream(avx2, w, g, [a, b, s])),
        }
        Ok(())
    }

    /// One pass over all streams on the calling thread only.
    ///
    /// # Errors
    /// As [`pass`](SameStream::pass).
    pub fn pass_single(&mut self, w: &mut [f32], g: &[f32]) -> Result<(), StepError> {
        self.check(w, g)?;
        let avx2 = SimdLevel::detect() == SimdLevel::Avx2;
        match self.states.as_mut_slice() {
            [] => stream(avx2, w, g, []),
            [a] => stream(avx2, w, g, [a]),
            [a, b] => stream(avx2, w, g, [a, b]),
            [a, b, s, ..] => stream(avx2, w, g, [a, b, s]),
        }
        Ok(())
    }
}

/// The trivial loop over one chunk, compiled for AVX2 where `avx2` (the crate's cached detection
/// found it).
fn stream<const N: usize>(avx2: bool, w: &mut [f32], g: &[f32], s: [&mut [f32]; N]) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only where `SimdLevel::detect` found AVX2 on this CPU.
        return unsafe { stream_avx2(w, g, s) };
    }
    let _ = avx2;
    stream_body(w, g, s)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_avx2<const N: usize>(w: &mut [f32], g: &[f32], s: [&mut [f32]; N]) {
    stream_body(w, g, s)
}

/// `s ← s + g` for every state, `w ← w + g`, written so LLVM vectorizes it for the enclosing
/// target features.
#[inline(always)]
fn stream_body<const N: usize>(w: &mut [f32], g: &[f32], s: [&mut [f32]; N]) {
    let n = w.len();
    let g = &g[..n];
    let mut s = s.map(|x| &mut x[..n]);
    for i in 0..n {
        let gi = g[i];
        for sj in s.iter_mut() {
            sj[i] += gi;
        }
        w[i] += gi;
    }
}
