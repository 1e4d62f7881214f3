//! The portable tier: `wide::f32x8`, compiled for whatever target features the build has.

use super::{Formats, Kernel, Lane, Span, apply_body, measure_body, span_body};
use wide::{Select, f32x8};

impl Lane for f32x8 {
    const WIDTH: usize = 8;
    #[inline(always)]
    fn splat(x: f32) -> Self {
        f32x8::splat(x)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32x8::sqrt(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        // Not `f32x8::max`, whose NaN rule differs from the other tiers'.
        Select::select(self.simd_gt(other), self, other)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        // Clears the sign bit, as `f32::abs`.
        f32x8::abs(self)
    }
    #[inline(always)]
    fn sign(self) -> Self {
        let (zero, one) = (f32x8::splat(0.0), f32x8::splat(1.0));
        // pos − neg: +0 for ±0 (and for NaN, which the select then puts back).
        let pos = Select::select(self.simd_gt(zero), one, zero);
        let neg = Select::select(self.simd_lt(zero), one, zero);
        Select::select(self.simd_eq(self), pos - neg, self)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable elements; `read_unaligned` needs no alignment.
        f32x8::new(unsafe { p.cast::<[f32; 8]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 writable elements; `write_unaligned` needs no alignment.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(self.to_array()) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self {
        // SAFETY: the caller guarantees 8 readable elements.
        let b = unsafe { p.cast::<[u16; 8]>().read_unaligned() };
        f32x8::new(b.map(super::compact::bf16_to_f32))
    }
    #[inline(always)]
    unsafe fn store_bf16(self, p: *mut u16, seed: u32, index: u32) {
        let x = self.to_array();
        let out: [u16; 8] = core::array::from_fn(|l| {
            let r = super::compact::random(seed, index.wrapping_add(l as u32));
            super::compact::bf16_stochastic(x[l], r)
        });
        // SAFETY: the caller guarantees 8 writable elements.
        unsafe { p.cast::<[u16; 8]>().write_unaligned(out) }
    }
    #[inline(always)]
    fn prefetch(_p: *const f32) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE is part of x86-64; a prefetch is only a hint and never faults.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(_p.cast())
        }
    }
}

/// Runs kernel `k` over `span` with `f32x8`. The portable tier runs on every CPU the build
/// targets.
///
/// # Safety
/// The pointer contract of [`span_body`].
pub(super) unsafe fn update_span<K: Kernel<N>, const N: usize>(
    k: &K,
    span: Span<N>,
    formats: Formats<N>,
) {
    // SAFETY: forwarded from the caller.
    unsafe { span_body::<K, f32x8, N>(k, span, formats) }
}

/// [`measure_body`] with `f32x8`.
///
/// # Safety
/// The pointer contract of [`measure_body`].
pub(super) unsafe fn measure_span<K: Kernel<N>, const N: usize>(
    k: &K,
    span: Span<N>,
    formats: Formats<N>,
) -> [[f64; 8]; 2] {
    // SAFETY: forwarded from the caller.
    unsafe { measure_body::<K, f32x8, N>(k, span, formats) }
}

/// [`apply_body`] with `f32x8`.
///
/// # Safety
/// The pointer contract of [`apply_body`].
pub(super) unsafe fn apply_span<K: Kernel<N>, const N: usize>(k: &K, span: Span<N>) {
    // SAFETY: forwarded from the caller.
    unsafe { apply_body::<K, f32x8, N>(k, span) }
}
