//! The trainer options (weight decay, maximize, AdamW, AMSGrad, ε placement, parameter groups),
//! alone and combined, against the plain references of `common`, on every tier; determinism with
//! every option on; parameter-group errors.

use crate::common::*;
use fusedopt::*;

const STEPS: u64 = 60;
const N: usize = 1031;
/// Tolerance against the f64 reference, as in tests/reference.rs.
const TOL: f64 = 5e-6;

/// Gradients of mixed magnitudes that shrink and grow from step to step (so AMSGrad's maximum
/// differs from v), some exactly zero.
fn grads(rng: &mut Rng, n: usize, step: u64) -> Vec<f32> {
    let shrink = [1.0, 0.3, 0.05][(step % 3) as usize];
    (0..n)
        .map(|i| {
            let scale = [1e-4, 1e-2, 1.0, 10.0][i % 4] * shrink;
            if i % 17 == 0 {
                0.0
            } else {
                rng.uniform() * scale
            }
        })
        .collect()
}

/// The option sets each optimizer is checked with: every option alone, then combined.
fn option_sets(config: OptimizerConfig) -> Vec<(&'static str, OptimizerConfig)> {
    let base = unusual(config);
    let mut sets = vec![
        ("weight_decay", "weight_decay=0.1"),
        ("maximize", "maximize=true"),
        ("weight_decay+maximize", "weight_decay=0.1,maximize=true"),
    ];
    if matches!(config.name(), "momentum" | "nag") {
        sets.extend([
            ("buffer form", "form=buffer"),
            (
                "buffer form+weight_decay+maximize",
                "form=buffer,weight_decay=0.1,maximize=true",
            ),
        ]);
    }
    if config.name() == "rmsprop" {
        sets.extend([
            ("momentum", "momentum=0.8"),
            ("centered", "centered=true"),
            (
                "centered+momentum+weight_decay+maximize",
                "centered=true,momentum=0.8,weight_decay=0.1,maximize=true",
            ),
        ]);
    }
    if matches!(config.name(), "radam" | "nadam") {
        sets.push((
            "decoupled_weight_decay",
            "weight_decay=0.3,decoupled_weight_decay=true",
        ));
    }
    if config.name() == "adam" {
        sets.extend([
            (
                "adamw",
                "lr=0.01,weight_decay=0.3,decoupled_weight_decay=true",
            ),
            ("amsgrad", "amsgrad=true"),
            ("eps_mode sqrt_v_hat", "eps_mode=sqrt_v_hat"),
            (
                "amsgrad+l2+maximize+sqrt_v_hat",
                "weight_decay=0.1,maximize=true,amsgrad=true,eps_mode=sqrt_v_hat",
            ),
            (
                "adamw+amsgrad+maximize+sqrt_v_hat",
                "lr=0.01,weight_decay=0.3,decoupled_weight_decay=true,maximize=true,amsgrad=true,\
                 eps_mode=sqrt_v_hat",
            ),
        ]);
    }
    sets.into_iter()
        .map(|(what, overrides)| (what, with(base, overrides)))
        .collect()
}

/// Runs `config` on `backend` against the f32 reference (bitwise) and the f64 reference (within
/// TOL); returns the worst error against f64.
fn check(config: OptimizerConfig, backend: Backend, what: &str) -> f64 {
    let mut rng = Rng(11);
    let w0 = rng.vec(N, 2.0);
    let mut opt = config.build();
    opt.set_backend(backend);
    opt.set_chunk_len(128);
    let (mut w, mut w32) = (w0.clone(), w0.clone());
    let mut w64: Vec<f64> = w0.iter().map(|&x| x as f64).collect();
    let mut r32 = Reference::<f32>::new(config, N);
    let mut r64 = Reference::<f64>::new(config, N);
    for step in 0..STEPS {
        let g = grads(&mut rng, N, step);
        opt.step(&mut w, &g).unwrap();
        r32.step(&mut w32, &g);
        let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
        r64.step(&mut w64, &g64);
        assert_same(
            &w,
            &w32,
            &format!("{} {what} {backend:?} step {step}", config.name()),
        );
    }
    let worst = w
        .iter()
        .zip(&w64)
        .map(|(&a, &b)| (a as f64 - b).abs() / (1.0 + b.abs()))
        .fold(0.0, f64::max);
    assert!(worst <= TOL, "{config} {what}: error {worst:e} against f64");
    worst
}

#[test]
fn each_option_alone_and_combined_matches_the_references_on_every_tier() {
    for config in configs() {
        for (what, options) in option_sets(config) {
            let mut worst = 0f64;
            for backend in [Backend::Scalar]
                .into_iter()
                .chain(SimdLevel::available().map(Backend::Level))
            {
                worst = worst.max(check(options, backend, what));
            }
            println!(
                "{} {what}: max error vs f64 after {STEPS} steps = {worst:.2e}",
                config.name()
            );
        }
    }
}

#[test]
fn options_keep_results_independent_of_threads_and_chunks() {
    let n = 100_003;
    for config in configs() {
        let options = option_sets(config).last().unwrap().1;
        let w0 = Rng(5).vec(n, 1.0);
        let run = |threads: usize, chunk: usize, backend: Backend| {
            let mut opt = options.build();
            opt.set_backend(backend);
            opt.set_chunk_len(chunk);
            let mut w = w0.clone();
            let mut rng = Rng(6);
            pool(threads).install(|| {
                for step in 0..4 {
                    opt.step(&mut w, &grads(&mut rng, n, step)).unwrap();
                }
            });
            w
        };
        let expected = run(1, usize::MAX, Backend::Scalar);
        for threads in 1..=3 {
            for chunk in [16, 1000, 65_536] {
                let w = run(threads, chunk, Backend::Simd);
                assert_same(
                    &w,
                    &expected,
                    &format!("{options} {threads} threads, chunk {chunk}"),
                );
            }
        }
    }
}

/// For each tensor of `ws`, an optimizer of `config` with its group's learning rate and weight
/// decay, and a copy of the tensor.
fn one_per_tensor(
    config: OptimizerConfig,
    ws: &[Vec<f32>],
    groups: &[ParamGroup],
) -> Vec<(Box<dyn Optimizer>, Vec<f32>)> {
    let (lr, wd) = (lr_of(&config), weight_decay_of(&config));
    ws.iter()
        .zip(groups)
        .map(|(w, g)| {
            let own = format!(
                "lr={},weight_decay={}",
                lr * g.lr_scale,
                g.weight_decay.unwrap_or(wd)
            );
            (with(config, &own).build(), w.clone())
        })
        .collect()
}

/// Steps each tensor's own optimizer on its gradients.
fn step_each(singles: &mut [(Box<dyn Optimizer>, Vec<f32>)], gs: &[Vec<f32>]) {
    for ((single, w), g) in singles.iter_mut().zip(gs) {
        single.step(w, g).unwrap();
    }
}

/// Asserts that every tensor of `ws` has the bits of its own optimizer's copy.
fn assert_same_as(ws: &[Vec<f32>], singles: &[(Box<dyn Optimizer>, Vec<f32>)], what: &str) {
    for (t, (w, (_, single))) in ws.iter().zip(singles).enumerate() {
        assert_same(w, single, &format!("{what}, tensor {t}"));
    }
}

#[test]
fn param_groups_match_one_optimizer_per_tensor() {
    let lens = [300, 17, 4097, 64];
    for config in configs() {
        for decoupled in [false, true] {
            if decoupled && config.name() != "adam" {
                continue;
            }
            let hp = with(config, "weight_decay=0.1");
            let hp = if decoupled {
                with(hp, "decoupled_weight_decay=true")
            } else {
                hp
            };
            let lr = lr_of(&hp);
            let mut rng = Rng(3);
            let mut ws: Vec<Vec<f32>> = lens.iter().map(|&n| rng.vec(n, 1.0)).collect();
            let mut singles = one_per_tensor(hp, &ws, &GROUPS);
            let mut opt = hp.build();
            opt.set_param_groups(&GROUPS).unwrap();
            opt.set_chunk_len(256);
            for step in 0..6 {
                if step == 3 {
                    // A schedule moves every group's lr with the base lr.
                    opt.set_lr(lr * 0.25);
                    for ((single, _), g) in singles.iter_mut().zip(GROUPS) {
                        single.set_lr(lr * 0.25 * g.lr_scale);
                    }
                }
                let gs: Vec<Vec<f32>> = lens.iter().map(|&n| rng.vec(n, 2.0)).collect();
                pool(2).install(|| opt.step_all(&mut ws, &gs)).unwrap();
                step_each(&mut singles, &gs);
            }
            assert_same_as(&ws, &singles, &format!("{config} decoupled={decoupled}"));
            assert_eq!(opt.param_groups(), &GROUPS);
        }
    }
}

#[test]
fn bad_param_groups_are_refused_and_change_nothing() {
    let mut opt = Adam::new(AdamConfig::default());
    let bad = [
        (
            ParamGroup {
                lr_scale: -1.0,
                ..Default::default()
            },
            "lr_scale",
        ),
        (
            ParamGroup {
                lr_scale: f32::NAN,
                ..Default::default()
            },
            "lr_scale",
        ),
        (
            ParamGroup {
                weight_decay: Some(-0.1),
                ..Default::default()
            },
            "weight_decay",
        ),
        (
            ParamGroup {
                weight_decay: Some(f32::INFINITY),
                ..Default::default()
            },
            "weight_decay",
        ),
    ];
    for (group, field) in bad {
        let err = opt
            .set_param_groups(&[ParamGroup::DEFAULT, group])
            .unwrap_err();
        assert!(
            matches!(err, StepError::InvalidGroup { tensor: 1, field: f, .. } if f == field),
            "{err}"
        );
        assert!(err.to_string().contains("tensor 1") && err.to_string().contains(field));
        assert!(opt.param_groups().is_empty());
    }

    // A step whose tensor count differs from the groups: refused, nothing written.
    opt.set_param_groups(&[ParamGroup::DEFAULT; 2]).unwrap();
    let mut w = [1.0f32; 3];
    let err = opt.step(&mut w, &[1.0; 3]).unwrap_err();
    assert_eq!(
        err,
        StepError::GroupCount {
            groups: 2,
            tensors: 1
        }
    );
    assert_eq!((w, opt.steps(), opt.layout()), ([1.0; 3], 0, None));

    // Once the layout is fixed, groups for another tensor count are refused at once.
    opt.set_param_groups(&[]).unwrap();
    opt.step(&mut w, &[1.0; 3]).unwrap();
    let err = opt.set_param_groups(&[ParamGroup::DEFAULT; 2]).unwrap_err();
    assert_eq!(
        err,
        StepError::GroupCount {
            groups: 2,
            tensors: 1
        }
    );
    assert!(opt.param_groups().is_empty());

    // lr·lr_scale overflowing to infinity is refused by the step, which changes nothing.
    opt.set_param_groups(&[ParamGroup {
        lr_scale: f32::MAX,
        ..Default::default()
    }])
    .unwrap();
    opt.set_lr(10.0);
    let before = w;
    let err = opt.step(&mut w, &[1.0; 3]).unwrap_err();
    assert!(
        matches!(
            err,
            StepError::InvalidGroup {
                field: "lr_scale",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!((w, opt.steps()), (before, 1));

    // reset keeps the groups: they are settings, not state.
    opt.reset();
    assert_eq!(opt.param_groups().len(), 1);
}

#[test]
fn zero_weight_decay_adds_nothing_not_even_to_infinite_weights() {
    for config in configs() {
        let mut opt = with(config, "weight_decay=0").build();
        let mut w = [f32::INFINITY, f32::NEG_INFINITY, 1.0];
        opt.step(&mut w, &[0.0, 0.0, 0.0]).unwrap();
        assert_eq!(w, [f32::INFINITY, f32::NEG_INFINITY, 1.0], "{config}");
    }
}

#[test]
fn maximize_ascends() {
    for config in configs() {
        // Maximise −½‖w‖²: its gradient is −w, and maximize must move w towards 0.
        let mut opt = with(config, "maximize=true").build();
        let mut w = vec![1.0f32; 8];
        for _ in 0..50 {
            let g: Vec<f32> = w.iter().map(|&x| -x).collect();
            opt.step(&mut w, &g).unwrap();
        }
        assert!(w.iter().all(|&x| x.abs() < 1.0), "{config}: {w:?}");
    }
}

#[test]
fn amsgrad_switched_on_later_starts_its_maximum_from_zero() {
    let mut opt = Adam::new(AdamConfig::default());
    let mut r = Reference::<f32>::new(OptimizerConfig::Adam(AdamConfig::default()), N);
    let mut rng = Rng(9);
    let w0 = rng.vec(N, 1.0);
    let (mut w, mut wr) = (w0.clone(), w0);
    for step in 0..10 {
        if step == 4 {
            opt.config_mut().amsgrad = true;
            if let OptimizerConfig::Adam(c) = &mut r.config {
                c.amsgrad = true;
            }
        }
        let g = grads(&mut rng, N, step);
        opt.step(&mut w, &g).unwrap();
        r.step(&mut wr, &g);
    }
    assert_eq!(opt.state_buffers(), 3);
    assert_same(&w, &wr, "amsgrad from step 5");
}

#[test]
fn many_distinct_groups_match_one_optimizer_per_tensor() {
    // More distinct groups than a step keeps in place (32): the kernels then live on the heap.
    for tensors in [3usize, 32, 33, 40] {
        for config in configs() {
            let config = with(config, "weight_decay=0.01");
            let groups: Vec<ParamGroup> = (0..tensors)
                .map(|i| ParamGroup {
                    lr_scale: 1.0 + i as f32 / 8.0,
                    weight_decay: (i % 3 == 0).then_some(0.02 * i as f32),
                })
                .collect();
            let mut rng = Rng(4);
            let mut ws: Vec<Vec<f32>> = (0..tensors).map(|i| rng.vec(5 + i, 1.0)).collect();
            let mut singles = one_per_tensor(config, &ws, &groups);
            let mut opt = config.build();
            opt.set_param_groups(&groups).unwrap();
            for _ in 0..3 {
                let gs: Vec<Vec<f32>> = ws.iter().map(|w| rng.vec(w.len(), 2.0)).collect();
                opt.step_all(&mut ws, &gs).unwrap();
                step_each(&mut singles, &gs);
            }
            assert_same_as(&ws, &singles, &format!("{config}, {tensors} groups"));
        }
    }
}

/// Under a changing learning rate the buffer form applies each step's `lr` to the whole buffer
/// (torch's SGD), the velocity form only to the new gradient: both match their references on
/// every tier, and they differ from each other.
#[test]
fn momentum_forms_follow_their_formulas_under_a_changing_lr() {
    for name in ["momentum", "nag"] {
        let mut finals = Vec::new();
        for form in ["velocity", "buffer"] {
            let config = with(
                unusual(OptimizerConfig::default_for(name).unwrap()),
                &format!("form={form}"),
            );
            for backend in [Backend::Scalar]
                .into_iter()
                .chain(SimdLevel::available().map(Backend::Level))
            {
                let mut rng = Rng(5);
                let mut w = rng.vec(N, 1.0);
                let mut w32 = w.clone();
                let mut opt = config.build();
                opt.set_backend(backend);
                let mut reference = Reference::<f32>::new(config, N);
                for step in 0..STEPS {
                    let lr = 0.05 * 0.8f32.powi(step as i32);
                    opt.set_lr(lr);
                    reference.config = with(config, &format!("lr={lr}"));
                    let g = grads(&mut rng, N, step);
                    opt.step(&mut w, &g).unwrap();
                    reference.step(&mut w32, &g);
                    assert_same(&w, &w32, &format!("{name} {form} {backend:?} step {step}"));
                }
                finals.push(w);
            }
        }
        assert_ne!(
            finals.first(),
            finals.last(),
            "{name}: the two forms should differ"
        );
    }
}
