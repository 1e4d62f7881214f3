//! Each optimizer against plain reference implementations of the update rules:
//! - an f32 reference computing the same operations in the documented order: must match bitwise;
//! - an f64 reference: must match within the stated tolerance, |a − b| ≤ TOL·(1 + |b|).

use crate::common::*;
use fusedopt::{Backend, OptimizerConfig, SimdLevel};

const STEPS: usize = 60;
const N: usize = 1031;
/// Tolerance against the f64 reference after 60 steps (measured worst case: see the README).
const TOL: f64 = 5e-6;

/// Gradients of mixed magnitudes (1e-4 .. 10), some exactly zero.
fn grads(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let scale = [1e-4, 1e-2, 1.0, 10.0][i % 4];
            if i % 17 == 0 {
                0.0
            } else {
                rng.uniform() * scale
            }
        })
        .collect()
}

/// Runs `config` and returns (max error against f64) after checking f32 bitwise.
fn check(config: OptimizerConfig, backend: Backend) -> f64 {
    let mut rng = Rng(42);
    let w0 = rng.vec(N, 2.0);
    let mut opt = config.build();
    opt.set_backend(backend);
    opt.set_chunk_len(256);
    let mut w = w0.clone();
    let mut r32 = Reference::<f32>::new(config, N);
    let mut w32 = w0.clone();
    let mut r64 = Reference::<f64>::new(config, N);
    let mut w64: Vec<f64> = w0.iter().map(|&x| x as f64).collect();
    for step in 0..STEPS {
        let g = grads(&mut rng, N);
        opt.step(&mut w, &g).unwrap();
        r32.step(&mut w32, &g);
        let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
        r64.step(&mut w64, &g64);
        assert_same(
            &w,
            &w32,
            &format!("{config} {backend:?} step {step} vs f32 reference"),
        );
    }
    let mut worst = 0f64;
    for (&a, &b) in w.iter().zip(&w64) {
        let err = (a as f64 - b).abs() / (1.0 + b.abs());
        worst = worst.max(err);
    }
    assert!(
        worst <= TOL,
        "{config}: error {worst:e} against f64 exceeds {TOL:e}"
    );
    worst
}

#[test]
fn every_optimizer_matches_the_references_with_default_hyperparameters() {
    for config in configs() {
        let err = check(config, Backend::Simd);
        println!(
            "{} defaults: max error vs f64 after {STEPS} steps = {err:.2e}",
            config.name()
        );
    }
}

#[test]
fn every_optimizer_matches_the_references_with_other_hyperparameters() {
    for config in configs().into_iter().map(unusual) {
        let err = check(config, Backend::Simd);
        println!("{config}: max error vs f64 after {STEPS} steps = {err:.2e}");
    }
}

#[test]
fn every_tier_matches_the_references() {
    for config in configs() {
        for level in SimdLevel::available() {
            check(config, Backend::Level(level));
        }
        check(config, Backend::Scalar);
    }
}

/// Adam's bias correction over a long run: the step scalars use the right `t`.
#[test]
fn adam_long_run_tracks_the_reference() {
    let config = OptimizerConfig::default_for("adam").unwrap();
    let mut rng = Rng(7);
    let n = 64;
    let mut w = rng.vec(n, 1.0);
    let mut w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let mut opt = config.build();
    let mut r64 = Reference::<f64>::new(config, n);
    for _ in 0..2000 {
        // Gradient of ½‖w − 0.5‖²: the trajectory converges, so errors cannot blow up chaotically.
        let g: Vec<f32> = w.iter().map(|&x| x - 0.5).collect();
        let g64: Vec<f64> = w64.iter().map(|&x| x - 0.5).collect();
        opt.step(&mut w, &g).unwrap();
        r64.step(&mut w64, &g64);
    }
    for (&a, &b) in w.iter().zip(&w64) {
        assert!((a as f64 - b).abs() <= 1e-4, "{a} vs {b}");
    }
    assert_eq!(opt.steps(), 2000);
}
