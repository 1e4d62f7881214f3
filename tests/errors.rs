//! Bad input returns an error naming the problem and changes nothing.

use crate::common::*;
use fusedopt::*;

/// Snapshot of everything observable: weights plus the result of one more identical step.
fn after_one_step(opt: &mut dyn Optimizer, w: &[f32], g: &[f32]) -> Vec<f32> {
    let mut w = w.to_vec();
    opt.step(&mut w, g).unwrap();
    w
}

#[test]
fn mismatched_grads_are_refused_and_nothing_changes() {
    for config in configs() {
        let kind = config.name();
        let mut opt = config.build();
        let mut reference = config.build();
        let mut w = vec![1.0f32; 10];
        let g = vec![0.5f32; 10];
        opt.step(&mut w, &g).unwrap();
        reference.step(&mut [1.0f32; 10], &g).unwrap();
        let before = w.clone();
        let err = opt.step(&mut w, &[1.0; 9]).unwrap_err();
        assert_eq!(
            err,
            StepError::LengthMismatch {
                tensor: 0,
                weights: 10,
                grads: 9
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("10") && msg.contains('9'), "{msg}");
        assert_eq!(w, before, "{kind}: weights modified");
        assert_eq!(opt.steps(), 1);
        // State untouched: the next step behaves exactly like the reference's second step.
        assert_eq!(
            after_one_step(opt.as_mut(), &w, &g),
            after_one_step(reference.as_mut(), &w, &g)
        );
    }
}

#[test]
fn mismatched_grads_on_the_first_step_allocate_nothing() {
    for config in configs() {
        let mut opt = config.build();
        let mut w = vec![1.0f32; 4];
        assert!(opt.step(&mut w, &[1.0; 5]).is_err());
        assert_eq!((opt.layout(), opt.steps()), (None, 0));
        assert_eq!(w, [1.0; 4]);
    }
}

#[test]
fn another_length_once_state_exists_is_refused() {
    for config in configs() {
        let mut opt = config.build();
        opt.step(&mut [1.0; 10], &[1.0; 10]).unwrap();
        let mut w = vec![2.0f32; 11];
        let result = opt.step(&mut w, &[1.0; 11]);
        if stateless(&config) {
            // No state: any length is fine.
            assert!(result.is_ok());
            continue;
        }
        let err = result.unwrap_err();
        assert_eq!(
            err,
            StepError::TensorLen {
                tensor: 0,
                expected: 10,
                found: 11
            }
        );
        assert!(err.to_string().contains("10") && err.to_string().contains("11"));
        assert_eq!(w, [2.0; 11]);
        assert_eq!(opt.layout(), Some(&[10][..]));
    }
}

#[test]
fn step_many_checks_every_pair_before_writing_anything() {
    for config in configs() {
        let kind = config.name();
        let mut opt = config.build();
        let (mut a, mut b, mut c) = (vec![1.0f32; 8], vec![1.0f32; 3], vec![1.0f32; 5]);
        let (ga, gb, gc) = (vec![1.0f32; 8], vec![1.0f32; 3], vec![1.0f32; 4]);
        let err = opt
            .step_many(&mut [(&mut a, &ga), (&mut b, &gb), (&mut c, &gc)])
            .unwrap_err();
        assert_eq!(
            err,
            StepError::LengthMismatch {
                tensor: 2,
                weights: 5,
                grads: 4
            }
        );
        assert!(
            a.iter().chain(&b).chain(&c).all(|&x| x == 1.0),
            "{kind} modified a tensor"
        );
        assert_eq!(opt.steps(), 0);
    }
}

#[test]
fn step_many_refuses_another_layout() {
    for config in configs().into_iter().filter(|c| !stateless(c)) {
        let mut opt = config.build();
        let (mut a, mut b) = (vec![1.0f32; 8], vec![1.0f32; 3]);
        let (ga, gb) = (vec![1.0f32; 8], vec![1.0f32; 3]);
        opt.step_many(&mut [(&mut a, &ga), (&mut b, &gb)]).unwrap();
        let (a0, b0) = (a.clone(), b.clone());
        let err = opt.step_many(&mut [(&mut a, &ga)]).unwrap_err();
        assert_eq!(
            err,
            StepError::TensorCount {
                expected: 2,
                found: 1
            }
        );
        let err = opt
            .step_many(&mut [(&mut b, &gb), (&mut a, &ga)])
            .unwrap_err();
        assert_eq!(
            err,
            StepError::TensorLen {
                tensor: 0,
                expected: 8,
                found: 3
            }
        );
        assert_eq!((a, b), (a0, b0));
    }
}

#[test]
fn empty_tensors_are_fine() {
    for config in configs() {
        let mut opt = config.build();
        assert_eq!(opt.step(&mut [], &[]).unwrap().step, 1);
        assert_eq!(opt.step(&mut [], &[]).unwrap().step, 2);
        let mut many = config.build();
        let mut a = vec![1.0f32; 3];
        let mut e: Vec<f32> = vec![];
        many.step_many(&mut [(&mut e, &[]), (&mut a, &[1.0; 3])])
            .unwrap();
        // An empty call is another layout for a stateful optimizer; SGD has none to keep.
        let result = many.step_many(&mut []);
        if stateless(&config) {
            assert!(result.is_ok());
        } else {
            assert_eq!(
                result.unwrap_err(),
                StepError::TensorCount {
                    expected: 2,
                    found: 0
                }
            );
        }
    }
}

#[test]
fn chunk_len_zero_and_huge_never_panic() {
    for config in configs() {
        for len in [0, 1, 3, usize::MAX] {
            let mut opt = config.build();
            opt.set_chunk_len(len);
            assert!(opt.chunk_len() > 0 && opt.chunk_len().is_multiple_of(16));
            let mut w = vec![1.0f32; 1000];
            pool(2).install(|| opt.step(&mut w, &[1.0; 1000])).unwrap();
        }
    }
}

#[test]
fn invalid_hyperparameters_are_refused_and_nothing_changes() {
    let cases: Vec<(Box<dyn Optimizer>, &str)> = vec![
        (
            Box::new(Sgd::new(SgdConfig {
                lr: -0.1,
                ..Default::default()
            })),
            "lr",
        ),
        (
            Box::new(Sgd::new(SgdConfig {
                weight_decay: -1e-4,
                ..Default::default()
            })),
            "weight_decay",
        ),
        (
            Box::new(Momentum::new(MomentumConfig {
                weight_decay: f32::INFINITY,
                ..Default::default()
            })),
            "weight_decay",
        ),
        (
            Box::new(Adam::new(AdamConfig {
                weight_decay: f32::NAN,
                decoupled_weight_decay: true,
                ..Default::default()
            })),
            "weight_decay",
        ),
        (
            Box::new(Momentum::new(MomentumConfig {
                momentum: f32::NAN,
                ..Default::default()
            })),
            "momentum",
        ),
        (
            Box::new(Nag::new(NagConfig {
                lr: f32::INFINITY,
                ..Default::default()
            })),
            "lr",
        ),
        (
            Box::new(AdaGrad::new(AdaGradConfig {
                eps: -1e-8,
                ..Default::default()
            })),
            "eps",
        ),
        (
            Box::new(RmsProp::new(RmsPropConfig {
                decay_rate: 1.5,
                ..Default::default()
            })),
            "decay_rate",
        ),
        (
            Box::new(Adam::new(AdamConfig {
                beta2: 1.0,
                ..Default::default()
            })),
            "beta2",
        ),
    ];
    for (mut opt, field) in cases {
        let mut w = vec![1.0f32; 4];
        let err = opt.step(&mut w, &[1.0; 4]).unwrap_err();
        assert!(
            matches!(err, StepError::InvalidConfig { field: f, .. } if f == field),
            "{err}"
        );
        assert!(
            err.to_string().contains(field) && err.to_string().contains(opt.name()),
            "{err}"
        );
        assert_eq!(w, [1.0; 4]);
        assert_eq!((opt.steps(), opt.layout()), (0, None));
    }
}

#[test]
fn errors_are_std_errors() {
    fn takes(_: &dyn std::error::Error) {}
    takes(&StepError::OutOfMemory { elements: 1 });
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(StepError::TensorCount {
        expected: 1,
        found: 2,
    });
    assert_eq!(
        boxed.to_string(),
        "optimizer state holds 1 tensors but this step passed 2"
    );
}

#[test]
fn nan_and_inf_gradients_follow_ieee_arithmetic() {
    for config in configs() {
        let kind = config.name();
        let mut opt = config.build();
        let mut w = vec![1.0f32; 3];
        opt.step(&mut w, &[f32::NAN, f32::INFINITY, 1.0]).unwrap();
        assert!(w[0].is_nan(), "{kind}");
        assert!(w[2].is_finite(), "{kind}");
    }
}
