//! The AVX2 tier: the proof token [`Avx2`], and the generic kernel body instantiated over an AVX
//! register inside functions compiled with `#[target_feature(enable = "avx2,fma")]`.
//!
//! FMA is enabled for the code generator but never requested: the kernels use separate multiply
//! and add, and LLVM does not contract them on its own, so results stay bitwise identical to the
//! scalar and portable tiers.
//!
//! # Soundness
//! Safe code reaches AVX2 instructions only through [`update_span`] and [`sum_squares`], which
//! take an [`Avx2`] token. The token is a zero-sized proof: safe code gets one only from
//! [`Avx2::detect`], which returns it only when the CPU has AVX2 and FMA. The lane type
//! [`Ymm`] is private to this module and instantiated only inside [`update_span`], so its
//! arithmetic, which uses AVX2 without a check, never runs without that proof.

use super::{Formats, Kernel, Lane, SimdLevel, Span, span_body, sum_squares_body};
use core::arch::x86_64::*;
use core::ops::{Add, Div, Mul, Neg, Sub};

/// Proof that the running CPU supports AVX2 and FMA (zero-sized; [`Avx2::detect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2 {
    _proof: (),
}

impl Avx2 {
    /// The token, if the CPU supports AVX2 and FMA (the process-wide cached detection of
    /// [`SimdLevel::detect`]).
    pub(crate) fn detect() -> Option<Avx2> {
        (SimdLevel::detect() >= SimdLevel::Avx2).then_some(Avx2 { _proof: () })
    }
}

/// An AVX register of eight `f32`: the AVX2 tier's [`Lane`].
///
/// Private to this module and instantiated only by [`update_span`], which holds an [`Avx2`]
/// token: a value of this type exists only on a CPU with AVX2, which is what makes the intrinsic
/// calls in the trait implementations below sound.
#[derive(Clone, Copy)]
struct Ymm(__m256);

macro_rules! binop {
    ($tr:ident, $f:ident, $intr:ident) => {
        impl $tr for Ymm {
            type Output = Ymm;
            #[inline(always)]
            fn $f(self, rhs: Ymm) -> Ymm {
                // SAFETY: AVX is available wherever a `Ymm` exists (type invariant).
                Ymm(unsafe { $intr(self.0, rhs.0) })
            }
        }
    };
}
binop!(Add, add, _mm256_add_ps);
binop!(Sub, sub, _mm256_sub_ps);
binop!(Mul, mul, _mm256_mul_ps);
binop!(Div, div, _mm256_div_ps);

impl Neg for Ymm {
    type Output = Ymm;
    #[inline(always)]
    fn neg(self) -> Ymm {
        // SAFETY: AVX is available wherever a `Ymm` exists (type invariant). Flipping the sign
        // bit is exactly what scalar `-x` does, zeros and NaNs included.
        Ymm(unsafe { _mm256_xor_ps(self.0, _mm256_set1_ps(-0.0)) })
    }
}

impl Lane for Ymm {
    const WIDTH: usize = 8;
    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: only instantiated inside `update_span`, which holds an `Avx2` token.
        Ymm(unsafe { _mm256_set1_ps(x) })
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        // SAFETY: type invariant. `vsqrtps` is correctly rounded, like `f32::sqrt`.
        Ymm(unsafe { _mm256_sqrt_ps(self.0) })
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        // SAFETY: type invariant. `vmaxps a, b` is `a > b ? a : b` lane-wise, as `Lane::max`.
        Ymm(unsafe { _mm256_max_ps(self.0, other.0) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: type invariant for AVX; the caller guarantees 8 readable elements, and `loadu`
        // needs no alignment.
        Ymm(unsafe { _mm256_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: type invariant for AVX; the caller guarantees 8 writable elements, and
        // `storeu` needs no alignment.
        unsafe { _mm256_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self {
        // SAFETY: type invariant for AVX2; the caller guarantees 8 readable elements. Widening
        // each 16-bit pattern and shifting it into the high half is the exact bf16 value.
        unsafe {
            let b = _mm_loadu_si128(p.cast());
            Ymm(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                _mm256_cvtepu16_epi32(b),
            )))
        }
    }
    #[inline(always)]
    unsafe fn store_bf16(self, p: *mut u16, seed: u32, index: u32) {
        // SAFETY: type invariant for AVX2; the caller guarantees 8 writable elements. The same
        // integer steps as `bf16_stochastic` and `random`, lane by lane.
        unsafe {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let at = _mm256_add_epi32(_mm256_set1_epi32(index as i32), lanes);
            let weyl = _mm256_add_epi32(
                _mm256_set1_epi32(seed as i32),
                _mm256_mullo_epi32(at, _mm256_set1_epi32(0x9E37_79B9_u32 as i32)),
            );
            let r = _mm256_srli_epi32::<16>(weyl);
            let bits = _mm256_castps_si256(self.0);
            let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, r));
            let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x0040));
            let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0));
            let out = _mm256_blendv_epi8(rounded, quiet, nan);
            // Every lane is below 2^16: packing with unsigned saturation keeps it.
            let packed = _mm_packus_epi32(
                _mm256_castsi256_si128(out),
                _mm256_extracti128_si256::<1>(out),
            );
            _mm_storeu_si128(p.cast(), packed);
        }
    }
    #[inline(always)]
    fn prefetch(p: *const f32) {
        // SAFETY: a prefetch is only a hint: it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
    }
}

/// Runs kernel `k` over `span` with AVX2.
///
/// # Safety
/// The pointer contract of [`span_body`].
#[inline]
pub(super) unsafe fn update_span<K: Kernel<N>, const N: usize>(
    _: Avx2,
    k: &K,
    span: Span<N>,
    formats: Formats<N>,
) {
    // SAFETY: the token proves AVX2 and FMA; the pointer contract is forwarded.
    unsafe { update_span_avx2(k, span, formats) }
}

/// # Safety
/// The pointer contract of [`span_body`], and the CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn update_span_avx2<K: Kernel<N>, const N: usize>(
    k: &K,
    span: Span<N>,
    formats: Formats<N>,
) {
    // SAFETY: forwarded from the caller; AVX2 is enabled for this function's body.
    unsafe { span_body::<K, Ymm, N>(k, span, formats) }
}

/// [`sum_squares_body`] compiled for AVX2.
#[inline]
pub(super) fn sum_squares(_: Avx2, g: &[f32]) -> f64 {
    // SAFETY: the token proves AVX2 and FMA.
    unsafe { sum_squares_avx2(g) }
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_squares_avx2(g: &[f32]) -> f64 {
    sum_squares_body(g)
}
