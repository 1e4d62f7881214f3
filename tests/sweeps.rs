//! Sweeps over lengths, offsets, chunk boundaries, thread counts and tiers: every configuration
//! must give bitwise the same result as the scalar kernel in one chunk on one thread.

use crate::common::*;
use fusedopt::{Backend, Optimizer, OptimizerConfig, SimdLevel};

const STEPS: usize = 3;

/// Runs `STEPS` steps of `opt` on `w` with per-step gradients from `seed`.
fn run(opt: &mut dyn Optimizer, w: &mut [f32], seed: u64) {
    let mut rng = Rng(seed);
    for _ in 0..STEPS {
        let g = rng.vec(w.len(), 3.0);
        opt.step(w, &g).unwrap();
    }
}

/// The reference result: scalar backend, one chunk, calling thread.
fn baseline(config: OptimizerConfig, w0: &[f32], seed: u64) -> Vec<f32> {
    let mut opt = config.build();
    opt.set_backend(Backend::Scalar);
    opt.set_chunk_len(usize::MAX);
    let mut w = w0.to_vec();
    pool(1).install(|| run(opt.as_mut(), &mut w, seed));
    w
}

fn backends() -> Vec<Backend> {
    let mut b = vec![Backend::Scalar, Backend::Simd];
    b.extend(SimdLevel::available().map(Backend::Level));
    b
}

#[test]
fn every_length_up_to_130_on_every_tier() {
    for config in configs() {
        let kind = config.name();
        for n in 0..=130 {
            let w0 = Rng(n as u64).vec(n, 1.0);
            let expected = baseline(config, &w0, 99);
            // Also against the plain f32 reference.
            let mut r = Reference::<f32>::new(config, n);
            let mut wr = w0.clone();
            let mut rng = Rng(99);
            for _ in 0..STEPS {
                r.step(&mut wr, &rng.vec(n, 3.0));
            }
            assert_same(
                &expected,
                &wr,
                &format!("{kind} n={n} scalar vs f32 reference"),
            );
            for backend in backends() {
                let mut opt = config.build();
                opt.set_backend(backend);
                let mut w = w0.clone();
                run(opt.as_mut(), &mut w, 99);
                assert_same(&w, &expected, &format!("{kind} n={n} {backend:?}"));
            }
        }
    }
}

#[test]
fn sub_slices_at_every_offset_leave_neighbours_alone() {
    const CANARY: f32 = 12345.0;
    for config in configs() {
        let kind = config.name();
        for n in [1, 7, 8, 9, 37, 100] {
            let w0 = Rng(5).vec(n, 1.0);
            let expected = baseline(config, &w0, 11);
            for offset in 0..16 {
                for backend in backends() {
                    let mut buf = vec![CANARY; offset + n + 16];
                    buf[offset..offset + n].copy_from_slice(&w0);
                    // Gradients also come from an unaligned place in a larger buffer.
                    let mut rng = Rng(11);
                    let mut opt = config.build();
                    opt.set_backend(backend);
                    for _ in 0..STEPS {
                        let g = rng.vec(n, 3.0);
                        let mut gbuf = vec![f32::NAN; 3 + offset + n];
                        gbuf[3 + offset..].copy_from_slice(&g);
                        opt.step(&mut buf[offset..offset + n], &gbuf[3 + offset..])
                            .unwrap();
                    }
                    assert_same(
                        &buf[offset..offset + n],
                        &expected,
                        &format!("{kind} n={n} offset={offset} {backend:?}"),
                    );
                    assert!(
                        buf[..offset]
                            .iter()
                            .chain(&buf[offset + n..])
                            .all(|&x| x == CANARY)
                    );
                }
            }
        }
    }
}

#[test]
fn chunk_boundaries_plus_minus_one() {
    for config in configs() {
        let kind = config.name();
        for chunk in [16, 64, 160] {
            for k in [1, 2, 3, 7] {
                for n in [k * chunk - 1, k * chunk, k * chunk + 1] {
                    let w0 = Rng(n as u64).vec(n, 1.0);
                    let expected = baseline(config, &w0, 3);
                    for threads in [1, 2, 3] {
                        let mut opt = config.build();
                        opt.set_chunk_len(chunk);
                        let mut w = w0.clone();
                        pool(threads).install(|| run(opt.as_mut(), &mut w, 3));
                        assert_same(
                            &w,
                            &expected,
                            &format!("{kind} n={n} chunk={chunk} threads={threads}"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn any_thread_count_and_chunk_length_gives_identical_bits() {
    let n = 100_003;
    for config in configs() {
        let kind = config.name();
        let w0 = Rng(1).vec(n, 1.0);
        let expected = baseline(config, &w0, 8);
        for threads in 1..=4 {
            for chunk in [16, 48, 1000, 4096, 0] {
                let mut opt = config.build();
                opt.set_chunk_len(chunk);
                let mut w = w0.clone();
                pool(threads).install(|| run(opt.as_mut(), &mut w, 8));
                assert_same(
                    &w,
                    &expected,
                    &format!("{kind} threads={threads} chunk={chunk}"),
                );
            }
        }
    }
}

#[test]
fn special_values_agree_across_tiers_and_with_the_reference() {
    let specials = [
        0.0f32,
        -0.0,
        1e-45,
        -1e-45,
        1e-38,
        f32::MIN_POSITIVE,
        1e-20,
        1.0,
        -1.0,
        1e19,
        1e38,
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    // Every (weight, gradient) pair of specials, so vector lanes and the scalar tail both see each.
    let mut w0 = Vec::new();
    let mut g = Vec::new();
    for &a in &specials {
        for &b in &specials {
            w0.push(a);
            g.push(b);
        }
    }
    let n = w0.len();
    for config in configs() {
        let kind = config.name();
        let mut r = Reference::<f32>::new(config, n);
        let mut expected = w0.clone();
        for _ in 0..2 {
            r.step(&mut expected, &g);
        }
        for backend in backends() {
            let mut opt = config.build();
            opt.set_backend(backend);
            let mut w = w0.clone();
            for _ in 0..2 {
                opt.step(&mut w, &g).unwrap();
            }
            assert_same(&w, &expected, &format!("{kind} {backend:?} special values"));
        }
    }
}
