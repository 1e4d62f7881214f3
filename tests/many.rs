//! Whole-model steps: `step_many` and `step_all` equal per-tensor `step`s bitwise, for every
//! optimizer, over layouts with odd sizes, any thread count and chunk length.

use crate::common::*;
use fusedopt::{Optimizer, OptimizerConfig, OptimizerExt, StepError};

const LAYOUTS: [&[usize]; 5] = [
    &[0, 1, 7, 15, 16, 17, 4097, 65537],
    &[3],
    &[0],
    &[65537, 0, 0, 1, 100_000, 31],
    &[129; 300],
];

/// Initial weights and `steps` rounds of gradients for a layout.
fn data(layout: &[usize], steps: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>) {
    let mut rng = Rng(seed);
    let w = layout.iter().map(|&n| rng.vec(n, 1.0)).collect();
    let g = (0..steps)
        .map(|_| layout.iter().map(|&n| rng.vec(n, 2.0)).collect())
        .collect();
    (w, g)
}

/// Each tensor with its own optimizer and `step`.
fn per_tensor(config: OptimizerConfig, w0: &[Vec<f32>], grads: &[Vec<Vec<f32>>]) -> Vec<Vec<f32>> {
    let mut out = w0.to_vec();
    for (t, w) in out.iter_mut().enumerate() {
        let mut opt = config.build();
        for g in grads {
            opt.step(w, &g[t]).unwrap();
        }
    }
    out
}

/// One optimizer, one `step_all` per round.
fn many(opt: &mut dyn Optimizer, w0: &[Vec<f32>], grads: &[Vec<Vec<f32>>]) -> Vec<Vec<f32>> {
    let mut w = w0.to_vec();
    for g in grads {
        opt.step_all(&mut w, g).unwrap();
    }
    w
}

/// The `(weights, grads)` pairs of `step_many`.
fn pairs<'a>(ws: &'a mut [Vec<f32>], gs: &'a [Vec<f32>]) -> Vec<(&'a mut [f32], &'a [f32])> {
    ws.iter_mut()
        .zip(gs)
        .map(|(w, g)| (w.as_mut_slice(), g.as_slice()))
        .collect()
}

#[test]
fn step_many_equals_per_tensor_steps() {
    for config in configs() {
        for layout in LAYOUTS {
            let (w0, grads) = data(layout, 4, 17);
            let expected = per_tensor(config, &w0, &grads);
            let mut opt = config.build();
            let got = many(opt.as_mut(), &w0, &grads);
            for (t, (a, b)) in got.iter().zip(&expected).enumerate() {
                assert_same(a, b, &format!("{config} layout {layout:?} tensor {t}"));
            }
            assert_eq!(opt.steps(), 4);
            if !stateless(&config) {
                assert_eq!(opt.layout(), Some(layout));
            }
            // step_many over the same tensors as pairs: the same bits.
            let mut pairs_opt = config.build();
            let mut w = w0.clone();
            for g in &grads {
                pairs_opt.step_many(&mut pairs(&mut w, g)).unwrap();
            }
            for (t, (a, b)) in w.iter().zip(&expected).enumerate() {
                assert_same(a, b, &format!("{config} step_many, tensor {t}"));
            }
        }
    }
}

#[test]
fn step_many_is_deterministic_for_any_threads_and_chunk_length() {
    let layout = LAYOUTS[0];
    for config in configs() {
        let (w0, grads) = data(layout, 3, 5);
        let expected = per_tensor(config, &w0, &grads);
        for threads in 1..=4 {
            for chunk in [16, 100, 1024, 5000, 0] {
                let mut opt = config.build();
                opt.set_chunk_len(chunk);
                let got = pool(threads).install(|| many(opt.as_mut(), &w0, &grads));
                for (a, b) in got.iter().zip(&expected) {
                    assert_same(a, b, &format!("{config} threads={threads} chunk={chunk}"));
                }
            }
        }
    }
}

#[test]
fn a_mismatched_pair_anywhere_modifies_no_tensor() {
    let layout = [5usize, 40, 7, 100_000];
    for config in configs() {
        for bad in 0..layout.len() {
            let (w0, grads) = data(&layout, 1, 9);
            let mut g = grads[0].clone();
            g[bad].pop();
            let n = layout[bad];
            let expected = StepError::LengthMismatch {
                tensor: bad,
                weights: n,
                grads: n - 1,
            };
            let mut opt = config.build();
            let mut w = w0.clone();
            let err = opt.step_many(&mut pairs(&mut w, &g)).unwrap_err();
            assert_eq!(err, expected);
            assert_eq!(w, w0, "{config}: a tensor was modified");
            assert_eq!(opt.step_all(&mut w, &g).unwrap_err(), expected);
            assert_eq!(w, w0, "{config}: step_all modified a tensor");
            assert_eq!((opt.steps(), opt.layout()), (0, None));
        }
    }
}

#[test]
fn a_changed_layout_is_refused_and_state_survives() {
    for config in configs().into_iter().filter(|c| !stateless(c)) {
        let layout = [10usize, 20, 30];
        let (w0, grads) = data(&layout, 3, 1);
        // Reference: three uninterrupted rounds.
        let expected = per_tensor(config, &w0, &grads);
        let mut opt = config.build();
        let mut w = many(opt.as_mut(), &w0, &grads[..1]);
        // Another layout: refused.
        for other in [
            &[10usize, 20][..],
            &[10, 20, 31],
            &[10, 20, 30, 1],
            &[30, 20, 10],
        ] {
            let mut ws: Vec<Vec<f32>> = other.iter().map(|&n| vec![1.0; n]).collect();
            let gs: Vec<Vec<f32>> = other.iter().map(|&n| vec![1.0; n]).collect();
            assert!(
                opt.step_all(&mut ws, &gs).is_err(),
                "{config} accepted {other:?}"
            );
            assert!(ws.iter().flatten().all(|&x| x == 1.0));
        }
        // The state is untouched: continuing gives the uninterrupted result.
        w = many(opt.as_mut(), &w, &grads[1..]);
        for (a, b) in w.iter().zip(&expected) {
            assert_same(a, b, &format!("{config} after refused layouts"));
        }
    }
}

#[test]
fn step_is_a_model_of_one_tensor() {
    for config in configs() {
        let (w0, grads) = data(&[1000], 3, 2);
        let mut a = config.build();
        let mut wa = w0[0].clone();
        for g in &grads {
            a.step(&mut wa, &g[0]).unwrap();
        }
        let mut b = config.build();
        let wb = many(b.as_mut(), &w0, &grads);
        assert_same(&wa, &wb[0], &format!("{config}"));
        // And the two calls share one state: step after step_many continues it.
        a.step_many(&mut [(&mut wa, &grads[0][0])]).unwrap();
        assert_eq!(a.steps(), 4);
    }
}

#[test]
fn step_all_refuses_a_missing_or_extra_grad_and_changes_nothing() {
    let layout = [5usize, 40, 7];
    for config in configs() {
        let (w0, grads) = data(&layout, 2, 12);
        let mut opt = config.build();
        let mut w = w0.clone();
        opt.step_all(&mut w, &grads[0]).unwrap();
        let after_one = w.clone();
        let mut extra = grads[1].clone();
        extra.push(vec![0.0; 3]);
        for (gs, found) in [(&grads[1][..2], 2), (&extra[..], 4)] {
            let err = opt.step_all(&mut w, gs).unwrap_err();
            assert_eq!(
                err,
                StepError::GradCount {
                    weights: 3,
                    grads: found
                },
                "{config}"
            );
            assert!(err.to_string().contains(&found.to_string()), "{err}");
            assert_eq!(w, after_one, "{config}: weights modified");
            assert_eq!(opt.steps(), 1);
        }
        // The state is untouched: the next step is the uninterrupted second step.
        opt.step_all(&mut w, &grads[1]).unwrap();
        let expected = per_tensor(config, &w0, &grads);
        for (a, b) in w.iter().zip(&expected) {
            assert_same(a, b, &format!("{config} after refused calls"));
        }
    }
}

#[test]
fn step_all_takes_any_slice_holders_on_concrete_and_boxed_optimizers() {
    use fusedopt::{Adam, AdamConfig};
    let (w0, grads) = data(&[33, 7], 2, 4);
    let config = OptimizerConfig::Adam(AdamConfig::default());
    let expected = per_tensor(config, &w0, &grads);

    // A concrete optimizer, with boxed slices and borrowed gradient slices.
    let mut concrete = Adam::new(AdamConfig::default());
    let mut boxed: Vec<Box<[f32]>> = w0.iter().map(|w| w.clone().into_boxed_slice()).collect();
    for g in &grads {
        let borrowed: Vec<&[f32]> = g.iter().map(Vec::as_slice).collect();
        concrete.step_all(&mut boxed, &borrowed).unwrap();
    }
    // A boxed optimizer, with `&mut [f32]` weights.
    let mut dynamic: Box<dyn Optimizer> = config.build();
    let mut storage = w0.clone();
    for g in &grads {
        let mut views: Vec<&mut [f32]> = storage.iter_mut().map(Vec::as_mut_slice).collect();
        dynamic.step_all(&mut views, g).unwrap();
    }
    for t in 0..2 {
        assert_same(&boxed[t], &expected[t], "concrete Adam, boxed slices");
        assert_same(&storage[t], &expected[t], "Box<dyn Optimizer>, &mut slices");
    }
}
