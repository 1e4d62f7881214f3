//! Gradient hygiene: loss-scale division, global-norm clipping, the non-finite policy, and the
//! norm's determinism.

use crate::common::*;
use fusedopt::*;

const LENS: [usize; 5] = [1031, 0, 17, 20_000, 5];

/// A model of several tensors with mixed-magnitude weights.
fn model(seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng(seed);
    LENS.iter().map(|&n| rng.vec(n, 2.0)).collect()
}

fn grads(rng: &mut Rng, scale: f32) -> Vec<Vec<f32>> {
    LENS.iter().map(|&n| rng.vec(n, scale)).collect()
}

fn step(
    opt: &mut dyn Optimizer,
    ws: &mut [Vec<f32>],
    gs: &[Vec<f32>],
) -> Result<StepReport, StepError> {
    opt.step_all(ws, gs)
}

/// References, one per tensor (each optimizer is element-wise, so a tensor's reference sees only
/// its own elements).
fn references(config: OptimizerConfig) -> Vec<Reference<f32>> {
    LENS.iter().map(|&n| Reference::new(config, n)).collect()
}

fn reference_step(refs: &mut [Reference<f32>], ws: &mut [Vec<f32>], gs: &[Vec<f32>]) {
    for ((r, w), g) in refs.iter_mut().zip(ws).zip(gs) {
        r.step(w, g);
    }
}

/// The global L2 norm, summed plainly in f64 (an order of its own, independent of the engine's).
fn plain_norm(gs: &[Vec<f32>]) -> f64 {
    gs.iter()
        .flatten()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn grads_are_divided_by_the_loss_scale() {
    for config in configs() {
        let kind = config.name();
        for scale in [1024.0f32, 3.0, 0.125] {
            let hp = with(config, "weight_decay=0.01");
            let mut opt = hp.build();
            opt.set_grad_scale(scale).unwrap();
            assert_eq!(opt.grad_scale(), scale);
            let mut refs = references(hp);
            let (mut ws, mut wr) = (model(1), model(1));
            let mut rng = Rng(2);
            for _ in 0..5 {
                let scaled = grads(&mut rng, 100.0);
                let report = step(opt.as_mut(), &mut ws, &scaled).unwrap();
                assert_eq!(
                    report.grad_norm, None,
                    "no norm pass without clipping or checking"
                );
                // The documented semantics: the kernel reads g / scale.
                let unscaled: Vec<Vec<f32>> = scaled
                    .iter()
                    .map(|g| g.iter().map(|&x| x / scale).collect())
                    .collect();
                reference_step(&mut refs, &mut wr, &unscaled);
            }
            for (t, (w, r)) in ws.iter().zip(&wr).enumerate() {
                assert_same(w, r, &format!("{kind} scale {scale} tensor {t}"));
            }
        }
    }
}

#[test]
fn clipping_scales_by_the_global_norm_inside_the_kernel() {
    for config in configs() {
        let kind = config.name();
        for maximize in [false, true] {
            let hp = with(config, &format!("maximize={maximize},weight_decay=0.05"));
            let max = 1.5f32;
            let mut opt = hp.build();
            opt.set_max_grad_norm(Some(max)).unwrap();
            opt.set_grad_scale(64.0).unwrap();
            let mut refs = references(hp);
            let (mut ws, mut wr) = (model(3), model(3));
            let mut rng = Rng(4);
            for s in 0..6 {
                // Alternate norms above and below `max`.
                let magnitude = if s % 2 == 0 { 64.0 } else { 64.0 / 1e4 };
                let scaled = grads(&mut rng, magnitude);
                let report = step(opt.as_mut(), &mut ws, &scaled).unwrap();
                let norm = report.grad_norm.expect("clipping reports the norm");
                let expected = plain_norm(&scaled) / 64.0;
                assert!(
                    ((norm as f64) - expected).abs() <= 1e-6 * expected,
                    "{kind}: norm {norm} vs {expected}"
                );
                // torch.nn.utils.clip_grad_norm_'s coefficient, from the reported norm.
                let coef = (max as f64 / (norm as f64 + 1e-6)).min(1.0) as f32;
                let clipped: Vec<Vec<f32>> = scaled
                    .iter()
                    .map(|g| g.iter().map(|&x| x / 64.0 * coef).collect())
                    .collect();
                reference_step(&mut refs, &mut wr, &clipped);
                let clipped_norm = plain_norm(&clipped);
                assert!(
                    clipped_norm <= max as f64 * (1.0 + 1e-6),
                    "{kind}: {clipped_norm}"
                );
            }
            for (t, (w, r)) in ws.iter().zip(&wr).enumerate() {
                assert_same(w, r, &format!("{kind} maximize={maximize} tensor {t}"));
            }
        }
    }
}

#[test]
fn the_norm_and_the_step_are_identical_for_any_threads_chunks_and_tier() {
    let run = |threads: usize, chunk: usize, backend: Backend| {
        let mut opt = Adam::new(AdamConfig::default());
        opt.set_backend(backend);
        opt.set_chunk_len(chunk);
        opt.set_max_grad_norm(Some(10.0)).unwrap();
        opt.set_non_finite(NonFinite::Skip);
        let mut ws = model(5);
        let mut rng = Rng(6);
        let mut norms = Vec::new();
        pool(threads).install(|| {
            for _ in 0..3 {
                let gs = grads(&mut rng, 1.0);
                norms.push(step(&mut opt, &mut ws, &gs).unwrap().grad_norm.unwrap());
            }
        });
        (norms, ws)
    };
    let (norms, ws) = run(1, usize::MAX, Backend::Scalar);
    for threads in 1..=4 {
        for chunk in [16, 1000, 8192, 65_536] {
            for backend in [Backend::Simd, Backend::Level(SimdLevel::Portable)] {
                let (n, w) = run(threads, chunk, backend);
                let what = format!("{threads} threads, chunk {chunk}, {backend:?}");
                assert_same(&n, &norms, &what);
                for (a, b) in w.iter().zip(&ws) {
                    assert_same(a, b, &what);
                }
            }
        }
    }
}

#[test]
fn skip_modifies_nothing_and_does_not_count() {
    for config in configs() {
        let kind = config.name();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut opt = config.build();
            opt.set_non_finite(NonFinite::Skip);
            let mut clean = config.build();
            let (mut ws, mut wc) = (model(7), model(7));
            let mut rng = Rng(8);
            for s in 0..6 {
                let mut gs = grads(&mut rng, 1.0);
                if s == 0 || s == 3 {
                    // The very first step (before any state exists) and a later one.
                    gs[3][19_999] = bad;
                    let before = ws.clone();
                    let report = step(opt.as_mut(), &mut ws, &gs).unwrap();
                    assert!(report.skipped, "{kind}");
                    assert_eq!(report.step, opt.steps());
                    let norm = report.grad_norm.unwrap();
                    assert!(if bad.is_nan() {
                        norm.is_nan()
                    } else {
                        norm == f32::INFINITY
                    });
                    assert_eq!(ws, before, "{kind}: weights changed by a skipped step");
                    if s == 0 {
                        assert_eq!((opt.steps(), opt.layout()), (0, None));
                    }
                    continue;
                }
                let report = step(opt.as_mut(), &mut ws, &gs).unwrap();
                assert!(!report.skipped);
                assert!(report.grad_norm.unwrap().is_finite());
                step(clean.as_mut(), &mut wc, &gs).unwrap();
            }
            // State untouched too: the run equals one that never saw the bad steps.
            assert_eq!(opt.steps(), clean.steps());
            for (a, b) in ws.iter().zip(&wc) {
                assert_same(a, b, &format!("{kind} after skipped steps"));
            }
        }
    }
}

#[test]
fn error_names_the_tensor_and_modifies_nothing() {
    for config in configs() {
        let kind = config.name();
        let mut opt = config.build();
        opt.set_non_finite(NonFinite::Error);
        let mut ws = model(9);
        let mut rng = Rng(10);
        step(opt.as_mut(), &mut ws, &grads(&mut rng, 1.0)).unwrap();
        for tensor in [0, 2, 4] {
            let mut gs = grads(&mut rng, 1.0);
            gs[tensor][LENS[tensor] - 1] = f32::NAN;
            gs[4][0] = f32::INFINITY; // a later tensor too: the first one is named
            let before = ws.clone();
            let err = step(opt.as_mut(), &mut ws, &gs).unwrap_err();
            assert_eq!(err, StepError::NonFiniteGrad { tensor });
            assert!(err.to_string().contains(&format!("tensor {tensor}")));
            assert_eq!((ws.clone(), opt.steps()), (before, 1), "{kind}");
        }
    }
}

#[test]
fn propagate_is_plain_ieee_and_runs_no_check() {
    let mut opt = Sgd::new(SgdConfig::default());
    let mut w = [1.0f32, 1.0];
    let report = opt.step(&mut w, &[f32::NAN, 1.0]).unwrap();
    assert!(w[0].is_nan() && w[1] < 1.0);
    assert_eq!((report.skipped, report.grad_norm), (false, None));
    // With clipping under Propagate, a NaN norm makes every gradient NaN, as in torch.
    opt.set_max_grad_norm(Some(1.0)).unwrap();
    let mut w = [1.0f32, 1.0];
    let report = opt.step(&mut w, &[f32::NAN, 1.0]).unwrap();
    assert!(report.grad_norm.unwrap().is_nan() && w.iter().all(|x| x.is_nan()));
}

#[test]
fn out_of_range_settings_are_refused_and_change_nothing() {
    type Setting = (
        &'static str,
        fn(&mut dyn Optimizer) -> Result<(), StepError>,
    );
    let settings: [Setting; 7] = [
        ("grad_scale", |o| o.set_grad_scale(0.0)),
        ("grad_scale", |o| o.set_grad_scale(-2.0)),
        ("grad_scale", |o| o.set_grad_scale(f32::NAN)),
        ("grad_scale", |o| o.set_grad_scale(f32::INFINITY)),
        ("max_grad_norm", |o| o.set_max_grad_norm(Some(-1.0))),
        ("max_grad_norm", |o| o.set_max_grad_norm(Some(f32::NAN))),
        ("max_grad_norm", |o| {
            let s = o
                .settings()
                .with_threads(3)
                .with_max_grad_norm(Some(f32::INFINITY));
            o.set_settings(s)
        }),
    ];
    for config in configs() {
        let kind = config.name();
        for (field, set) in settings {
            let mut opt = config.build();
            opt.set_grad_scale(8.0).unwrap();
            let before = *opt.settings();
            let err = set(opt.as_mut()).unwrap_err();
            assert!(
                matches!(err, StepError::InvalidSetting { field: f, .. } if f == field),
                "{kind}: {err}"
            );
            assert!(err.to_string().contains(field), "{err}");
            // Nothing changed, and the optimizer still steps with its settings.
            assert_eq!(opt.settings(), &before, "{kind}");
            let mut w = [1.0f32; 4];
            opt.step(&mut w, &[8.0; 4]).unwrap();
            assert_eq!(opt.steps(), 1);
        }
    }
}

#[test]
fn a_zero_max_norm_zeroes_the_update() {
    let mut opt = Sgd::new(SgdConfig::default());
    opt.set_max_grad_norm(Some(0.0)).unwrap();
    let mut w = [1.0f32, -1.0];
    let report = opt.step(&mut w, &[3.0, 4.0]).unwrap();
    assert_eq!((w, report.grad_norm), ([1.0, -1.0], Some(5.0)));
}
