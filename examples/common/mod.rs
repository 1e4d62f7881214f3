//! Helpers shared by the measuring examples (`perf`, `tune`) and the criterion benches: sizes,
//! medians, data, model layouts, the same-stream reference ([`roofline`]), and tensors behind
//! locks for fed steps ([`locked`]).
#![allow(dead_code)]

pub mod locked;
pub mod roofline;

/// Parses a parameter count such as `4096`, `64K` or `16M` (K = 1024, M = 1024²).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mul)
        .map_err(|_| format!("bad size `{s}`"))
}

/// The short form of a parameter count: `64K`, `16M`, or the plain number.
pub fn label(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{}K", n >> 10)
    } else {
        n.to_string()
    }
}

/// The median of a non-empty sample.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Weights and gradients of `n` parameters with realistic, normal (non-subnormal) values.
pub fn data(n: usize) -> (Vec<f32>, Vec<f32>) {
    let w = (0..n).map(|i| (i % 1000) as f32 * 1e-3 - 0.5).collect();
    let g = (0..n).map(|i| (i % 997) as f32 * 1e-3 - 0.4).collect();
    (w, g)
}

/// GPT-2 small: 148 tensors, 124,439,808 parameters.
pub fn gpt2_small() -> Vec<usize> {
    let mut v = vec![50257 * 768, 1024 * 768];
    for _ in 0..12 {
        v.extend([
            768,
            768,
            768 * 2304,
            2304,
            768 * 768,
            768,
            768,
            768,
            768 * 3072,
            3072,
            3072 * 768,
            768,
        ]);
    }
    v.extend([768, 768]);
    v
}
