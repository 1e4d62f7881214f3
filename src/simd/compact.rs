//! Compact state formats: bfloat16 with stochastic rounding, and 8-bit block-wise quantization.
//!
//! A span whose state is compact runs in blocks of [`BLOCK`] elements: each state block is
//! expanded to `f32` in a scratch array that stays in L1, the optimizer's one kernel body runs
//! over the block exactly as over `f32` state, and the block is written back compact. One pass
//! over memory, as for `f32` state. The conversions use only integer operations and exact
//! IEEE-754 arithmetic, identical in every tier (the loops are plain Rust, inlined into each
//! tier's instantiation, where the compiler vectorizes them without changing a result), so
//! compact state keeps results bitwise identical across tiers, threads and chunk lengths.
//!
//! # bfloat16
//! `f32` with the low 16 bits of the mantissa dropped (8 significant bits). Round to nearest
//! would freeze slowly changing state: Adam's `v` changes by about 0.1% per step at β2 = 0.999,
//! below half a bf16 ulp (0.2–0.4%). So the state is rounded *stochastically*: a 16-bit random
//! number is added to the dropped bits before truncation, which rounds up with probability equal
//! to the dropped fraction and keeps the expected value exact. The random number is a hash of
//! (step, buffer, element index in the layout), not of the thread or chunk, so the rounding is
//! the same in every configuration. NaN stays NaN, infinities stay infinite.
//!
//! # 8-bit, block-wise (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022)
//! Each block of [`BLOCK`] elements keeps one `f32` scale, the largest magnitude in the block
//! (absmax), and one byte per element: the code of the element divided by the scale, on a
//! non-linear map with more resolution near zero.
//! - [`Map::Signed`] (first moments, momentum): a sign bit and a 7-bit magnitude with 3 exponent
//!   and 4 mantissa bits: `(1 + m/16)·2^(e−7)` for `e ≥ 1`, `m·2^-10` for `e = 0`; codes run up
//!   to 1.0 (magnitude 112). The smallest non-zero magnitude is `2^-10` of the block's absmax:
//!   a first moment that small moves its weight by a thousandth of the block's largest step,
//!   and 4 mantissa bits near the top matter more (on the quality test, 3 exponent and 4
//!   mantissa bits keep Adam's final loss within 1% of f32 state, 4 and 3 do not).
//! - [`Map::Unsigned`] (second moments, sums of squares): 5 exponent and 3 mantissa bits:
//!   `(1 + m/8)·2^(e−31)`, `m·2^-33` for `e = 0`, up to 1.0 (code 248); down to `2^-33 ≈ 1.2e-10`
//!   of the absmax, the range a block of squared gradients needs.
//!
//! A value is encoded to the nearest code (ties to the even mantissa), so the round-trip error
//! is at most half a step of the map: a relative `2^-5` (signed) or `2^-4` (unsigned) of the
//! value above the sub-normal range, and `2^-11` (signed) or `2^-34` (unsigned) of the absmax
//! below it. A block of zeros has scale
//! 0. A block holding a NaN or an infinity has a NaN scale: every element of it decodes to NaN,
//! so a non-finite value is never silently replaced by a finite one.

use super::{Kernel, Lane, Span, span_loop};

/// Elements per block of compact state (8-bit quantization blocks, and the unit in which any
/// compact state is expanded to `f32`).
pub(crate) const BLOCK: usize = 256;

/// `f32` → bfloat16 bits, rounded to nearest, ties to even (NaN stays a quiet NaN).
#[cfg(test)]
#[inline(always)]
pub(crate) fn bf16_nearest(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// bfloat16 bits → `f32` (exact).
#[inline(always)]
pub(crate) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// `f32` → bfloat16 bits, rounded up with probability equal to the dropped fraction: `r`'s low 16
/// bits are the random number. NaN stays a quiet NaN; an infinity stays infinite.
#[inline(always)]
pub(crate) fn bf16_stochastic(x: f32, r: u32) -> u16 {
    let bits = x.to_bits();
    let nan = x.is_nan();
    // Infinities have a zero mantissa: adding less than 2^16 leaves the top 16 bits alone.
    let rounded = (bits.wrapping_add(r & 0xFFFF) >> 16) as u16;
    if nan {
        ((bits >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

/// A 32-bit integer hash with good avalanche (Wellons' "lowbias32"): the random numbers of
/// stochastic rounding.
#[inline(always)]
pub(crate) fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The seed of the random numbers of one step, buffer and 2^32-element stretch of the layout.
#[inline]
pub(crate) fn seed(step: u64, buffer: usize, high: u32) -> u32 {
    let a = mix32(step as u32 ^ 0x9E37_79B9);
    let b =
        mix32((step >> 32) as u32 ^ a.rotate_left(7) ^ (buffer as u32).wrapping_mul(0x85EB_CA6B));
    mix32(high ^ b.rotate_left(13) ^ 0xC2B2_AE35)
}

/// The 16-bit random number of the element at layout index `index` under `seed`: the top half
/// of a Weyl sequence (`seed + index·φ·2^32`) keyed by the hashed step and buffer. For a fixed
/// element the number is uniform over steps (the seed is a hash of the step), which is what
/// makes the rounding unbiased; within a step neighbouring elements get evenly spread numbers.
/// One multiply-add per element, which the compiler strength-reduces to an add.
#[inline(always)]
pub(crate) fn random(seed: u32, index: u32) -> u32 {
    seed.wrapping_add(index.wrapping_mul(0x9E37_79B9)) >> 16
}

/// A quantization map of 8-bit state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Map {
    /// Sign and magnitude, for state that changes sign (first moments, momentum).
    Signed,
    /// Magnitude only, for non-negative state (second moments, sums of squares).
    Unsigned,
}

/// `2^k` for `-126 <= k <= 127`, exactly.
pub(crate) const fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

#[cfg(test)]
impl Map {
    /// The code of `y`, a value divided by its block's absmax (so `|y| <= 1`): the nearest
    /// value of the map, ties to the even mantissa.
    #[inline(always)]
    pub(crate) fn encode(self, y: f32) -> u8 {
        match self {
            Map::Signed => encode::<true>(y),
            Map::Unsigned => encode::<false>(y),
        }
    }

    /// The value of `code` on the map (to be multiplied by the block's scale).
    #[inline(always)]
    pub(crate) fn decode(self, code: u8) -> f32 {
        match self {
            Map::Signed => decode::<true>(code),
            Map::Unsigned => decode::<false>(code),
        }
    }
}

/// Mantissa bits of the map's magnitudes: 4 signed (3 exponent bits), 3 unsigned (5 exponent
/// bits).
pub(crate) const fn mant(signed: bool) -> u32 {
    if signed { 4 } else { 3 }
}

/// The exponent bias of the map's normal codes, as an `f32` exponent field: code
/// `e·2^M + m` (`e >= 1`) is the `f32` with exponent field `e + BIAS` and mantissa `m/2^M`.
pub(crate) const fn bias(signed: bool) -> u32 {
    if signed { 120 } else { 96 }
}

/// The weight of one step of the sub-normal codes (`e = 0`): `2^-10` signed, `2^-33` unsigned.
pub(crate) const fn sub_step(signed: bool) -> f32 {
    if signed { pow2(-10) } else { pow2(-33) }
}

/// [`Map::encode`], branch-free, for the compiler to vectorize: a nearest code (ties between two
/// codes may go either way).
///
/// Two candidates, combined without a select:
/// - `normal`: the mantissa rounded to `M` bits on the f32 bits (half an ulp added, so a carry
///   moves into the exponent, which is the next code), the exponent rebased; right for
///   `|y| >= 2^(bias + 1 - 127)`, and at most the right code below (negative far below);
/// - `small`: `|y| / step` rounded to an integer by adding 2^23 (no float-to-int conversion,
///   which AVX2 lacks for unsigned integers); right below `2^(bias + 2 - 127)`, where the
///   codes are evenly spaced, and above it larger than the right code.
///
/// So `max(normal, min(small, 2^(M+1)))` is the code everywhere: below `2^(M+1)` codes the
/// clamp keeps `small`, which is at least `normal`; above, `normal` is at least the clamp.
#[inline(always)]
pub(crate) fn encode<const SIGNED: bool>(y: f32) -> u8 {
    let bits = y.to_bits() & 0x7FFF_FFFF;
    let shift = 23 - mant(SIGNED);
    let normal = (bits as i32 + (1 << (shift - 1)) - ((bias(SIGNED) << 23) as i32)) >> shift;
    let scaled = f32::from_bits(bits) * (1.0 / sub_step(SIGNED));
    let small = (scaled + 8_388_608.0).to_bits() as i32 - 0x4B00_0000;
    let magnitude = normal.max(small.min(2 << mant(SIGNED))) as u32;
    if SIGNED {
        (magnitude | ((y.to_bits() >> 31) << 7)) as u8
    } else {
        magnitude as u8
    }
}

/// [`Map::decode`], branch-free, for the compiler to vectorize.
#[inline(always)]
pub(crate) fn decode<const SIGNED: bool>(code: u8) -> f32 {
    let c = u32::from(code);
    let magnitude = if SIGNED { c & 0x7F } else { c };
    let normal = (magnitude + (bias(SIGNED) << mant(SIGNED))) << (23 - mant(SIGNED));
    // `magnitude` as an f32, exactly, without an int-to-float conversion.
    let small =
        ((f32::from_bits(0x4B00_0000 | magnitude) - 8_388_608.0) * sub_step(SIGNED)).to_bits();
    let bits = if magnitude >= 1 << mant(SIGNED) {
        normal
    } else {
        small
    };
    let sign = if SIGNED { (c & 0x80) << 24 } else { 0 };
    f32::from_bits(bits | sign)
}

/// Quantizes `x` (at most [`BLOCK`] elements) into `codes`, returning the block's scale: its
/// absmax, 0 for a block of zeros, NaN for a block holding a NaN or an infinity.
#[inline(always)]
pub(crate) fn quantize(map: Map, x: &[f32], codes: &mut [u8]) -> f32 {
    match map {
        Map::Signed => quantize_with::<true>(x, codes),
        Map::Unsigned => quantize_with::<false>(x, codes),
    }
}

#[inline(always)]
fn quantize_with<const SIGNED: bool>(x: &[f32], codes: &mut [u8]) -> f32 {
    // The largest magnitude, on the bits: for magnitudes, integer order is value order, and
    // anything above f32::MAX's bits is an infinity or a NaN.
    let top = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF));
    if top > f32::MAX.to_bits() || top == 0 {
        codes.iter_mut().for_each(|c| *c = 0);
        return if top == 0 { 0.0 } else { f32::NAN };
    }
    let absmax = f32::from_bits(top);
    let inv = 1.0 / absmax;
    for (c, &v) in codes.iter_mut().zip(x) {
        // `v·(1/absmax)` may exceed 1 by an ulp, which still rounds to the code of 1.
        *c = encode::<SIGNED>(v * inv);
    }
    absmax
}

/// Expands `codes` with scale `scale` into `x`.
#[inline(always)]
pub(crate) fn dequantize(map: Map, codes: &[u8], scale: f32, x: &mut [f32]) {
    match map {
        Map::Signed => {
            for (v, &c) in x.iter_mut().zip(codes) {
                *v = decode::<true>(c) * scale;
            }
        }
        Map::Unsigned => {
            for (v, &c) in x.iter_mut().zip(codes) {
                *v = decode::<false>(c) * scale;
            }
        }
    }
}

/// A half-precision format of weights or gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Half {
    /// bfloat16.
    Bf16,
    /// IEEE binary16.
    F16,
}

impl Half {
    /// The value of `bits`, exactly.
    #[inline(always)]
    pub(crate) fn to_f32(self, bits: u16) -> f32 {
        match self {
            Half::Bf16 => bf16_to_f32(bits),
            Half::F16 => half::f16::from_bits(bits).to_f32(),
        }
    }

    /// `x` rounded to nearest, ties to even (NaN stays NaN; beyond the range, infinity).
    #[inline(always)]
    pub(crate) fn round(self, x: f32) -> u16 {
        match self {
            Half::Bf16 => half::bf16::from_f32(x).to_bits(),
            Half::F16 => half::f16::from_f32(x).to_bits(),
        }
    }
}

/// What a span reads and writes besides `f32` weights, gradients and state: compact state,
/// half-precision gradients, and half-precision trainer weights behind `f32` master weights.
#[derive(Clone, Copy)]
pub(crate) struct Formats<const N: usize> {
    /// The span's compact state; `None`: the `f32` state pointers of the span.
    pub state: Option<CompactState<N>>,
    /// The span's half-precision gradients (element 0); `None`: the span's `f32` gradients.
    pub grads: Option<(Half, *const u16)>,
    /// The trainer's half-precision weights of the span: the span updates the `f32` master
    /// weights (its `w`) and writes them here rounded to nearest even.
    pub weights: Option<(Half, *mut u16)>,
}

impl<const N: usize> Formats<N> {
    /// Whether everything is `f32` (the plain span loop).
    #[inline(always)]
    pub(crate) fn all_f32(&self) -> bool {
        self.state.is_none() && self.grads.is_none() && self.weights.is_none()
    }
}

/// Where the compact state of one span lives, and how to read and write it.
#[derive(Clone, Copy)]
pub(crate) enum CompactState<const N: usize> {
    /// bfloat16 state: element `i` of buffer `j` at `s[j] + i`; `seeds[j]` and `index` (the
    /// layout index of element 0, low 32 bits) drive the stochastic rounding.
    Bf16 {
        s: [*mut u16; N],
        seeds: [u32; N],
        index: u32,
    },
    /// 8-bit state: codes of element `i` of buffer `j` at `codes[j] + i`, the scale of its
    /// block `i / BLOCK` at `scales[j] + i / BLOCK` (the span starts on a block boundary).
    Q8 {
        codes: [*mut u8; N],
        scales: [*mut f32; N],
        maps: [Map; N],
    },
}

/// One block of a span's compact state and half-precision gradients, expanded to `f32`.
pub(crate) struct Scratch<const N: usize> {
    state: [[f32; BLOCK]; N],
    grads: [f32; BLOCK],
}

impl<const N: usize> Scratch<N> {
    /// Zeroed scratch arrays.
    #[inline(always)]
    pub(crate) fn new() -> Self {
        Scratch {
            state: [[0f32; BLOCK]; N],
            grads: [0f32; BLOCK],
        }
    }

    /// Expands elements `start..start + len` (`len <= BLOCK`; for 8-bit state, `start` on a
    /// block boundary) of the compact state and half-precision gradients of `formats` into the
    /// scratch arrays, and returns the block as an `f32` span: those arrays where the span's
    /// data is compact, the span's own memory (offset to `start`) where it is `f32`.
    ///
    /// # Safety
    /// `start + len <= span.len`, and the pointer contract of [`block_loop`] for those elements.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    pub(crate) unsafe fn expand(
        &mut self,
        span: Span<N>,
        formats: Formats<N>,
        start: usize,
        len: usize,
    ) -> Span<N> {
        // SAFETY: the caller's contract; the scratch arrays hold BLOCK >= len elements.
        unsafe {
            match formats.state {
                None => {}
                Some(CompactState::Bf16 { s, .. }) => {
                    for j in 0..N {
                        let src = core::slice::from_raw_parts(s[j].add(start), len);
                        for (d, &b) in self.state[j][..len].iter_mut().zip(src) {
                            *d = bf16_to_f32(b);
                        }
                    }
                }
                Some(CompactState::Q8 {
                    codes,
                    scales,
                    maps,
                }) => {
                    for j in 0..N {
                        let src = core::slice::from_raw_parts(codes[j].add(start), len);
                        let scale = *scales[j].add(start / BLOCK);
                        dequantize(maps[j], src, scale, &mut self.state[j][..len]);
                    }
                }
            }
            let g = match formats.grads {
                None => span.g.add(start),
                Some((kind, p)) => {
                    let src = core::slice::from_raw_parts(p.add(start), len);
                    match kind {
                        Half::Bf16 => {
                            for (d, &b) in self.grads[..len].iter_mut().zip(src) {
                                *d = bf16_to_f32(b);
                            }
                        }
                        Half::F16 => {
                            for (d, &b) in self.grads[..len].iter_mut().zip(src) {
                                *d = Half::F16.to_f32(b);
                            }
                        }
                    }
                    self.grads.as_ptr()
                }
            };
            Span {
                w: span.w.add(start),
                g,
                s: match formats.state {
                    None => span.s.map(|p| p.add(start)),
                    Some(_) => core::array::from_fn(|j| self.state[j].as_mut_ptr()),
                },
                len,
            }
        }
    }
}

/// Runs kernel `k` over a span with compact state or half-precision weights or gradients, block
/// by block, with lane type `V`: each block's compact state and half gradients are expanded to
/// `f32` scratch arrays, the one kernel body runs over the block, the state is written back
/// compact and the master weights rounded into the trainer's.
///
/// # Safety
/// `span.w` valid for reads and writes and `span.g` (unless `formats.grads`) for reads of the
/// span's elements, and `span.s` (unless `formats.state`) as in [`span_loop`]; every pointer of
/// `formats` valid for the span's elements (and, for 8-bit state, its blocks' scales); no two
/// written ranges overlapping each other or a read one.
#[inline(always)]
pub(crate) unsafe fn block_loop<K: Kernel<N>, V: Lane, const N: usize>(
    k: &K,
    span: Span<N>,
    formats: Formats<N>,
) {
    let mut scratch = Scratch::<N>::new();
    let mut start = 0;
    while start < span.len {
        let len = BLOCK.min(span.len - start);
        // SAFETY: `start + len <= span.len`, inside every range the caller vouched for; the
        // scratch arrays hold BLOCK elements.
        unsafe {
            let block = scratch.expand(span, formats, start, len);
            span_loop::<K, V, N>(k, block);
            match formats.state {
                None => {}
                Some(CompactState::Bf16 { s, seeds, index }) => {
                    let first = index.wrapping_add(start as u32);
                    for j in 0..N {
                        let dst = core::slice::from_raw_parts_mut(s[j].add(start), len);
                        let mut at = first;
                        for (d, &x) in dst.iter_mut().zip(&scratch.state[j][..len]) {
                            *d = bf16_stochastic(x, random(seeds[j], at));
                            at = at.wrapping_add(1);
                        }
                    }
                }
                Some(CompactState::Q8 {
                    codes,
                    scales,
                    maps,
                }) => {
                    for j in 0..N {
                        let dst = core::slice::from_raw_parts_mut(codes[j].add(start), len);
                        *scales[j].add(start / BLOCK) =
                            quantize(maps[j], &scratch.state[j][..len], dst);
                    }
                }
            }
            if let Some((kind, p)) = formats.weights {
                let master = core::slice::from_raw_parts(span.w.add(start), len);
                let dst = core::slice::from_raw_parts_mut(p.add(start), len);
                match kind {
                    Half::Bf16 => {
                        for (d, &x) in dst.iter_mut().zip(master) {
                            *d = Half::Bf16.round(x);
                        }
                    }
                    Half::F16 => {
                        for (d, &x) in dst.iter_mut().zip(master) {
                            *d = Half::F16.round(x);
                        }
                    }
                }
            }
        }
        start += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The distance from `y` to the nearest value of the map, by brute force.
    fn nearest_distance(map: Map, y: f32) -> f32 {
        let codes: Vec<u8> = match map {
            Map::Signed => (0..=255u8).filter(|c| c & 0x7F <= 112).collect(),
            Map::Unsigned => (0..=248u8).collect(),
        };
        codes
            .iter()
            .map(|&c| (map.decode(c) - y).abs())
            .fold(f32::INFINITY, f32::min)
    }

    #[test]
    fn encode_is_the_nearest_code() {
        let mut x = 0x1234_5678u32;
        for map in [Map::Signed, Map::Unsigned] {
            for n in 0..20_000 {
                x = mix32(x.wrapping_add(n));
                let mag = f32::from_bits(x % 0x3F80_0001); // [0, 1]
                let y = if map == Map::Signed && x & 1 == 1 {
                    -mag
                } else {
                    mag
                };
                let code = map.encode(y);
                let (got, best) = ((map.decode(code) - y).abs(), nearest_distance(map, y));
                assert_eq!(
                    got,
                    best,
                    "{map:?} {y:e}: code {code} ({:e})",
                    map.decode(code)
                );
            }
            assert_eq!(map.decode(map.encode(1.0)), 1.0);
            assert_eq!(map.decode(map.encode(0.0)), 0.0);
        }
        assert_eq!(Map::Signed.decode(Map::Signed.encode(-1.0)), -1.0);
        assert_eq!(Map::Signed.encode(1.0), 112);
        assert_eq!(Map::Unsigned.encode(1.0), 248);
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(bf16_nearest(1.0), 0x3F80);
        assert_eq!(bf16_to_f32(bf16_nearest(1.0 + 1.0 / 256.0)), 1.0); // a tie: to even
        assert_eq!(
            bf16_to_f32(bf16_nearest(1.0 + 3.0 / 256.0)),
            1.0 + 4.0 / 256.0
        );
        assert!(bf16_to_f32(bf16_nearest(f32::NAN)).is_nan());
        assert!(bf16_to_f32(bf16_stochastic(f32::NAN, 0xFFFF)).is_nan());
        assert_eq!(
            bf16_to_f32(bf16_stochastic(f32::INFINITY, 0xFFFF)),
            f32::INFINITY
        );
        assert_eq!(
            bf16_to_f32(bf16_stochastic(-f32::INFINITY, 0xFFFF)),
            -f32::INFINITY
        );
        // A value a quarter of the way to the next bf16 rounds up about a quarter of the time.
        let x = 1.0 + 0.25 / 128.0;
        let up = (0..65_536u32)
            .filter(|&i| bf16_to_f32(bf16_stochastic(x, random(seed(7, 0, 0), i))) > 1.0)
            .count();
        assert!((15_500..17_300).contains(&up), "{up} of 65536 rounded up");
    }

    /// The bound of one round trip: half a step of the map, relative above the sub-normal
    /// range, absolute (of the absmax) below it.
    fn bound(map: Map, x: f32, absmax: f32) -> f32 {
        let (relative, floor) = match map {
            Map::Signed => (pow2(-5), pow2(-11)),
            Map::Unsigned => (pow2(-4), pow2(-34)),
        };
        x.abs() * relative + absmax * floor
    }

    fn round_trip(map: Map, x: &[f32]) -> (Vec<f32>, f32) {
        let mut codes = vec![0u8; x.len()];
        let scale = quantize(map, x, &mut codes);
        let mut back = vec![0f32; x.len()];
        dequantize(map, &codes, scale, &mut back);
        (back, scale)
    }

    #[test]
    fn quantization_round_trips_within_the_map_bound() {
        let mut h = 99u32;
        let mut next = || {
            h = mix32(h.wrapping_add(0x9E37_79B9));
            f64::from(h) / f64::from(u32::MAX)
        };
        // Normal-ish (sum of uniforms), heavy-tailed (Cauchy-like), tiny, and mixed scales.
        let normal: Vec<f32> = (0..BLOCK)
            .map(|_| ((0..4).map(|_| next()).sum::<f64>() - 2.0) as f32)
            .collect();
        let heavy: Vec<f32> = (0..BLOCK)
            .map(|_| ((next() - 0.5) * std::f64::consts::PI).tan() as f32)
            .collect();
        let tiny: Vec<f32> = (0..BLOCK).map(|_| (next() * 1e-30) as f32).collect();
        let spread: Vec<f32> = (0..BLOCK)
            .map(|i| (10f64.powi(-(i as i32 % 12)) * next()) as f32)
            .collect();
        let short: Vec<f32> = (0..37).map(|_| (next() - 0.3) as f32).collect();
        let blocks = [
            ("normal", normal),
            ("heavy", heavy),
            ("tiny", tiny),
            ("spread", spread),
            ("short", short),
        ];
        for (what, x) in &blocks {
            for map in [Map::Signed, Map::Unsigned] {
                let x: Vec<f32> = match map {
                    Map::Signed => x.clone(),
                    Map::Unsigned => x.iter().map(|v| v * v).collect(),
                };
                let (back, scale) = round_trip(map, &x);
                let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_eq!(scale, absmax, "{what} {map:?}");
                for (&a, &b) in x.iter().zip(&back) {
                    assert!(
                        (a - b).abs() <= bound(map, a, absmax),
                        "{what} {map:?}: {a:e} -> {b:e}"
                    );
                }
                // The largest magnitude is exact, and so are zeros.
                let i = x.iter().position(|v| v.abs() == absmax).unwrap();
                assert_eq!(back[i].abs(), absmax);
            }
        }
        // A block of zeros: scale 0, zeros back.
        let (back, scale) = round_trip(Map::Signed, &[0.0; BLOCK]);
        assert_eq!((scale, back.iter().all(|&v| v == 0.0)), (0.0, true));
        // A NaN or an infinity anywhere: the whole block decodes to NaN.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![0.5f32; BLOCK];
            x[17] = bad;
            let (back, scale) = round_trip(Map::Signed, &x);
            assert!(scale.is_nan() && back.iter().all(|v| v.is_nan()), "{bad}");
        }
    }

    #[test]
    fn round_to_nearest_bf16_freezes_adams_second_moment_and_stochastic_rounding_does_not() {
        // v <- b2 v + (1 - b2) g^2 from v = 1 with g^2 = 2: the exact v tends to 2, moving by
        // 0.1% per step at first, below half an ulp of bf16 at 1 (2^-9).
        let (b2, steps, n) = (0.999f32, 1000u64, 4096usize);
        let exact = 2.0 - 0.999f64.powi(steps as i32);
        let mut nearest = vec![bf16_nearest(1.0); n];
        let mut stochastic = vec![bf16_nearest(1.0); n];
        for step in 1..=steps {
            let s = seed(step, 1, 0);
            for i in 0..n {
                let v = bf16_to_f32(nearest[i]);
                nearest[i] = bf16_nearest(b2 * v + (1.0 - b2) * 2.0);
                let v = bf16_to_f32(stochastic[i]);
                stochastic[i] = bf16_stochastic(b2 * v + (1.0 - b2) * 2.0, random(s, i as u32));
            }
        }
        let mean = |v: &[u16]| v.iter().map(|&b| f64::from(bf16_to_f32(b))).sum::<f64>() / n as f64;
        assert_eq!(mean(&nearest), 1.0, "round to nearest moved");
        let m = mean(&stochastic);
        assert!(
            (m - exact).abs() < 0.01,
            "stochastic rounding: {m} against {exact}"
        );
    }
}
