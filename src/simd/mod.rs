//! SIMD tiers: CPU detection, the [`Lane`] arithmetic kernels are written in, and the one generic
//! span loop every optimizer runs through. Imports nothing else of the crate.
//!
//! An optimizer describes its update once, element-wise, as [`Kernel::update`] over a generic
//! [`Lane`]: a plain `f32`, a portable 8-wide [`wide::f32x8`], or (on x86-64) an AVX2 register.
//! [`update_span`] instantiates that one body for the requested [`Tier`]. Every tier performs the
//! same IEEE-754 operations (add, sub, mul, div, sqrt; never a fused multiply-add or an approximate
//! reciprocal) in the same order, so all tiers produce bitwise identical results, and so does the
//! scalar loop that handles the tail of each span. That property is what makes results
//! independent of chunking and thread count.
//!
//! The best tier is detected once per process and cached ([`SimdLevel::detect`]). A [`Tier`] is a
//! level with its proof: the AVX2 tier carries an [`Avx2`] token, which safe code obtains only
//! from that detection, so no safe path reaches an instruction the CPU lacks.

use core::ops::{Add, Div, Mul, Neg, Sub};
use std::sync::atomic::{AtomicU8, Ordering};

pub(crate) mod compact;
mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;

pub(crate) use compact::{BLOCK, CompactState, Formats, Half, Map};

#[cfg(target_arch = "x86_64")]
pub(crate) use x86_avx2::Avx2;

/// An instruction-set tier that fusedopt's kernels can run on.
///
/// Tiers are ordered from slowest to fastest; every tier computes bitwise identical results.
/// [`SimdLevel::detect`] reports the best tier of the running CPU.
///
/// ```
/// use fusedopt::SimdLevel;
/// let best = SimdLevel::detect();
/// assert!(best >= SimdLevel::Portable);
/// assert!(SimdLevel::Scalar.is_available() && best.is_available());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// One element at a time: the plain reference kernel.
    Scalar,
    /// The portable 8-wide kernel built on the `wide` crate, using whatever instructions the
    /// build targets (SSE2 on a default x86-64 build, NEON on aarch64, scalar elsewhere).
    Portable,
    /// The 8-wide AVX2 kernel, selected at run time on x86-64 CPUs that support AVX2 and FMA.
    Avx2,
}

impl SimdLevel {
    /// Every tier, slowest first.
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Scalar, SimdLevel::Portable, SimdLevel::Avx2];

    /// The best tier the running CPU supports. Detected once per process, then cached.
    ///
    /// ```
    /// let level = fusedopt::SimdLevel::detect();
    /// assert_eq!(level, fusedopt::SimdLevel::detect());
    /// println!("running the {} kernels", level.name());
    /// ```
    pub fn detect() -> SimdLevel {
        static CACHED: AtomicU8 = AtomicU8::new(u8::MAX);
        match CACHED.load(Ordering::Relaxed) {
            0 => SimdLevel::Scalar,
            1 => SimdLevel::Portable,
            2 => SimdLevel::Avx2,
            _ => {
                let level = Self::probe();
                CACHED.store(level as u8, Ordering::Relaxed);
                level
            }
        }
    }

    fn probe() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Portable
    }

    /// Whether this tier can run on the current CPU.
    ///
    /// ```
    /// use fusedopt::SimdLevel;
    /// assert!(SimdLevel::Portable.is_available());
    /// assert_eq!(SimdLevel::Avx2.is_available(), SimdLevel::detect() == SimdLevel::Avx2);
    /// ```
    pub fn is_available(self) -> bool {
        self <= Self::detect()
    }

    /// The tiers the current CPU can run, slowest first.
    ///
    /// ```
    /// let tiers: Vec<_> = fusedopt::SimdLevel::available().collect();
    /// assert_eq!(tiers.first(), Some(&fusedopt::SimdLevel::Scalar));
    /// assert_eq!(tiers.last(), Some(&fusedopt::SimdLevel::detect()));
    /// ```
    pub fn available() -> impl Iterator<Item = SimdLevel> {
        Self::ALL.into_iter().filter(|l| l.is_available())
    }

    /// A short lower-case name: `"scalar"`, `"portable"` or `"avx2"`.
    ///
    /// ```
    /// assert_eq!(fusedopt::SimdLevel::Avx2.name(), "avx2");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
        }
    }
}

impl core::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// The best SIMD tier of the running CPU, by name (`"avx2"`, `"portable"`).
///
/// Shorthand for `SimdLevel::detect().name()`: the tier that [`Backend::Simd`](crate::Backend::Simd)
/// runs on.
///
/// ```
/// assert!(["portable", "avx2"].contains(&fusedopt::simd_level()));
/// ```
pub fn simd_level() -> &'static str {
    SimdLevel::detect().name()
}

/// A tier that can run here: a [`SimdLevel`] together with the proof that the CPU has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    Scalar,
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
}

impl Tier {
    /// The tier for `level`, or the best available one below it where the CPU lacks it.
    pub(crate) fn new(level: SimdLevel) -> Tier {
        match level {
            SimdLevel::Scalar => Tier::Scalar,
            SimdLevel::Portable => Tier::Portable,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => Avx2::detect().map_or(Tier::Portable, Tier::Avx2),
            #[cfg(not(target_arch = "x86_64"))]
            SimdLevel::Avx2 => Tier::Portable,
        }
    }

    /// The level this tier runs.
    pub(crate) fn level(self) -> SimdLevel {
        match self {
            Tier::Scalar => SimdLevel::Scalar,
            Tier::Portable => SimdLevel::Portable,
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2(_) => SimdLevel::Avx2,
        }
    }
}

/// A vector of `f32` lanes: the arithmetic an optimizer kernel is written in.
///
/// Implemented by `f32` (one lane), [`wide::f32x8`] and, on x86-64, an AVX2 register that only
/// code holding an [`Avx2`] token can instantiate. All implementations must round exactly as
/// IEEE-754 single precision does, lane by lane.
pub trait Lane:
    Copy
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    /// Number of `f32` elements in one vector.
    const WIDTH: usize;
    /// All lanes set to `x`.
    fn splat(x: f32) -> Self;
    /// Correctly rounded square root of every lane.
    fn sqrt(self) -> Self;
    /// Lane-wise `if self > other { self } else { other }`: a NaN in `other` is returned, a NaN
    /// in `self` is not (the semantics of x86's `maxps` with the operands in this order).
    fn max(self, other: Self) -> Self;
    /// Lane-wise `|x|`: the sign bit cleared (NaNs included), as `f32::abs`.
    fn abs(self) -> Self;
    /// Lane-wise sign: `1` for `x > 0`, `−1` for `x < 0`, `+0` for `±0`, and a NaN lane
    /// unchanged (so a NaN gradient still reaches the weights, as everywhere else).
    fn sign(self) -> Self;
    /// Loads `WIDTH` elements from `p`, which needs no particular alignment.
    ///
    /// # Safety
    /// `p` must be valid for reads of `WIDTH` `f32`s.
    unsafe fn load(p: *const f32) -> Self;
    /// Stores `WIDTH` elements to `p`, which needs no particular alignment.
    ///
    /// # Safety
    /// `p` must be valid for writes of `WIDTH` `f32`s.
    unsafe fn store(self, p: *mut f32);
    /// Loads `WIDTH` bfloat16 values from `p` (exactly).
    ///
    /// # Safety
    /// `p` must be valid for reads of `WIDTH` `u16`s.
    unsafe fn load_bf16(p: *const u16) -> Self;
    /// Stores every lane to `p` as bfloat16, rounded stochastically
    /// ([`compact::bf16_stochastic`]) with lane `l`'s random number
    /// [`compact::random`]`(seed, index + l)`.
    ///
    /// # Safety
    /// `p` must be valid for writes of `WIDTH` `u16`s.
    unsafe fn store_bf16(self, p: *mut u16, seed: u32, index: u32);
    /// Loads `WIDTH` 8-bit codes of the signed (`SIGNED`) or unsigned map from `p`, each
    /// decoded and multiplied by `scale`: lane by lane exactly `compact::decode(c) * scale`.
    ///
    /// # Safety
    /// `p` must be valid for reads of `WIDTH` bytes.
    #[inline(always)]
    unsafe fn load_q8<const SIGNED: bool>(p: *const u8, scale: f32) -> Self {
        let mut x = [0f32; 16];
        debug_assert!(Self::WIDTH <= x.len());
        for (l, v) in x.iter_mut().enumerate().take(Self::WIDTH) {
            // SAFETY: lane `l < WIDTH` is inside the caller's range.
            *v = compact::decode::<SIGNED>(unsafe { p.add(l).read() }) * scale;
        }
        // SAFETY: `x` holds at least `WIDTH` elements.
        unsafe { Self::load(x.as_ptr()) }
    }
    /// Quantizes the block `x` (at most [`BLOCK`] elements) into `codes` and returns its scale:
    /// exactly [`compact::quantize`], which is the default; a tier may do it faster.
    #[inline(always)]
    fn quantize<const SIGNED: bool>(x: &[f32], codes: &mut [u8]) -> f32 {
        compact::quantize(if SIGNED { Map::Signed } else { Map::Unsigned }, x, codes)
    }
    /// Hints that the cache line holding `p` will be read soon. `p` may point anywhere (a
    /// prefetch never faults); tiers without a prefetch instruction do nothing.
    #[inline(always)]
    fn prefetch(_p: *const f32) {}
}

/// How far ahead of the current element the vector loop prefetches each stream, in elements.
///
/// 2 KiB per stream. The sqrt/div optimizers are compute-heavy enough that the out-of-order core
/// stops issuing loads early; on a 2-core Zen 3 the prefetch lifts 64M-parameter Adam from 0.89
/// to about 1.0 of the same-stream reference.
const PREFETCH_AHEAD: usize = 512;

impl Lane for f32 {
    const WIDTH: usize = 1;
    #[inline(always)]
    fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if self > other { self } else { other }
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn sign(self) -> Self {
        if self > 0.0 {
            1.0
        } else if self < 0.0 {
            -1.0
        } else if self == 0.0 {
            0.0
        } else {
            self
        }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees `p` is valid for one read; f32 reads need 4-byte
        // alignment, which every `*const f32` derived from a slice has.
        unsafe { p.read() }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees `p` is valid for one write.
        unsafe { p.write(self) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self {
        // SAFETY: the caller guarantees one readable element.
        compact::bf16_to_f32(unsafe { p.read() })
    }
    #[inline(always)]
    unsafe fn store_bf16(self, p: *mut u16, seed: u32, index: u32) {
        // SAFETY: the caller guarantees one writable element.
        unsafe { p.write(compact::bf16_stochastic(self, compact::random(seed, index))) }
    }
}

/// Updates the `V::WIDTH` elements at `i` of a span whose state is bf16 at `s`.
///
/// # Safety
/// The pointer contract of [`span_loop`] for `w` and `g`, and `s[j]` valid for `i + V::WIDTH`
/// elements, with `i + V::WIDTH <= span.len`.
#[inline(always)]
unsafe fn update_vector_bf16<K: Kernel<N>, V: Lane, const N: usize>(
    k: &K,
    span: &Span<N>,
    s: &[*mut u16; N],
    seeds: &[u32; N],
    index: u32,
    i: usize,
) {
    // SAFETY: elements `i..i + V::WIDTH` lie inside every range (caller's contract).
    unsafe {
        // Index loops over `N` (not iterator chains over the arrays): they unroll completely
        // and keep the state vectors in registers.
        let mut st = [V::splat(0.0); N];
        for j in 0..N {
            st[j] = V::load_bf16(s[j].add(i));
        }
        let nw = k.update(V::load(span.w.add(i)), V::load(span.g.add(i)), &mut st);
        nw.store(span.w.add(i));
        let at = index.wrapping_add(i as u32);
        for j in 0..N {
            st[j].store_bf16(s[j].add(i), seeds[j], at);
        }
    }
}

/// The span loop over bf16 state (f32 weights and gradients): the state converted in registers.
///
/// # Safety
/// As [`update_vector_bf16`] over the whole span.
#[inline(always)]
unsafe fn span_loop_bf16<K: Kernel<N>, V: Lane, const N: usize>(
    k: &K,
    span: Span<N>,
    s: [*mut u16; N],
    seeds: [u32; N],
    index: u32,
) {
    let mut i = 0;
    // SAFETY: `i + V::WIDTH <= len` in the vector loop and `i < len` in the tail.
    unsafe {
        while i + 2 * V::WIDTH <= span.len {
            V::prefetch(span.w.wrapping_add(i + PREFETCH_AHEAD));
            V::prefetch(span.g.wrapping_add(i + PREFETCH_AHEAD));
            for p in s {
                V::prefetch(p.wrapping_add(i + PREFETCH_AHEAD).cast());
            }
            update_vector_bf16::<K, V, N>(k, &span, &s, &seeds, index, i);
            update_vector_bf16::<K, V, N>(k, &span, &s, &seeds, index, i + V::WIDTH);
            i += 2 * V::WIDTH;
        }
        while i < span.len {
            update_vector_bf16::<K, f32, N>(k, &span, &s, &seeds, index, i);
            i += 1;
        }
    }
}

/// Where a span's gradients come from: `f32` (`span.g`), or bfloat16 converted in registers.
#[derive(Clone, Copy)]
struct Grads {
    f32s: *const f32,
    bf16s: Option<*const u16>,
}

impl Grads {
    /// The `V::WIDTH` gradients at `i`.
    ///
    /// # Safety
    /// Elements `i..i + V::WIDTH` must be readable in the active source.
    #[inline(always)]
    unsafe fn load<V: Lane>(&self, i: usize) -> V {
        // SAFETY: the caller's contract.
        unsafe {
            match self.bf16s {
                None => V::load(self.f32s.add(i)),
                Some(p) => V::load_bf16(p.add(i)),
            }
        }
    }
}

/// Updates the `V::WIDTH` elements at `i` (of the block at `start`) of a span whose state is
/// 8-bit: the codes decoded in registers with the block's `scales`, the new state written to the
/// `f32` block `scratch` for [`Lane::quantize`].
///
/// # Safety
/// The pointer contract of [`span_loop_q8`], with `start + i + V::WIDTH <= span.len` and
/// `i + V::WIDTH <= BLOCK`.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn update_vector_q8<K: Kernel<N>, V: Lane, const N: usize>(
    k: &K,
    span: &Span<N>,
    grads: Grads,
    codes: &[*mut u8; N],
    signed: &[bool; N],
    scales: &[f32; N],
    scratch: &mut [[f32; BLOCK]; N],
    start: usize,
    i: usize,
) {
    let at = start + i;
    // SAFETY: elements `at..at + V::WIDTH` lie inside every range, and `i..i + V::WIDTH`
    // inside the scratch block (caller's contract).
    unsafe {
        let mut st = [V::splat(0.0); N];
        for j in 0..N {
            st[j] = if signed[j] {
                V::load_q8::<true>(codes[j].add(at), scales[j])
            } else {
                V::load_q8::<false>(codes[j].add(at), scales[j])
            };
        }
        let nw = k.update(V::load(span.w.add(at)), grads.load::<V>(at), &mut st);
        nw.store(span.w.add(at));
        for j in 0..N {
            st[j].store(scratch[j].as_mut_ptr().add(i));
        }
    }
}

/// The span loop over 8-bit state (f32 weights; f32 or bf16 gradients), block by block: each
/// vector's codes decoded in registers, the block's new state gathered in L1 and quantized once
/// the block is done. Bitwise what [`compact::block_loop`] computes.
///
/// # Safety
/// The pointer contract of [`span_loop`] for `w` (and `g` unless `grads.bf16s`), and every
/// pointer of `codes` valid for the span's elements and of `scales` for its blocks; the span
/// starts on a block boundary.
#[inline(always)]
unsafe fn span_loop_q8<K: Kernel<N>, V: Lane, const N: usize>(
    k: &K,
    span: Span<N>,
    grads: Grads,
    codes: [*mut u8; N],
    scales: [*mut f32; N],
    maps: [Map; N],
) {
    let signed = maps.map(|m| m == Map::Signed);
    let mut scratch = [[0f32; BLOCK]; N];
    let mut start = 0;
    // SAFETY: every block lies inside the span (`start + len <= span.len`), the scale of block
    // `start / BLOCK` exists, and the vector loops stay inside the block.
    unsafe {
        while start < span.len {
            let len = BLOCK.min(span.len - start);
            let block_scales: [f32; N] = core::array::from_fn(|j| *scales[j].add(start / BLOCK));
            let mut i = 0;
            while i + 2 * V::WIDTH <= len {
                let ahead = start + i + PREFETCH_AHEAD;
                V::prefetch(span.w.wrapping_add(ahead));
                match grads.bf16s {
                    None => V::prefetch(grads.f32s.wrapping_add(ahead)),
                    Some(p) => V::prefetch(p.wrapping_add(ahead).cast()),
                }
                for p in codes {
                    V::prefetch(p.wrapping_add(ahead).cast());
                }
                for h in [i, i + V::WIDTH] {
                    update_vector_q8::<K, V, N>(
                        k,
                        &span,
                        grads,
                        &codes,
                        &signed,
                        &block_scales,
                        &mut scratch,
                        start,
                        h,
                    );
                }
                i += 2 * V::WIDTH;
            }
            while i < len {
                update_vector_q8::<K, f32, N>(
                    k,
                    &span,
                    grads,
                    &codes,
                    &signed,
                    &block_scales,
                    &mut scratch,
                    start,
                    i,
                );
                i += 1;
            }
            for j in 0..N {
                let dst = core::slice::from_raw_parts_mut(codes[j].add(start), len);
                let x = &scratch[j][..len];
                *scales[j].add(start / BLOCK) = if signed[j] {
                    V::quantize::<true>(x, dst)
                } else {
                    V::quantize::<false>(x, dst)
                };
            }
            start += len;
        }
    }
}

/// An optimizer's element-wise update with `N` state buffers, written once for every [`Lane`].
///
/// The kernel value carries the per-step scalars (computed once per step, outside the loop).
///
/// A rule with a per-tensor trust ratio (LAMB, LARS) also says which two vectors' norms over a
/// tensor set its step ([`measure`](Kernel::measure)), and makes the tensor's kernel from them
/// ([`with_norms`](Kernel::with_norms)); the engine measures every such tensor in a read-only
/// pass before its update.
pub trait Kernel<const N: usize>: Sync {
    /// Whether kernels of this type may measure their tensors (a type's kernels that never do
    /// compile no measuring pass).
    const TRUST: bool = false;

    /// Updates one vector of elements: given weights `w`, gradients `g` and the state vectors,
    /// returns the new weights and updates `state` in place.
    fn update<V: Lane>(&self, w: V, g: V, state: &mut [V; N]) -> V;

    /// Whether this kernel's tensors are measured before their update (a rule may exempt some
    /// parameter groups).
    fn measures(&self) -> bool {
        Self::TRUST
    }

    /// The two vectors whose norms over the tensor this kernel's step depends on, from what
    /// [`update`](Kernel::update) reads (the state before the step), changing nothing.
    fn measure<V: Lane>(&self, w: V, g: V, _state: &[V; N]) -> [V; 2] {
        [w, g]
    }

    /// The kernel for a tensor whose measured vectors have the Euclidean norms `norms`.
    fn with_norms(&self, _norms: [f64; 2]) -> Self
    where
        Self: Copy,
    {
        *self
    }

    /// Whether the step of this type's kernels splits into a measuring pass that updates the
    /// state ([`measure_update`](Kernel::measure_update)) and an update that reads the new
    /// state instead of the gradients ([`apply`](Kernel::apply)): one read fewer than measuring
    /// and then updating. Used where state, weights and gradients are all `f32` (where the
    /// split computes what the update would, bit for bit).
    const SPLIT: bool = false;

    /// [`measure`](Kernel::measure), updating `state` as [`update`](Kernel::update) does.
    fn measure_update<V: Lane>(&self, w: V, g: V, state: &mut [V; N]) -> [V; 2] {
        self.measure(w, g, state)
    }

    /// The new weight from the state [`measure_update`](Kernel::measure_update) left: what
    /// [`update`](Kernel::update) returns.
    fn apply<V: Lane>(&self, w: V, _state: &[V; N]) -> V {
        w
    }
}

/// Pointers to one contiguous span of elements: weights, gradients and each state buffer.
#[derive(Clone, Copy)]
pub(crate) struct Span<const N: usize> {
    pub w: *mut f32,
    pub g: *const f32,
    pub s: [*mut f32; N],
    pub len: usize,
}

/// Updates the `V::WIDTH` elements at `i`.
///
/// A function rather than a closure: closures do not inherit `#[target_feature]`, so a closure's
/// SIMD operations would not be inlined into the AVX2 instantiation.
///
/// # Safety
/// The pointer contract of [`span_loop`], with `i + V::WIDTH <= span.len`.
#[inline(always)]
unsafe fn update_vector<K: Kernel<N>, V: Lane, const N: usize>(k: &K, span: &Span<N>, i: usize) {
    // SAFETY: elements `i..i + V::WIDTH` lie inside every range (caller's contract).
    unsafe {
        let mut st = [V::splat(0.0); N];
        for (v, p) in st.iter_mut().zip(span.s) {
            *v = V::load(p.add(i));
        }
        let nw = k.update(V::load(span.w.add(i)), V::load(span.g.add(i)), &mut st);
        nw.store(span.w.add(i));
        for (v, p) in st.into_iter().zip(span.s) {
            v.store(p.add(i));
        }
    }
}

/// The one span loop: full vectors of `V`, then the tail one element at a time.
///
/// # Safety
/// Every pointer of `span` must be valid for reads and writes (reads only for `g`) of `span.len`
/// elements, and the write ranges must not overlap each other or the gradient range.
#[inline(always)]
unsafe fn span_loop<K: Kernel<N>, V: Lane, const N: usize>(k: &K, span: Span<N>) {
    let Span { w, g, s, len } = span;
    let mut i = 0;
    // SAFETY: `i + V::WIDTH <= len` in the vector loop and `i < len` in the tail,
    // so every access stays inside the ranges the caller vouched for.
    unsafe {
        // Two vectors per iteration: independent work for the out-of-order core to overlap.
        while i + 2 * V::WIDTH <= len {
            // One cache line of every stream per iteration (8-wide tiers), PREFETCH_AHEAD ahead.
            // `wrapping_add`: the hinted address may lie past the end of the buffer.
            V::prefetch(span.w.wrapping_add(i + PREFETCH_AHEAD));
            V::prefetch(span.g.wrapping_add(i + PREFETCH_AHEAD));
            for j in 0..N {
                V::prefetch(span.s[j].wrapping_add(i + PREFETCH_AHEAD));
            }
            update_vector::<K, V, N>(k, &span, i);
            update_vector::<K, V, N>(k, &span, i + V::WIDTH);
            i += 2 * V::WIDTH;
        }
        if i + V::WIDTH <= len {
            update_vector::<K, V, N>(k, &span, i);
            i += V::WIDTH;
        }
        while i < len {
            let mut st = [0.0f32; N];
            for j in 0..N {
                st[j] = *s[j].add(i);
            }
            *w.add(i) = k.update(*w.add(i), *g.add(i), &mut st);
            for j in 0..N {
                *s[j].add(i) = st[j];
            }
            i += 1;
        }
    }
}

/// The one body every tier instantiates: the span loop when everything is `f32`, else the
/// block loop over compact state and half-precision weights or gradients.
///
/// # Safety
/// The pointer contract of [`span_loop`], or of [`compact::block_loop`] with `formats`.
#[inline(always)]
unsafe fn span_body<K: Kernel<N>, V: Lane, const N: usize>(
    k: &K,
    span: Span<N>,
    formats: Formats<N>,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if formats.all_f32() {
            span_loop::<K, V, N>(k, span)
        } else if let (Some(CompactState::Bf16 { s, seeds, index }), None, None) =
            (formats.state, formats.grads, formats.weights)
        {
            span_loop_bf16::<K, V, N>(k, span, s, seeds, index)
        } else if let (
            Some(CompactState::Q8 {
                codes,
                scales,
                maps,
            }),
            None | Some((Half::Bf16, _)),
            None,
        ) = (formats.state, formats.grads, formats.weights)
        {
            let grads = Grads {
                f32s: span.g,
                bf16s: formats.grads.map(|(_, p)| p),
            };
            span_loop_q8::<K, V, N>(k, span, grads, codes, scales, maps)
        } else {
            compact::block_loop::<K, V, N>(k, span, formats)
        }
    }
}

/// How a kernel reads its gradients, shared by every optimizer: `g ← g / div` (a loss scale that
/// is not a power of two), `g ← g·factor` (maximize, a power-of-two loss scale, clipping), then
/// `g ← g + wd·w` (L2 weight decay).
///
/// Each transform is compiled in only where it is active (`div != 1`, `factor != 1`, `wd != 0`),
/// so the default path runs exactly the optimizer's own formula, and `0·w` never turns an
/// infinite weight into NaN.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GradPrep {
    /// Divides every gradient; `1` divides nothing.
    pub div: f32,
    /// Multiplies every gradient; `1` leaves them as they are.
    pub factor: f32,
    /// L2 weight decay added to the transformed gradient; `0` adds nothing.
    pub wd: f32,
}

/// A kernel behind its gradient transform; `DIV`, `SCALE` and `L2` say which parts of the
/// [`GradPrep`] are active.
struct Prepped<'a, K, const DIV: bool, const SCALE: bool, const L2: bool> {
    kernel: &'a K,
    prep: GradPrep,
}

impl<K, const DIV: bool, const SCALE: bool, const L2: bool> Prepped<'_, K, DIV, SCALE, L2> {
    /// The gradient as the kernel reads it.
    #[inline(always)]
    fn grad<V: Lane>(&self, w: V, g: V) -> V {
        let g = if DIV { g / V::splat(self.prep.div) } else { g };
        let g = if SCALE {
            g * V::splat(self.prep.factor)
        } else {
            g
        };
        if L2 {
            g + V::splat(self.prep.wd) * w
        } else {
            g
        }
    }
}

impl<K: Kernel<N>, const N: usize, const DIV: bool, const SCALE: bool, const L2: bool> Kernel<N>
    for Prepped<'_, K, DIV, SCALE, L2>
{
    const TRUST: bool = K::TRUST;

    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, state: &mut [V; N]) -> V {
        self.kernel.update(w, self.grad(w, g), state)
    }

    #[inline(always)]
    fn measure<V: Lane>(&self, w: V, g: V, state: &[V; N]) -> [V; 2] {
        self.kernel.measure(w, self.grad(w, g), state)
    }

    const SPLIT: bool = K::SPLIT;

    #[inline(always)]
    fn measure_update<V: Lane>(&self, w: V, g: V, state: &mut [V; N]) -> [V; 2] {
        self.kernel.measure_update(w, self.grad(w, g), state)
    }
}

/// Work over one span that runs with whatever kernel type the gradient transform makes of an
/// optimizer's kernel ([`with_prep`]).
pub(crate) trait SpanJob<const N: usize> {
    /// What the work returns.
    type Out;
    /// Runs the work with kernel `k`.
    ///
    /// # Safety
    /// As the job's own contract (the pointers it holds).
    unsafe fn run<K: Kernel<N>>(self, k: &K) -> Self::Out;
}

/// Runs `job` with kernel `k` behind the gradient transform `prep`: each transform compiled in
/// only where it is active.
///
/// # Safety
/// The contract of `job`.
#[inline]
unsafe fn with_prep<K: Kernel<N>, J: SpanJob<N>, const N: usize>(
    k: &K,
    prep: GradPrep,
    job: J,
) -> J::Out {
    macro_rules! prepped {
        ($div:literal, $scale:literal, $l2:literal) => {
            job.run(&Prepped::<K, $div, $scale, $l2> { kernel: k, prep })
        };
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match (prep.div != 1.0, prep.factor != 1.0, prep.wd != 0.0) {
            (false, false, false) => job.run(k),
            (false, true, false) => prepped!(false, true, false),
            (false, false, true) => prepped!(false, false, true),
            (false, true, true) => prepped!(false, true, true),
            (true, false, false) => prepped!(true, false, false),
            (true, true, false) => prepped!(true, true, false),
            (true, false, true) => prepped!(true, false, true),
            (true, true, true) => prepped!(true, true, true),
        }
    }
}

/// Runs kernel `k` over `span` on `tier`, with gradients read through `prep`, and the state in
/// `f32` or compact, weights and gradients in `f32` or half precision (`formats`).
///
/// # Safety
/// The pointer contract of [`span_loop`], or of [`compact::block_loop`] with `formats`.
#[inline]
pub(crate) unsafe fn update_span<K: Kernel<N>, const N: usize>(
    tier: Tier,
    k: &K,
    prep: GradPrep,
    span: Span<N>,
    formats: Formats<N>,
) {
    /// The update of one span.
    struct Update<const N: usize>(Tier, Span<N>, Formats<N>);
    impl<const N: usize> SpanJob<N> for Update<N> {
        type Out = ();
        unsafe fn run<K: Kernel<N>>(self, k: &K) {
            // SAFETY: the contract of `update_span`.
            unsafe { update_span_on(self.0, k, self.1, self.2) }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { with_prep(k, prep, Update(tier, span, formats)) }
}

/// The norms' squares of the two vectors kernel `k` measures ([`Kernel::measure`]) over `span`
/// on `tier`, with gradients read through `prep` and the formats of `formats`; reads only.
///
/// Element `i` of the span adds its squares (in f64) to accumulator `i % 8` of each vector, in
/// order, whatever the tier; the accumulators are combined pairwise. So the sums have the same
/// bits on every tier, and do not depend on how the work around them is cut as long as the
/// spans are (the engine measures fixed slices).
///
/// # Safety
/// The pointer contract of [`update_span`], for reads.
#[inline]
pub(crate) unsafe fn measure_span<K: Kernel<N>, const N: usize>(
    tier: Tier,
    k: &K,
    prep: GradPrep,
    span: Span<N>,
    formats: Formats<N>,
) -> [f64; 2] {
    /// The measure of one span.
    struct Measure<const N: usize>(Tier, Span<N>, Formats<N>);
    impl<const N: usize> SpanJob<N> for Measure<N> {
        type Out = [f64; 2];
        unsafe fn run<K: Kernel<N>>(self, k: &K) -> [f64; 2] {
            let Measure(tier, span, formats) = self;
            // SAFETY: the contract of `measure_span`; each arm instantiates the same body for
            // one tier, and the AVX2 arm holds the token that proves the CPU has AVX2.
            let acc = unsafe {
                match tier {
                    Tier::Scalar => measure_body::<K, f32, N>(k, span, formats),
                    Tier::Portable => portable::measure_span(k, span, formats),
                    #[cfg(target_arch = "x86_64")]
                    Tier::Avx2(token) => x86_avx2::measure_span(token, k, span, formats),
                }
            };
            acc.map(|a| combine(&a))
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { with_prep(k, prep, Measure(tier, span, formats)) }
}

/// The second half of a split step ([`Kernel::SPLIT`]) over an all-`f32` span on `tier`: the
/// new weights from the state the measuring pass wrote; the gradients are not read.
///
/// # Safety
/// `span.w` valid for reads and writes and every `span.s` for reads of `span.len` elements.
#[inline]
pub(crate) unsafe fn apply_span<K: Kernel<N>, const N: usize>(tier: Tier, k: &K, span: Span<N>) {
    // SAFETY: forwarded from the caller; the AVX2 arm holds the token that proves the CPU has
    // AVX2.
    unsafe {
        match tier {
            Tier::Scalar => apply_body::<K, f32, N>(k, span),
            Tier::Portable => portable::apply_span(k, span),
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2(token) => x86_avx2::apply_span(token, k, span),
        }
    }
}

/// Applies the `V::WIDTH` elements at `i`.
///
/// # Safety
/// As [`apply_body`], with `i + V::WIDTH <= span.len`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn apply_vector<K: Kernel<N>, V: Lane, const N: usize>(k: &K, span: &Span<N>, i: usize) {
    // SAFETY: elements `i..i + V::WIDTH` lie inside every range (caller's contract).
    unsafe {
        let mut st = [V::splat(0.0); N];
        for j in 0..N {
            st[j] = V::load(span.s[j].add(i));
        }
        k.apply(V::load(span.w.add(i)), &st).store(span.w.add(i));
    }
}

/// The one body of [`apply_span`]: full vectors of `V`, then the tail one element at a time.
///
/// # Safety
/// The contract of [`apply_span`].
#[inline(always)]
unsafe fn apply_body<K: Kernel<N>, V: Lane, const N: usize>(k: &K, span: Span<N>) {
    let mut i = 0;
    // SAFETY: `i + V::WIDTH <= len` in the vector loops and `i < len` in the tail.
    unsafe {
        while i + 2 * V::WIDTH <= span.len {
            V::prefetch(span.w.wrapping_add(i + PREFETCH_AHEAD));
            for j in 0..N {
                V::prefetch(span.s[j].wrapping_add(i + PREFETCH_AHEAD));
            }
            apply_vector::<K, V, N>(k, &span, i);
            apply_vector::<K, V, N>(k, &span, i + V::WIDTH);
            i += 2 * V::WIDTH;
        }
        while i < span.len {
            apply_vector::<K, f32, N>(k, &span, i);
            i += 1;
        }
    }
}

/// Elements per row of the measuring loop: two vectors of the widest tier.
const MEASURE_ROW: usize = 16;

/// Adds the squares of `row` (at most [`MEASURE_ROW`] elements, starting at a multiple of 8 of
/// the span) into `acc`, element `r` into `acc[r % 8]`.
#[inline(always)]
fn add_squares(acc: &mut [f64; 8], row: &[f32]) {
    for (r, &x) in row.iter().enumerate() {
        let x = f64::from(x);
        acc[r % 8] += x * x;
    }
}

/// [`add_squares`] of a full row, written as two rows of eight so that it compiles to vector
/// conversions, multiplications and additions (the same additions, in the same order).
#[inline(always)]
fn add_squares_row(acc: &mut [f64; 8], row: &[f32; MEASURE_ROW]) {
    for half in [&row[..8], &row[8..]] {
        for (a, &x) in acc.iter_mut().zip(half) {
            let x = f64::from(x);
            *a += x * x;
        }
    }
}

/// Measures the elements `i..i + n` of an `f32` span into rows `a` and `b`, one lane of `V` at
/// a time.
///
/// # Safety
/// Elements `i..i + n` readable in every range of `span`; `n` a multiple of `V::WIDTH`, at most
/// [`MEASURE_ROW`].
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn measure_row<K: Kernel<N>, V: Lane, const N: usize, const WRITE: bool>(
    k: &K,
    span: &Span<N>,
    i: usize,
    n: usize,
    rows: &mut [[f32; MEASURE_ROW]; 2],
) {
    let mut h = 0;
    // SAFETY: `i + h + V::WIDTH <= i + n`, inside the ranges and the rows (caller's contract).
    unsafe {
        while h < n {
            let mut st = [V::splat(0.0); N];
            for j in 0..N {
                st[j] = V::load(span.s[j].add(i + h));
            }
            let (w, g) = (V::load(span.w.add(i + h)), V::load(span.g.add(i + h)));
            let [x, y] = if WRITE {
                let measured = k.measure_update(w, g, &mut st);
                for j in 0..N {
                    st[j].store(span.s[j].add(i + h));
                }
                measured
            } else {
                k.measure(w, g, &st)
            };
            x.store(rows[0].as_mut_ptr().add(h));
            y.store(rows[1].as_mut_ptr().add(h));
            h += V::WIDTH;
        }
    }
}

/// The measuring loop over an `f32` span: rows of [`MEASURE_ROW`] elements in vectors of `V`,
/// the last row one element at a time, the squares added into `acc` in element order; with
/// `WRITE`, the state updated as well ([`Kernel::measure_update`]).
///
/// # Safety
/// Every pointer of `span` valid for reads of `span.len` elements (and the state for writes,
/// with `WRITE`).
#[inline(always)]
unsafe fn measure_loop<K: Kernel<N>, V: Lane, const N: usize, const WRITE: bool>(
    k: &K,
    span: Span<N>,
    acc: &mut [[f64; 8]; 2],
) {
    let mut rows = [[0f32; MEASURE_ROW]; 2];
    let mut i = 0;
    // SAFETY: every row lies inside the span (`i + n <= span.len`).
    unsafe {
        while i + MEASURE_ROW <= span.len {
            V::prefetch(span.w.wrapping_add(i + PREFETCH_AHEAD));
            V::prefetch(span.g.wrapping_add(i + PREFETCH_AHEAD));
            for j in 0..N {
                V::prefetch(span.s[j].wrapping_add(i + PREFETCH_AHEAD));
            }
            measure_row::<K, V, N, WRITE>(k, &span, i, MEASURE_ROW, &mut rows);
            add_squares_row(&mut acc[0], &rows[0]);
            add_squares_row(&mut acc[1], &rows[1]);
            i += MEASURE_ROW;
        }
        let n = span.len - i;
        measure_row::<K, f32, N, WRITE>(k, &span, i, n, &mut rows);
        add_squares(&mut acc[0], &rows[0][..n]);
        add_squares(&mut acc[1], &rows[1][..n]);
    }
}

/// The one measuring body every tier instantiates: the `f32` loop (writing the state, for a
/// [`Kernel::SPLIT`] kernel), or, over compact state or
/// half-precision gradients, the same loop over each block expanded to `f32` (blocks are
/// multiples of [`MEASURE_ROW`] long, so every element keeps its accumulator).
///
/// # Safety
/// The pointer contract of [`span_body`], for reads.
#[inline(always)]
unsafe fn measure_body<K: Kernel<N>, V: Lane, const N: usize>(
    k: &K,
    span: Span<N>,
    formats: Formats<N>,
) -> [[f64; 8]; 2] {
    let mut acc = [[0f64; 8]; 2];
    // SAFETY: forwarded from the caller; each block lies inside the span.
    unsafe {
        if K::SPLIT && formats.all_f32() {
            measure_loop::<K, V, N, true>(k, span, &mut acc);
        } else if formats.state.is_none() && formats.grads.is_none() {
            // Half-precision weights are read from their f32 master copy, `span.w`.
            measure_loop::<K, V, N, false>(k, span, &mut acc);
        } else {
            let mut scratch = compact::Scratch::<N>::new();
            let mut start = 0;
            while start < span.len {
                let len = BLOCK.min(span.len - start);
                let block = scratch.expand(span, formats, start, len);
                measure_loop::<K, V, N, false>(k, block, &mut acc);
                start += len;
            }
        }
    }
    acc
}

/// Runs kernel `k` over `span`, instantiating the one body for `tier`.
///
/// # Safety
/// The pointer contract of [`span_body`].
#[inline]
unsafe fn update_span_on<K: Kernel<N>, const N: usize>(
    tier: Tier,
    k: &K,
    span: Span<N>,
    formats: Formats<N>,
) {
    // SAFETY: forwarded from the caller; each arm instantiates the same body for one tier, and
    // the AVX2 arm holds the token that proves the CPU has AVX2.
    unsafe {
        match tier {
            Tier::Scalar => span_body::<K, f32, N>(k, span, formats),
            Tier::Portable => portable::update_span(k, span, formats),
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2(token) => x86_avx2::update_span(token, k, span, formats),
        }
    }
}

/// The sum of the squares of `g`, in f64, in one fixed order whatever the tier: element `i` is
/// added to accumulator `i % 8`, and the accumulators are combined pairwise at the end.
///
/// An f32's square is exact in f64, and no sum of f32 squares overflows f64 short of 10^230
/// elements, so the result is finite exactly when every element is; and every tier computes the
/// same bits (the additions happen in the same order; the compiler never reorders them).
pub(crate) fn sum_squares(tier: Tier, g: &[f32]) -> f64 {
    match tier {
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2(token) => x86_avx2::sum_squares(token, g),
        _ => sum_squares_body(g),
    }
}

/// [`sum_squares`] of half-precision gradients: each element read as its exact `f32` value, the
/// squares added in the same order as [`sum_squares`] adds those of an `f32` slice, so the
/// result equals the sum over the converted gradients bit for bit.
pub(crate) fn sum_squares_half(kind: Half, g: &[u16]) -> f64 {
    let mut acc = [0f64; 8];
    let mut buf = [0f32; BLOCK];
    // Blocks of BLOCK (a multiple of 8) keep element i on accumulator i % 8.
    for block in g.chunks(BLOCK) {
        for (d, &b) in buf.iter_mut().zip(block) {
            *d = kind.to_f32(b);
        }
        accumulate(&mut acc, &buf[..block.len()]);
    }
    combine(&acc)
}

/// The one body of [`sum_squares`], inlined into each tier.
#[inline(always)]
fn sum_squares_body(g: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    accumulate(&mut acc, g);
    combine(&acc)
}

/// Adds the squares of `g` into `acc`: element `i` (counted from the start of `g`) into
/// `acc[i % 8]`, in order.
#[inline(always)]
fn accumulate(acc: &mut [f64; 8], g: &[f32]) {
    let mut add = |row: &[f32]| {
        for (a, &x) in acc.iter_mut().zip(row) {
            let x = f64::from(x);
            *a += x * x;
        }
    };
    let mut lines = g.chunks_exact(16);
    for line in &mut lines {
        prefetch_read_stream(line.as_ptr());
        add(&line[..8]);
        add(&line[8..]);
    }
    // Element i still goes to accumulator i % 8: a line holds two rows of eight.
    let rest = lines.remainder();
    let (full, tail) = rest.split_at(rest.len() / 8 * 8);
    full.chunks_exact(8).for_each(&mut add);
    add(tail);
}

/// The accumulators' sum, pairwise.
#[inline(always)]
fn combine(acc: &[f64; 8]) -> f64 {
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// Prefetch hints for a read-only stream at `p`: 16 KiB ahead into L2, 1 KiB ahead into L1.
///
/// A lone read stream is limited by the misses one core keeps in flight; on the 2-core test
/// machine the two hints take the norm pass from 17 to about 27 GB/s (a plain loop reaches 18).
/// Prefetches never fault, so the addresses may lie past the end of the buffer.
#[inline(always)]
fn prefetch_read_stream(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64; a prefetch is only a hint and never faults.
    unsafe {
        use core::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(4096).cast());
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(256).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_fall_back_to_what_the_cpu_has() {
        for level in SimdLevel::ALL {
            let tier = Tier::new(level);
            assert!(tier.level() <= level && tier.level().is_available());
            if level.is_available() {
                assert_eq!(tier.level(), level);
            }
        }
    }
}
