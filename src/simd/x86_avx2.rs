//! The AVX2 tier: the generic kernel body instantiated over `__m256` inside a function compiled
//! with `#[target_feature(enable = "avx2,fma")]`, chosen at run time.
//!
//! FMA is enabled for the code generator but never requested: the kernels use separate multiply
//! and add, and LLVM does not contract them on its own, so results stay bitwise identical to the
//! scalar and portable tiers.

use super::{Kernel, Lane, Run, chunk, sum_squares_body};
use core::arch::x86_64::*;
use core::ops::{Add, Div, Mul, Neg, Sub};

/// An AVX register of eight `f32`.
///
/// Invariant: values of this type are created and used only inside [`run`], which is reached
/// only after [`SimdLevel::detect`](super::SimdLevel::detect) found AVX2 and FMA. That is what
/// makes the intrinsic calls in the trait implementations below sound.
#[derive(Clone, Copy)]
pub(super) struct Avx2(__m256);

macro_rules! binop {
    ($tr:ident, $f:ident, $intr:ident) => {
        impl $tr for Avx2 {
            type Output = Avx2;
            #[inline(always)]
            fn $f(self, rhs: Avx2) -> Avx2 {
                // SAFETY: AVX is available wherever an `Avx2` exists (type invariant).
                Avx2(unsafe { $intr(self.0, rhs.0) })
            }
        }
    };
}
binop!(Add, add, _mm256_add_ps);
binop!(Sub, sub, _mm256_sub_ps);
binop!(Mul, mul, _mm256_mul_ps);
binop!(Div, div, _mm256_div_ps);

impl Neg for Avx2 {
    type Output = Avx2;
    #[inline(always)]
    fn neg(self) -> Avx2 {
        // SAFETY: AVX is available wherever an `Avx2` exists (type invariant). Flipping the sign
        // bit is exactly what scalar `-x` does, zeros and NaNs included.
        Avx2(unsafe { _mm256_xor_ps(self.0, _mm256_set1_ps(-0.0)) })
    }
}

impl Lane for Avx2 {
    const WIDTH: usize = 8;
    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: only called inside `run` (type invariant).
        Avx2(unsafe { _mm256_set1_ps(x) })
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        // SAFETY: type invariant. `vsqrtps` is correctly rounded, like `f32::sqrt`.
        Avx2(unsafe { _mm256_sqrt_ps(self.0) })
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        // SAFETY: type invariant. `vmaxps a, b` is `a > b ? a : b` lane-wise, as `Lane::max`.
        Avx2(unsafe { _mm256_max_ps(self.0, other.0) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable elements; `loadu` needs no alignment.
        Avx2(unsafe { _mm256_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 writable elements; `storeu` needs no alignment.
        unsafe { _mm256_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    fn prefetch(p: *const f32) {
        // SAFETY: a prefetch is only a hint: it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
    }
}

/// # Safety
/// The pointer contract of [`chunk`], and the CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn run<K: Kernel<N>, const N: usize>(k: &K, run: Run<N>) {
    // SAFETY: forwarded from the caller; AVX2 is enabled for this function's body.
    unsafe { chunk::<K, Avx2, N>(k, run) }
}

/// [`sum_squares_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn sum_squares(g: &[f32]) -> f64 {
    sum_squares_body(g)
}
