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

use super::{
    Formats, Kernel, Lane, SimdLevel, Span, apply_body, compact, measure_body, span_body,
    sum_squares_body,
};
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
    fn abs(self) -> Self {
        // SAFETY: type invariant. Clearing the sign bit is exactly `f32::abs`.
        Ymm(unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), self.0) })
    }
    #[inline(always)]
    fn sign(self) -> Self {
        // SAFETY: type invariant. pos − neg from ordered compares is +0 for ±0 and NaN; the
        // blend puts a NaN lane (unordered with itself) back, as the scalar `Lane::sign`.
        unsafe {
            let (zero, one) = (_mm256_setzero_ps(), _mm256_set1_ps(1.0));
            let pos = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(self.0, zero), one);
            let neg = _mm256_and_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(self.0, zero), one);
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0);
            Ymm(_mm256_blendv_ps(_mm256_sub_ps(pos, neg), self.0, nan))
        }
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
            // A NaN adds nothing and gets the quiet bit: `(bits >> 16) | 0x40`, as the scalar.
            let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0));
            let rounded =
                _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, _mm256_andnot_si256(nan, r)));
            let out = _mm256_or_si256(rounded, _mm256_and_si256(nan, _mm256_set1_epi32(0x0040)));
            // Every lane is below 2^16: packing with unsigned saturation keeps it.
            let packed = _mm_packus_epi32(
                _mm256_castsi256_si128(out),
                _mm256_extracti128_si256::<1>(out),
            );
            _mm_storeu_si128(p.cast(), packed);
        }
    }
    #[inline(always)]
    unsafe fn load_q8<const SIGNED: bool>(p: *const u8, scale: f32) -> Self {
        let (m, bias) = (compact::mant(SIGNED), compact::bias(SIGNED));
        // SAFETY: type invariant for AVX2; the caller guarantees 8 readable bytes. The values
        // of `compact::decode`, exactly: a normal code `c` is the f32 with exponent field
        // `c / 2^M + bias` and mantissa `c mod 2^M`; a sub-normal one is the normal value of
        // exponent field `bias + 1` less that exponent's implicit one, `2^e·(1 + c/2^M) - 2^e`,
        // which is exactly `c·step`.
        unsafe {
            let c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()));
            let mag = if SIGNED {
                _mm256_and_si256(c, _mm256_set1_epi32(0x7F))
            } else {
                _mm256_and_si256(c, _mm256_set1_epi32(0xFF))
            };
            let normal = _mm256_slli_epi32::<0>(_mm256_add_epi32(
                mag,
                _mm256_set1_epi32((bias << m) as i32),
            ));
            let normal = if SIGNED {
                _mm256_slli_epi32::<19>(normal)
            } else {
                _mm256_slli_epi32::<20>(normal)
            };
            let one = compact::pow2(bias as i32 + 1 - 127);
            let small = _mm256_sub_ps(
                _mm256_castsi256_ps(_mm256_add_epi32(normal, _mm256_set1_epi32(1 << 23))),
                _mm256_set1_ps(one),
            );
            // For a sub-normal code `normal` reads as `2^(e-1)·(1 + c/2^M)`, above `small`; for
            // a normal one `small` is `2·normal - 2^e`, at least `normal`: the smaller is the
            // value. `minps(small, normal)` returns `normal` if `small` is not a number (codes
            // past the unsigned map's top, which quantizing never writes).
            let mut v = _mm256_min_ps(small, _mm256_castsi256_ps(normal));
            if SIGNED {
                // `c` is sign-extended: its top bit is the code's sign bit.
                let sign = _mm256_and_si256(c, _mm256_set1_epi32(i32::MIN));
                v = _mm256_or_ps(v, _mm256_castsi256_ps(sign));
            }
            Ymm(_mm256_mul_ps(v, _mm256_set1_ps(scale)))
        }
    }
    #[inline(always)]
    fn quantize<const SIGNED: bool>(x: &[f32], codes: &mut [u8]) -> f32 {
        // SAFETY: AVX2 is available wherever a `Ymm` exists (type invariant).
        unsafe { quantize_avx2::<SIGNED>(x, codes) }
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

/// [`measure_body`] with AVX2.
///
/// # Safety
/// The pointer contract of [`measure_body`].
#[inline]
pub(super) unsafe fn measure_span<K: Kernel<N>, const N: usize>(
    _: Avx2,
    k: &K,
    span: Span<N>,
    formats: Formats<N>,
) -> [[f64; 8]; 2] {
    // SAFETY: the token proves AVX2 and FMA; the pointer contract is forwarded.
    unsafe { measure_span_avx2(k, span, formats) }
}

/// # Safety
/// The pointer contract of [`measure_body`], and the CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn measure_span_avx2<K: Kernel<N>, const N: usize>(
    k: &K,
    span: Span<N>,
    formats: Formats<N>,
) -> [[f64; 8]; 2] {
    // SAFETY: forwarded from the caller; AVX2 is enabled for this function's body.
    unsafe { measure_body::<K, Ymm, N>(k, span, formats) }
}

/// [`apply_body`] with AVX2.
///
/// # Safety
/// The pointer contract of [`apply_body`].
#[inline]
pub(super) unsafe fn apply_span<K: Kernel<N>, const N: usize>(_: Avx2, k: &K, span: Span<N>) {
    // SAFETY: the token proves AVX2 and FMA; the pointer contract is forwarded.
    unsafe { apply_span_avx2(k, span) }
}

/// # Safety
/// The pointer contract of [`apply_body`], and the CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_span_avx2<K: Kernel<N>, const N: usize>(k: &K, span: Span<N>) {
    // SAFETY: forwarded from the caller; AVX2 is enabled for this function's body.
    unsafe { apply_body::<K, Ymm, N>(k, span) }
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

/// The code of every lane of `y` (a block's values divided by its absmax): the integer steps of
/// `compact::encode`, lane by lane.
///
/// # Safety
/// The CPU must support AVX2 (callers hold a `Ymm`, whose existence proves it).
#[inline(always)]
unsafe fn encode<const SIGNED: bool>(y: __m256) -> __m256i {
    let (m, bias) = (compact::mant(SIGNED), compact::bias(SIGNED));
    // SAFETY: AVX2 (the caller's contract); pure register arithmetic.
    unsafe {
        let yi = _mm256_castps_si256(y);
        let bits = _mm256_and_si256(yi, _mm256_set1_epi32(0x7FFF_FFFF));
        let shift = 23 - m;
        let offset = (1i32 << (shift - 1)) - ((bias << 23) as i32);
        let sum = _mm256_add_epi32(bits, _mm256_set1_epi32(offset));
        let normal = if SIGNED {
            _mm256_srai_epi32::<19>(sum)
        } else {
            _mm256_srai_epi32::<20>(sum)
        };
        let scaled = _mm256_mul_ps(
            _mm256_castsi256_ps(bits),
            _mm256_set1_ps(1.0 / compact::sub_step(SIGNED)),
        );
        let small = _mm256_sub_epi32(
            _mm256_castps_si256(_mm256_add_ps(scaled, _mm256_set1_ps(8_388_608.0))),
            _mm256_set1_epi32(0x4B00_0000),
        );
        let magnitude =
            _mm256_max_epi32(normal, _mm256_min_epi32(small, _mm256_set1_epi32(2 << m)));
        if SIGNED {
            let sign = _mm256_slli_epi32::<7>(_mm256_srli_epi32::<31>(yi));
            _mm256_or_si256(magnitude, sign)
        } else {
            magnitude
        }
    }
}

/// `compact::quantize` with AVX2: the absmax on the bits, then 32 codes at a time packed from
/// four registers; the last `len % 32` codes by the scalar encoder.
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn quantize_avx2<const SIGNED: bool>(x: &[f32], codes: &mut [u8]) -> f32 {
    let n = x.len().min(codes.len());
    let full = n / 32 * 32;
    // SAFETY: AVX2 (the caller's contract); every load covers `i..i + 8` with
    // `i + 8 <= full <= n`, and the stores cover `i..i + 32` with `i + 32 <= full`.
    unsafe {
        let magnitude = _mm256_set1_epi32(0x7FFF_FFFF);
        let mut top = _mm256_setzero_si256();
        let mut i = 0;
        while i + 8 <= n {
            let b = _mm256_loadu_si256(x.as_ptr().add(i).cast());
            top = _mm256_max_epu32(top, _mm256_and_si256(b, magnitude));
            i += 8;
        }
        let mut lanes = [0u32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr().cast(), top);
        let top = x[i..n]
            .iter()
            .fold(lanes.into_iter().fold(0, u32::max), |m, v| {
                m.max(v.to_bits() & 0x7FFF_FFFF)
            });
        if top > f32::MAX.to_bits() || top == 0 {
            codes[..n].fill(0);
            return if top == 0 { 0.0 } else { f32::NAN };
        }
        let absmax = f32::from_bits(top);
        let inv = 1.0 / absmax;
        let vinv = _mm256_set1_ps(inv);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut i = 0;
        while i < full {
            let p = x.as_ptr().add(i);
            // Not `array::from_fn`: a closure would not inherit the caller's AVX2.
            let c = [
                encode::<SIGNED>(_mm256_mul_ps(_mm256_loadu_ps(p), vinv)),
                encode::<SIGNED>(_mm256_mul_ps(_mm256_loadu_ps(p.add(8)), vinv)),
                encode::<SIGNED>(_mm256_mul_ps(_mm256_loadu_ps(p.add(16)), vinv)),
                encode::<SIGNED>(_mm256_mul_ps(_mm256_loadu_ps(p.add(24)), vinv)),
            ];
            // Every code is below 2^8: the saturating packs keep it; the permutation undoes
            // their per-128-bit-lane interleaving.
            let words = (
                _mm256_packus_epi32(c[0], c[1]),
                _mm256_packus_epi32(c[2], c[3]),
            );
            let bytes = _mm256_packus_epi16(words.0, words.1);
            let ordered = _mm256_permutevar8x32_epi32(bytes, order);
            _mm256_storeu_si256(codes.as_mut_ptr().add(i).cast(), ordered);
            i += 32;
        }
        for (c, &v) in codes[full..n].iter_mut().zip(&x[full..n]) {
            *c = compact::encode::<SIGNED>(v * inv);
        }
        absmax
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::compact::{Map, decode, mix32, quantize};

    /// Every code decodes in registers exactly as the scalar decoder, for a few scales.
    #[test]
    fn load_q8_is_the_scalar_decoder() {
        if Avx2::detect().is_none() {
            return;
        }
        let codes: Vec<u8> = (0..=255).collect();
        for scale in [1.0f32, 0.37, 3.0e-20, 1.5e30] {
            for at in (0..256).step_by(8) {
                let mut got = [0f32; 8];
                // SAFETY: AVX2 was detected above; `at + 8 <= 256` codes are readable.
                unsafe {
                    Ymm::load_q8::<true>(codes.as_ptr().add(at), scale).store(got.as_mut_ptr());
                }
                for l in 0..8 {
                    let want = decode::<true>(codes[at + l]) * scale;
                    assert_eq!(
                        got[l].to_bits(),
                        want.to_bits(),
                        "signed {} x {scale}",
                        at + l
                    );
                }
                // SAFETY: as above.
                unsafe {
                    Ymm::load_q8::<false>(codes.as_ptr().add(at), scale).store(got.as_mut_ptr());
                }
                for l in 0..8 {
                    let want = decode::<false>(codes[at + l]) * scale;
                    assert_eq!(
                        got[l].to_bits(),
                        want.to_bits(),
                        "unsigned {} x {scale}",
                        at + l
                    );
                }
            }
        }
    }

    /// Blocks of every length up to 256, ordinary and special, quantize to the scalar codes and
    /// scale.
    #[test]
    fn quantize_is_the_scalar_quantizer() {
        if Avx2::detect().is_none() {
            return;
        }
        let mut r = 99u32;
        let mut x = [0f32; 256];
        for len in 0..=256 {
            for kind in 0..5 {
                for v in x.iter_mut() {
                    r = mix32(r.wrapping_add(1));
                    let mag = f32::from_bits(r % 0x3F80_0000) * 4.0;
                    *v = match kind {
                        0 => mag,
                        1 => -mag,
                        2 if r.is_multiple_of(3) => 0.0,
                        _ => {
                            if r & 1 == 0 {
                                mag
                            } else {
                                -mag * 1e-6
                            }
                        }
                    };
                }
                if kind == 4 && len > 0 {
                    x[r as usize % len] = if r & 2 == 0 { f32::NAN } else { f32::INFINITY };
                }
                let block = &x[..len];
                for map in [Map::Signed, Map::Unsigned] {
                    let (mut a, mut b) = ([7u8; 256], [9u8; 256]);
                    let want = quantize(map, block, &mut a[..len]);
                    // SAFETY: AVX2 was detected above.
                    let got = unsafe {
                        match map {
                            Map::Signed => quantize_avx2::<true>(block, &mut b[..len]),
                            Map::Unsigned => quantize_avx2::<false>(block, &mut b[..len]),
                        }
                    };
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{map:?} len {len} kind {kind}"
                    );
                    assert_eq!(a[..len], b[..len], "{map:?} len {len} kind {kind}");
                }
            }
        }
    }
}
