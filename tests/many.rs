//! Whole-model steps: `step_many` equals per-tensor `step`s bitwise, for every optimizer, over
//! layouts with odd sizes, any thread count and chunk length.

mod common;
use common::*;
use fusedopt::{Optimizer, StepError};

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
fn per_tensor(kind: Kind, w0: &[Vec<f32>], grads: &[Vec<Vec<f32>>]) -> Vec<Vec<f32>> {
    let mut out = w0.to_vec();
    for (t, w) in out.iter_mut().enumerate() {
        let mut opt = make_default(kind);
        for g in grads {
            opt.step(w, &g[t]).unwrap();
        }
    }
    out
}

/// One optimizer, one `step_many` per round.
fn many(opt: &mut dyn Optimizer, w0: &[Vec<f32>], grads: &[Vec<Vec<f32>>]) -> Vec<Vec<f32>> {
    let mut w = w0.to_vec();
    for g in grads {
        let mut params: Vec<(&mut [f32], &[f32])> = w
            .iter_mut()
            .zip(g)
            .map(|(w, g)| (w.as_mut_slice(), g.as_slice()))
            .collect();
        opt.step_many(&mut params).unwrap();
    }
    w
}

#[test]
fn step_many_equals_per_tensor_steps() {
    for kind in KINDS {
        for layout in LAYOUTS {
            let (w0, grads) = data(layout, 4, 17);
            let expected = per_tensor(kind, &w0, &grads);
            let mut opt = make_default(kind);
            let got = many(opt.as_mut(), &w0, &grads);
            for (t, (a, b)) in got.iter().zip(&expected).enumerate() {
                assert_same(a, b, &format!("{kind:?} layout {layout:?} tensor {t}"));
            }
            assert_eq!(opt.steps(), 4);
            if kind != Kind::Sgd {
                assert_eq!(opt.layout(), Some(layout));
            }
        }
    }
}

#[test]
fn step_many_is_deterministic_for_any_threads_and_chunk_length() {
    let layout = LAYOUTS[0];
    for kind in KINDS {
        let (w0, grads) = data(layout, 3, 5);
        let expected = per_tensor(kind, &w0, &grads);
        for threads in 1..=4 {
            for chunk in [16, 100, 1024, 5000, 0] {
                let mut opt = make_default(kind);
                opt.set_chunk_len(chunk);
                let got = pool(threads).install(|| many(opt.as_mut(), &w0, &grads));
                for (a, b) in got.iter().zip(&expected) {
                    assert_same(a, b, &format!("{kind:?} threads={threads} chunk={chunk}"));
                }
            }
        }
    }
}

#[test]
fn a_mismatched_pair_anywhere_modifies_no_tensor() {
    let layout = [5usize, 40, 7, 100_000];
    for kind in KINDS {
        for bad in 0..layout.len() {
            let (w0, grads) = data(&layout, 1, 9);
            let mut g = grads[0].clone();
            g[bad].pop();
            let mut opt = make_default(kind);
            let mut w = w0.clone();
            let mut params: Vec<(&mut [f32], &[f32])> = w
                .iter_mut()
                .zip(&g)
                .map(|(w, g)| (w.as_mut_slice(), g.as_slice()))
                .collect();
            let err = opt.step_many(&mut params).unwrap_err();
            let n = layout[bad];
            assert_eq!(
                err,
                StepError::LengthMismatch {
                    tensor: bad,
                    weights: n,
                    grads: n - 1
                }
            );
            assert_eq!(w, w0, "{kind:?}: a tensor was modified");
            assert_eq!((opt.steps(), opt.layout()), (0, None));
        }
    }
}

#[test]
fn a_changed_layout_is_refused_and_state_survives() {
    for kind in KINDS.into_iter().filter(|&k| k != Kind::Sgd) {
        let layout = [10usize, 20, 30];
        let (w0, grads) = data(&layout, 3, 1);
        // Reference: three uninterrupted rounds.
        let expected = per_tensor(kind, &w0, &grads);
        let mut opt = make_default(kind);
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
            let mut params: Vec<(&mut [f32], &[f32])> = ws
                .iter_mut()
                .zip(&gs)
                .map(|(w, g)| (w.as_mut_slice(), g.as_slice()))
                .collect();
            assert!(
                opt.step_many(&mut params).is_err(),
                "{kind:?} accepted {other:?}"
            );
            assert!(ws.iter().flatten().all(|&x| x == 1.0));
        }
        // The state is untouched: continuing gives the uninterrupted result.
        w = many(opt.as_mut(), &w, &grads[1..]);
        for (a, b) in w.iter().zip(&expected) {
            assert_same(a, b, &format!("{kind:?} after refused layouts"));
        }
    }
}

#[test]
fn step_is_a_model_of_one_tensor() {
    for kind in KINDS {
        let (w0, grads) = data(&[1000], 3, 2);
        let mut a = make_default(kind);
        let mut wa = w0[0].clone();
        for g in &grads {
            a.step(&mut wa, &g[0]).unwrap();
        }
        let mut b = make_default(kind);
        let wb = many(b.as_mut(), &w0, &grads);
        assert_same(&wa, &wb[0], &format!("{kind:?}"));
        // And the two calls share one state: step after step_many continues it.
        a.step_many(&mut [(&mut wa, &grads[0][0])]).unwrap();
        assert_eq!(a.steps(), 4);
    }
}
