//! Same-stream reference kernels: the attainable speed of an optimizer step on this machine.
//!
//! An optimizer step is a stream over memory: it reads weights, gradients and each state buffer
//! and writes weights and state. [`SameStream`] reads and writes exactly the same streams with
//! trivial arithmetic (one add per written stream), as a plain rayon loop over AVX2 code (or
//! portable code elsewhere). Its speed is what the memory system allows; an optimizer's speed
//! divided by it is the fraction of attainable bandwidth. The benches, `examples/perf.rs` and
//! `examples/tune.rs` report both.
//!
//! ```
//! use fusedopt::roofline::{SameStream, bytes_per_param};
//! use fusedopt::{Adam, AdamConfig, Optimizer};
//! let opt = Adam::new(AdamConfig::default());
//! assert_eq!(bytes_per_param(opt.state_buffers()), 28);
//! let mut reference = SameStream::new(opt.state_buffers(), 1000);
//! let mut w = vec![0.0f32; 1000];
//! reference.run(&mut w, &[1.0; 1000]).unwrap();
//! assert_eq!(w[999], 1.0);
//! ```

use crate::optimizer::StepError;
use aligned_vec::{AVec, ConstAlign};
use rayon::prelude::*;

/// Bytes of memory traffic per parameter of an `f32` optimizer with `state_buffers` state
/// buffers: read weights, gradients and each state buffer; write weights and each state buffer.
/// SGD 12, Momentum/NAG/AdaGrad/RMSProp 20, Adam 28.
///
/// ```
/// assert_eq!(fusedopt::roofline::bytes_per_param(0), 12);
/// assert_eq!(fusedopt::roofline::bytes_per_param(1), 20);
/// ```
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

#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: tasks write disjoint chunks; the step holds exclusive borrows of every buffer.
unsafe impl Send for Ptr {}
// SAFETY: as above.
unsafe impl Sync for Ptr {}

impl Ptr {
    /// Taking `self` makes closures capture the whole `Send` wrapper, not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl SameStream {
    /// Allocates `states` zeroed 64-byte aligned buffers of `len` elements (at most
    /// [`MAX_STATES`]; more are clamped).
    ///
    /// ```
    /// let r = fusedopt::roofline::SameStream::new(2, 64);
    /// assert_eq!(r.bytes_per_param(), 28);
    /// ```
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
    ///
    /// ```
    /// assert_eq!(fusedopt::roofline::SameStream::new(0, 8).bytes_per_param(), 12);
    /// ```
    pub fn bytes_per_param(&self) -> usize {
        bytes_per_param(self.states.len())
    }

    /// Elements per rayon task (default 65,536). `0` is treated as 1.
    ///
    /// ```
    /// let mut r = fusedopt::roofline::SameStream::new(1, 100);
    /// r.set_chunk_len(10);
    /// let mut w = vec![0.0f32; 100];
    /// r.run(&mut w, &[2.0; 100]).unwrap();
    /// assert!(w.iter().all(|&x| x == 2.0));
    /// ```
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

    /// One pass over all streams, split into chunks on the current rayon pool.
    ///
    /// ```
    /// let mut r = fusedopt::roofline::SameStream::new(2, 3);
    /// let mut w = [1.0f32; 3];
    /// r.run(&mut w, &[1.0; 3]).unwrap();
    /// assert_eq!(w, [2.0; 3]);
    /// assert!(r.run(&mut w, &[1.0; 2]).is_err());
    /// ```
    ///
    /// # Errors
    /// [`StepError::LengthMismatch`] or [`StepError::TensorLen`] if the lengths differ from each
    /// other or from `len`; nothing is modified then.
    pub fn run(&mut self, w: &mut [f32], g: &[f32]) -> Result<(), StepError> {
        self.check(w, g)?;
        let (wp, gp) = (Ptr(w.as_mut_ptr()), Ptr(g.as_ptr().cast_mut()));
        let sp: Vec<Ptr> = self
            .states
            .iter_mut()
            .map(|s| Ptr(s.as_mut_ptr()))
            .collect();
        let (len, chunk) = (self.len, self.chunk);
        (0..len.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let start = c * chunk;
            let n = chunk.min(len - start);
            // SAFETY: chunk `c` covers `start..start + n`, inside every buffer (all `len` long,
            // checked above); chunks are disjoint.
            unsafe { pass(wp.get().add(start), gp.get().add(start), &sp, start, n) }
        });
        Ok(())
    }

    /// One pass over all streams on the calling thread only.
    ///
    /// ```
    /// let mut r = fusedopt::roofline::SameStream::new(0, 2);
    /// let mut w = [0.5f32; 2];
    /// r.run_single(&mut w, &[0.5; 2]).unwrap();
    /// assert_eq!(w, [1.0; 2]);
    /// ```
    ///
    /// # Errors
    /// As [`run`](SameStream::run).
    pub fn run_single(&mut self, w: &mut [f32], g: &[f32]) -> Result<(), StepError> {
        self.check(w, g)?;
        let sp: Vec<Ptr> = self
            .states
            .iter_mut()
            .map(|s| Ptr(s.as_mut_ptr()))
            .collect();
        // SAFETY: all buffers hold `len` elements (checked above).
        unsafe { pass(w.as_mut_ptr(), g.as_ptr(), &sp, 0, self.len) }
        Ok(())
    }
}

/// # Safety
/// `w` and `g` valid for `n` elements; every `s[j]` valid for `start + n` elements.
unsafe fn pass(w: *mut f32, g: *const f32, s: &[Ptr], start: usize, n: usize) {
    // SAFETY: forwarded; the state pointers are offset to the chunk.
    unsafe {
        let at = |j: usize| s[j].get().add(start);
        match s.len() {
            0 => stream::<0>(w, g, [], n),
            1 => stream::<1>(w, g, [at(0)], n),
            2 => stream::<2>(w, g, [at(0), at(1)], n),
            _ => stream::<3>(w, g, [at(0), at(1), at(2)], n),
        }
    }
}

/// # Safety
/// Every pointer valid for `n` elements; the written ranges disjoint.
unsafe fn stream<const N: usize>(w: *mut f32, g: *const f32, s: [*mut f32; N], n: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present; pointer contract forwarded.
        return unsafe { stream_avx2(w, g, s, n) };
    }
    // SAFETY: forwarded.
    unsafe { stream_body(w, g, s, n) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_avx2<const N: usize>(w: *mut f32, g: *const f32, s: [*mut f32; N], n: usize) {
    // SAFETY: forwarded.
    unsafe { stream_body(w, g, s, n) }
}

/// The trivial loop, written so LLVM vectorizes it for the enclosing target features.
///
/// # Safety
/// Every pointer valid for `n` elements; the written ranges disjoint.
#[inline(always)]
unsafe fn stream_body<const N: usize>(w: *mut f32, g: *const f32, s: [*mut f32; N], n: usize) {
    // SAFETY: the caller guarantees `n` valid, non-overlapping elements behind each pointer.
    unsafe {
        let w = core::slice::from_raw_parts_mut(w, n);
        let g = core::slice::from_raw_parts(g, n);
        let mut s = s.map(|p| core::slice::from_raw_parts_mut(p, n));
        for i in 0..n {
            let gi = g[i];
            for sj in s.iter_mut() {
                sj[i] += gi;
            }
            w[i] += gi;
        }
    }
}
