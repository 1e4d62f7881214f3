//! Missing gradients: a tensor without a gradient is left alone, state included, keeps its own
//! step count, and the rest is bitwise what stepping the other tensors alone gives.

use crate::common::*;
use fusedopt::*;

const LENS: [usize; 5] = [5, 0, 1031, 17, 70_000];

/// Which tensors have a gradient at step `s`: a pattern that leaves some out often.
fn present(s: usize, t: usize) -> bool {
    !(s * 7 + t * 3).is_multiple_of(5)
}

/// The configurations checked: every optimizer, and Adam with its options.
fn variants() -> Vec<OptimizerConfig> {
    let mut v: Vec<OptimizerConfig> = configs()
        .into_iter()
        .map(|c| with(unusual(c), "weight_decay=0.01"))
        .collect();
    v.push("adamw:amsgrad=true,lr=0.01".parse().unwrap());
    v.push("adam:eps_mode=sqrt_v_hat,maximize=true".parse().unwrap());
    v
}

/// The rules whose every tensor keeps its own clock: all but the schedule-free ones, whose
/// averaging (`k`, `lr_max`, `weight_sum`) is the optimizer's, as the reference keeps it per
/// parameter group (see `schedule_free_tensors_without_a_gradient_wait_while_the_clock_runs`).
fn per_tensor_clock() -> Vec<OptimizerConfig> {
    variants()
        .into_iter()
        .filter(|c| !c.name().ends_with("_schedulefree"))
        .collect()
}

#[test]
fn schedule_free_tensors_without_a_gradient_wait_while_the_clock_runs() {
    for name in ["adamw_schedulefree", "sgd_schedulefree"] {
        let config = with(
            unusual(OptimizerConfig::default_for(name).unwrap()),
            "weight_decay=0",
        );
        let mut rng = Rng(5);
        let w0 = [rng.vec(64, 1.0), rng.vec(33, 1.0)];
        let (mut both, mut alone, mut zeros) = (config.build(), config.build(), config.build());
        let (mut ws, mut wa, mut wz) = (w0.clone(), vec![w0[0].clone()], w0[1].clone());
        for s in 0..6 {
            let g0 = rng.vec(64, 1.0);
            let g1 = (s >= 3).then(|| rng.vec(33, 1.0));
            both.step_partial(&mut ws, &[Some(g0.clone()), g1.clone()])
                .unwrap();
            alone.step_all(&mut wa, &[&g0]).unwrap();
            // Without weight decay a zero gradient moves neither the weights nor d and v:
            // stepping on zeros is waiting.
            zeros
                .step(&mut wz, &g1.unwrap_or_else(|| vec![0.0; 33]))
                .unwrap();
            if s < 3 {
                assert_eq!(ws[1], w0[1], "{name}: a tensor without a gradient moved");
            }
        }
        assert_same(
            &ws[0],
            &wa[0],
            &format!("{name}: tensor 0 against its optimizer alone"),
        );
        assert_same(
            &ws[1],
            &wz,
            &format!("{name}: tensor 1 against zero gradients"),
        );
        assert_eq!(both.tensor_steps(), [6, 3]);
        assert_eq!(both.scalar_state(), alone.scalar_state(), "{name}");
    }
}

#[test]
fn missing_gradients_equal_one_optimizer_per_tensor_stepping_when_it_has_one() {
    for config in per_tensor_clock() {
        for chunk in [0, 256] {
            let mut rng = Rng(1);
            let w0: Vec<Vec<f32>> = LENS.iter().map(|&n| rng.vec(n, 1.0)).collect();
            let mut singles: Vec<Box<dyn Optimizer>> =
                LENS.iter().map(|_| config.build()).collect();
            let mut expected = w0.clone();
            let (mut partial, mut fed) = (config.build(), config.build());
            partial.set_chunk_len(chunk);
            fed.set_chunk_len(chunk);
            let mut ws = w0.clone();
            let mut model = Locked::new(&w0, &[]);
            for s in 0..8 {
                let grads: Vec<Option<Vec<f32>>> = LENS
                    .iter()
                    .enumerate()
                    .map(|(t, &n)| present(s, t).then(|| rng.vec(n, 2.0)))
                    .collect();
                for (t, g) in grads.iter().enumerate() {
                    if let Some(g) = g {
                        singles[t].step(&mut expected[t], g).unwrap();
                    }
                }
                partial.step_partial(&mut ws, &grads).unwrap();
                model.grads = grads;
                fed.step_feed(&model).unwrap();
            }
            let counts: Vec<u64> = singles.iter().map(|o| o.steps()).collect();
            assert_eq!(partial.tensor_steps(), counts, "{config}");
            assert_eq!(fed.tensor_steps(), counts, "{config}");
            assert_eq!((partial.steps(), fed.steps()), (8, 8));
            for t in 0..LENS.len() {
                let what = format!("{config}, chunk {chunk}, tensor {t}");
                assert_same(&ws[t], &expected[t], &format!("step_partial: {what}"));
                assert_same(
                    &model.weights()[t],
                    &expected[t],
                    &format!("step_feed: {what}"),
                );
            }
        }
    }
}

#[test]
fn with_hygiene_and_groups_the_rest_is_stepped_as_if_alone() {
    // The tensors 0 and 2 always have gradients, 1 never: the step must equal one over the
    // model without tensor 1, its global norm included.
    let lens = [300usize, 40, 5000];
    let groups = &GROUPS[..3];
    for config in variants() {
        let mut rng = Rng(2);
        let w0: Vec<Vec<f32>> = lens.iter().map(|&n| rng.vec(n, 1.0)).collect();
        let mut full = config.build();
        let mut alone = config.build();
        for opt in [&mut full, &mut alone] {
            opt.set_max_grad_norm(Some(0.5)).unwrap();
            opt.set_grad_scale(4.0).unwrap();
            opt.set_non_finite(NonFinite::Skip);
        }
        full.set_param_groups(groups).unwrap();
        alone.set_param_groups(&[groups[0], groups[2]]).unwrap();
        let mut ws = w0.clone();
        let mut wa = vec![w0[0].clone(), w0[2].clone()];
        for _ in 0..5 {
            let (g0, g2) = (rng.vec(lens[0], 8.0), rng.vec(lens[2], 8.0));
            let a = full
                .step_partial(&mut ws, &[Some(&g0), None, Some(&g2)])
                .unwrap();
            let b = alone.step_all(&mut wa, &[&g0, &g2]).unwrap();
            assert_eq!(a.grad_norm.map(f32::to_bits), b.grad_norm.map(f32::to_bits));
        }
        assert_same(&ws[0], &wa[0], &format!("{config} tensor 0"));
        assert_same(&ws[2], &wa[1], &format!("{config} tensor 2"));
        assert_eq!(ws[1], w0[1], "{config}: tensor 1 was modified");
        assert_eq!(full.tensor_steps(), [5, 0, 5]);
    }
}

#[test]
fn a_tensor_first_stepped_late_starts_from_fresh_state() {
    // Tensor 1 has no gradient for 3 steps, then one: its update is a first step (Adam's t = 1,
    // zero moments), whatever the other tensor went through.
    for config in per_tensor_clock() {
        let mut rng = Rng(3);
        let w0 = [rng.vec(64, 1.0), rng.vec(33, 1.0)];
        let mut opt = config.build();
        let mut ws = w0.clone();
        for _ in 0..3 {
            opt.step_partial(&mut ws, &[Some(rng.vec(64, 1.0)), None])
                .unwrap();
        }
        assert_eq!(ws[1], w0[1]);
        let g1 = rng.vec(33, 1.0);
        opt.step_partial(&mut ws, &[None, Some(g1.clone())])
            .unwrap();
        let mut fresh = config.build();
        let mut expected = w0[1].clone();
        fresh.step(&mut expected, &g1).unwrap();
        assert_same(&ws[1], &expected, &format!("{config}"));
        assert_eq!(opt.tensor_steps(), [3, 1]);
    }
}

#[test]
fn missing_gradients_survive_a_state_file() {
    let dir = std::env::temp_dir().join(format!("fusedopt-partial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for config in variants() {
        let mut rng = Rng(4);
        let w0: Vec<Vec<f32>> = LENS.iter().map(|&n| rng.vec(n, 1.0)).collect();
        let grads: Vec<Vec<Option<Vec<f32>>>> = (0..6)
            .map(|s| {
                LENS.iter()
                    .enumerate()
                    .map(|(t, &n)| present(s, t).then(|| rng.vec(n, 2.0)))
                    .collect()
            })
            .collect();
        let mut straight = config.build();
        let mut ws = w0.clone();
        for g in &grads {
            straight.step_partial(&mut ws, g).unwrap();
        }
        let mut first = config.build();
        let mut wr = w0.clone();
        for g in &grads[..3] {
            first.step_partial(&mut wr, g).unwrap();
        }
        let path = dir.join(format!("{}.safetensors", config.name()));
        first.save_state(&path).unwrap();
        let mut resumed = config.build();
        resumed.load_state(&path).unwrap();
        assert_eq!(resumed.tensor_steps(), first.tensor_steps());
        for g in &grads[3..] {
            resumed.step_partial(&mut wr, g).unwrap();
        }
        for t in 0..LENS.len() {
            assert_same(&wr[t], &ws[t], &format!("{config} tensor {t}"));
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn step_partial_checks_every_pair_and_changes_nothing_on_error() {
    let mut opt = Adam::new(AdamConfig::default());
    let mut ws = vec![vec![1.0f32; 4], vec![1.0f32; 3]];
    let err = opt
        .step_partial(&mut ws, &[None, Some(vec![1.0f32; 2])])
        .unwrap_err();
    assert_eq!(
        err,
        StepError::LengthMismatch {
            tensor: 1,
            weights: 3,
            grads: 2
        }
    );
    let err = opt
        .step_partial(&mut ws, &[Some(vec![1.0f32; 4])])
        .unwrap_err();
    assert_eq!(
        err,
        StepError::GradCount {
            weights: 2,
            grads: 1
        }
    );
    assert_eq!(ws, [vec![1.0f32; 4], vec![1.0f32; 3]]);
    assert_eq!((opt.steps(), opt.layout()), (0, None));
}
