//! Per-tensor trust ratios (LAMB, LARS): each tensor's norms are its own, measured in fixed
//! slices, so a step over many tensors, some longer than a slice, is bitwise the step of each
//! tensor alone against the f32 reference, for every tier, thread count and chunk length;
//! parameter groups without decay are not adapted, and tensors without a gradient keep their
//! state and step count.

use crate::common::*;
use fusedopt::*;

/// Lengths around the measuring slice (8192) and the vector widths.
const LAYOUT: [usize; 7] = [20_000, 8193, 8192, 7, 0, 1, 16_385];

/// LAMB and LARS, at their defaults where they adapt, and far from them.
fn trust_configs() -> Vec<OptimizerConfig> {
    let mut v = Vec::new();
    for name in ["lamb", "lars"] {
        let c = OptimizerConfig::default_for(name).unwrap();
        v.push(with(c, "always_adapt=true"));
        v.push(unusual(c));
        v.push(with(unusual(c), "maximize=true"));
    }
    v.push(
        "lars:lr=0.5,momentum=0.9,nesterov=true,weight_decay=0.01,trust_clip=true"
            .parse()
            .unwrap(),
    );
    v.push(
        "lamb:bias_correction=false,weight_decay=0.1"
            .parse()
            .unwrap(),
    );
    v
}

fn backends() -> Vec<Backend> {
    let mut b = vec![Backend::Scalar, Backend::Simd];
    b.extend(SimdLevel::available().map(Backend::Level));
    b
}

#[test]
fn every_tensor_takes_its_own_ratio_bitwise_on_every_tier_thread_and_chunk() {
    let mut rng = Rng(17);
    let w0: Vec<Vec<f32>> = LAYOUT.iter().map(|&n| rng.vec(n, 1.0)).collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..3)
        .map(|_| LAYOUT.iter().map(|&n| rng.vec(n, 2.0)).collect())
        .collect();
    for config in trust_configs() {
        // Each tensor alone, through the f32 reference written from the papers.
        let expected: Vec<Vec<f32>> = w0
            .iter()
            .enumerate()
            .map(|(t, w)| {
                let mut r = Reference::<f32>::new(config, w.len());
                let mut w = w.clone();
                for g in &grads {
                    r.step(&mut w, &g[t]);
                }
                w
            })
            .collect();
        for backend in backends() {
            for chunk in [64, 1000, 8192, 0] {
                for threads in [1, 2, 3] {
                    let mut opt = config.build();
                    opt.set_backend(backend);
                    opt.set_chunk_len(chunk);
                    let mut ws = w0.clone();
                    pool(threads).install(|| {
                        for g in &grads {
                            opt.step_all(&mut ws, g).unwrap();
                        }
                    });
                    for (t, (a, b)) in ws.iter().zip(&expected).enumerate() {
                        let what =
                            format!("{config} {backend:?} chunk {chunk} x{threads} tensor {t}");
                        assert_same(a, b, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn a_group_without_decay_is_not_adapted_unless_always_adapt() {
    for (name, always) in [
        ("lamb", false),
        ("lamb", true),
        ("lars", false),
        ("lars", true),
    ] {
        let config: OptimizerConfig =
            format!("{name}:lr=0.1,weight_decay=0.1,always_adapt={always}")
                .parse()
                .unwrap();
        let mut rng = Rng(3);
        let w0: Vec<Vec<f32>> = [40, 9].iter().map(|&n| rng.vec(n, 1.0)).collect();
        let g: Vec<Vec<f32>> = [40, 9].iter().map(|&n| rng.vec(n, 1.0)).collect();
        let mut opt = config.build();
        let no_decay = ParamGroup {
            weight_decay: Some(0.0),
            ..Default::default()
        };
        opt.set_param_groups(&[ParamGroup::default(), no_decay])
            .unwrap();
        let mut ws = w0.clone();
        opt.step_all(&mut ws, &g).unwrap();
        // Tensor 1 alone with no decay: the reference with always_adapt as given.
        let alone = with(config, "weight_decay=0");
        let mut r = Reference::<f32>::new(alone, 9);
        let mut w1 = w0[1].clone();
        r.step(&mut w1, &g[1]);
        assert_same(&ws[1], &w1, &format!("{config} tensor 1"));
        // Unadapted, LAMB's tensor moves by lr·u (Adam's first step, |u| ≈ 1), LARS's by lr·g.
        let moved = (ws[1][0] - w0[1][0]).abs();
        let plain = if name == "lamb" {
            0.1
        } else {
            0.1 * g[1][0].abs()
        };
        assert_eq!(
            (moved - plain).abs() < 1e-3,
            !always,
            "{config}: moved {moved}"
        );
        let mut r = Reference::<f32>::new(config, 40);
        let mut w0c = w0[0].clone();
        r.step(&mut w0c, &g[0]);
        assert_same(&ws[0], &w0c, &format!("{config} tensor 0"));
    }
}

#[test]
fn a_tensor_without_a_gradient_waits_and_keeps_its_norms_out() {
    for config in trust_configs() {
        let mut rng = Rng(8);
        let w0: Vec<Vec<f32>> = [300, 20_000].iter().map(|&n| rng.vec(n, 1.0)).collect();
        let g: Vec<Vec<f32>> = [300, 20_000].iter().map(|&n| rng.vec(n, 1.0)).collect();
        let mut opt = config.build();
        let mut ws = w0.clone();
        opt.step_partial(&mut ws, &[None, Some(g[1].clone())])
            .unwrap();
        opt.step_partial(&mut ws, &[Some(g[0].clone()), Some(g[1].clone())])
            .unwrap();
        assert_eq!(opt.tensor_steps(), [1, 2]);
        assert_eq!(opt.steps(), 2, "{config}: the optimizer counts both steps");
        // Tensor 0 took one step, its first; tensor 1 two.
        let mut r0 = Reference::<f32>::new(config, 300);
        let mut w = w0[0].clone();
        r0.step(&mut w, &g[0]);
        assert_same(&ws[0], &w, &format!("{config} waiting tensor"));
        let mut r1 = Reference::<f32>::new(config, 20_000);
        let mut w = w0[1].clone();
        r1.step(&mut w, &g[1]);
        r1.step(&mut w, &g[1]);
        assert_same(&ws[1], &w, &format!("{config} stepping tensor"));
    }
}

#[test]
fn a_nan_gradient_reaches_its_own_tensor_only() {
    for name in ["lamb", "lars"] {
        let config: OptimizerConfig = format!("{name}:always_adapt=true,weight_decay=0.1")
            .parse()
            .unwrap();
        let mut opt = config.build();
        let mut ws = vec![vec![1.0f32; 30], vec![1.0f32; 30]];
        let mut g = vec![vec![0.5f32; 30], vec![0.5f32; 30]];
        g[0][3] = f32::NAN;
        opt.step_all(&mut ws, &g).unwrap();
        assert!(ws[0][3].is_nan(), "{name}");
        assert!(ws[1].iter().all(|x| x.is_finite() && *x < 1.0), "{name}");
    }
}
