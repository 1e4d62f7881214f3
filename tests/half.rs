//! Half-precision gradients and master weights: bf16/f16 gradients step bitwise as their `f32`
//! values; bf16/f16 weights are the rounded `f32` master weights of an `f32` run; bitwise the same
//! across tiers, threads and chunk lengths, with hygiene options and compact state.

use crate::common::*;
use fusedopt::half::{bf16, f16};
use fusedopt::*;

const LENS: [usize; 6] = [5, 0, 1031, 17, 40_000, 257];

fn variants() -> Vec<OptimizerConfig> {
    let mut v: Vec<OptimizerConfig> = configs()
        .into_iter()
        .map(|c| with(unusual(c), "weight_decay=0.01"))
        .collect();
    v.push("adamw:amsgrad=true,lr=0.01".parse().unwrap());
    v
}

/// A way to set an optimizer up.
type Setup = fn(&mut dyn Optimizer);

/// Optimizers with the hygiene options on or off.
fn setups() -> Vec<(&'static str, Setup)> {
    vec![
        ("plain", |_| {}),
        ("scale+clip+skip", |o| {
            o.set_grad_scale(3.0).unwrap();
            o.set_max_grad_norm(Some(5.0)).unwrap();
            o.set_non_finite(NonFinite::Skip);
        }),
        ("groups", |o| {
            o.set_param_groups(&[
                GROUPS[0], GROUPS[1], GROUPS[2], GROUPS[3], GROUPS[0], GROUPS[2],
            ])
            .unwrap();
        }),
    ]
}

fn data(seed: u64) -> (Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>) {
    let mut rng = Rng(seed);
    let w = LENS.iter().map(|&n| rng.vec(n, 1.0)).collect();
    let g = (0..4)
        .map(|_| LENS.iter().map(|&n| rng.vec(n, 2.0)).collect())
        .collect();
    (w, g)
}

fn to<T>(x: &[Vec<f32>], f: impl Fn(f32) -> T) -> Vec<Vec<T>> {
    x.iter()
        .map(|v| v.iter().map(|&a| f(a)).collect())
        .collect()
}

fn bits32(x: &[Vec<f32>]) -> Vec<Vec<u32>> {
    to(x, f32::to_bits)
}

#[test]
fn half_gradients_step_bitwise_as_their_f32_values() {
    for config in variants() {
        for (what, setup) in setups() {
            let (w0, grads) = data(1);
            // The reference: f32 gradients holding the half values.
            let as_bf16: Vec<Vec<Vec<f32>>> = grads
                .iter()
                .map(|g| to(g, |x| bf16::from_f32(x).to_f32()))
                .collect();
            let as_f16: Vec<Vec<Vec<f32>>> = grads
                .iter()
                .map(|g| to(g, |x| f16::from_f32(x).to_f32()))
                .collect();
            for (kind, reference) in [("bf16", &as_bf16), ("f16", &as_f16)] {
                let mut expected = w0.clone();
                let mut opt = config.build();
                setup(opt.as_mut());
                let mut norms = vec![];
                for g in reference {
                    norms.push(
                        opt.step_all(&mut expected, g)
                            .unwrap()
                            .grad_norm
                            .map(f32::to_bits),
                    );
                }
                let mut backends = vec![Backend::Scalar];
                backends.extend(SimdLevel::available().map(Backend::Level));
                for backend in backends {
                    for (threads, chunk) in [(1, 0), (2, 1000), (3, 256)] {
                        let mut w = w0.clone();
                        let mut opt = config.build();
                        setup(opt.as_mut());
                        opt.set_backend(backend);
                        opt.set_chunk_len(chunk);
                        let mut got_norms = vec![];
                        pool(threads).install(|| {
                            for g in &grads {
                                let report = if kind == "bf16" {
                                    opt.step_all_typed(&mut w, &to(g, bf16::from_f32))
                                } else {
                                    opt.step_all_typed(&mut w, &to(g, f16::from_f32))
                                };
                                got_norms.push(report.unwrap().grad_norm.map(f32::to_bits));
                            }
                        });
                        let label = format!("{config} {what} {kind} {backend:?} {threads} {chunk}");
                        assert_eq!(bits32(&w), bits32(&expected), "{label}");
                        assert_eq!(got_norms, norms, "{label}");
                    }
                }
            }
        }
    }
}

#[test]
fn half_weights_are_the_rounded_master_weights_of_an_f32_run() {
    for config in variants() {
        for format in StateFormat::ALL {
            let (w0, grads) = data(2);
            // The master weights start as the bf16 weights' values.
            let start: Vec<Vec<bf16>> = to(&w0, bf16::from_f32);
            let mut master: Vec<Vec<f32>> = to(&w0, |x| bf16::from_f32(x).to_f32());
            let mut reference = config.build();
            reference.set_state_format(format).unwrap();
            for g in &grads {
                reference.step_all(&mut master, g).unwrap();
            }
            let expected: Vec<Vec<u16>> = to(&master, |x| bf16::from_f32(x).to_bits());
            let mut backends = vec![Backend::Scalar];
            backends.extend(SimdLevel::available().map(Backend::Level));
            for backend in backends {
                for (threads, chunk) in [(1, 0), (2, 512), (3, 256)] {
                    let mut w = start.clone();
                    let mut opt = config.build();
                    opt.set_state_format(format).unwrap();
                    opt.set_backend(backend);
                    opt.set_chunk_len(chunk);
                    pool(threads).install(|| {
                        for g in &grads {
                            opt.step_all_typed(&mut w, g).unwrap();
                        }
                    });
                    let got: Vec<Vec<u16>> = w
                        .iter()
                        .map(|v| v.iter().map(|x| x.to_bits()).collect())
                        .collect();
                    assert_eq!(
                        got, expected,
                        "{config} {format} {backend:?} {threads} {chunk}"
                    );
                }
            }
        }
    }
}

#[test]
fn f16_weights_and_gradients_with_8_bit_state_train() {
    // A least-squares fit with f16 weights and gradients, 8-bit Adam state: the loss falls.
    let (n, m) = (64usize, 256usize);
    let mut rng = Rng(7);
    let x = rng.vec(n * m, 1.0);
    let target = rng.vec(n, 1.0);
    let y: Vec<f32> = (0..m)
        .map(|j| (0..n).map(|i| x[j * n + i] * target[i]).sum())
        .collect();
    let mut w = vec![f16::ZERO; n];
    let mut opt = "adam:lr=0.01".parse::<OptimizerConfig>().unwrap().build();
    opt.set_state_format(StateFormat::Q8).unwrap();
    let loss = |w: &[f16]| -> f32 {
        (0..m)
            .map(|j| {
                let p: f32 = (0..n).map(|i| x[j * n + i] * w[i].to_f32()).sum();
                (p - y[j]).powi(2)
            })
            .sum::<f32>()
            / m as f32
    };
    let first = loss(&w);
    for _ in 0..300 {
        let mut g = vec![0f32; n];
        for j in 0..m {
            let p: f32 = (0..n).map(|i| x[j * n + i] * w[i].to_f32()).sum();
            for i in 0..n {
                g[i] += 2.0 * (p - y[j]) * x[j * n + i] / m as f32;
            }
        }
        let g: Vec<f16> = g.into_iter().map(f16::from_f32).collect();
        opt.step_typed(&mut w, &g).unwrap();
    }
    assert!(loss(&w) < first * 0.01, "{} from {first}", loss(&w));
}

#[test]
fn non_finite_half_gradients_follow_the_policy() {
    let mut opt = "adam:lr=0.1".parse::<OptimizerConfig>().unwrap().build();
    opt.set_non_finite(NonFinite::Skip);
    let mut w = vec![bf16::ONE; 4];
    let report = opt
        .step_typed(&mut w, &[bf16::ONE, bf16::NAN, bf16::ONE, bf16::ONE])
        .unwrap();
    assert!(report.skipped && w == [bf16::ONE; 4] && opt.steps() == 0);
    opt.set_non_finite(NonFinite::Error);
    assert!(opt.step_typed(&mut w, &[f16::INFINITY; 4]).is_err());
    assert_eq!(w, [bf16::ONE; 4]);
    // A length mismatch is refused before the master weights are taken.
    assert!(opt.step_typed(&mut w, &[f16::ONE; 3]).is_err());
    opt.step_typed(&mut w, &[f16::ONE; 4]).unwrap();
    assert!(w.iter().all(|x| x.to_f32() < 1.0));
}

#[test]
fn master_weights_survive_a_state_file() {
    let dir = std::env::temp_dir();
    for config in variants() {
        for format in StateFormat::ALL {
            let path = dir.join(format!(
                "fusedopt-half-{}-{format}.safetensors",
                std::process::id()
            ));
            let (w0, grads) = data(3);
            let start: Vec<Vec<f16>> = to(&w0, f16::from_f32);
            let mut whole = config.build();
            whole.set_state_format(format).unwrap();
            let mut w_whole = start.clone();
            for g in &grads {
                whole
                    .step_all_typed(&mut w_whole, &to(g, bf16::from_f32))
                    .unwrap();
            }
            let mut first = config.build();
            first.set_state_format(format).unwrap();
            let mut w = start.clone();
            for g in &grads[..2] {
                first
                    .step_all_typed(&mut w, &to(g, bf16::from_f32))
                    .unwrap();
            }
            first.save_state(&path).unwrap();
            let mut second = config.build();
            second.set_state_format(format).unwrap();
            second.load_state(&path).unwrap();
            for g in &grads[2..] {
                second
                    .step_all_typed(&mut w, &to(g, bf16::from_f32))
                    .unwrap();
            }
            assert_eq!(w, w_whole, "{config} {format}");
            std::fs::remove_file(&path).unwrap();
        }
    }
}

/// Every state buffer and the master weights, copied out as `f32` and into a fresh optimizer
/// (what a framework's state dict does), resume bitwise; a write of the wrong length is refused.
#[test]
fn master_weights_read_and_written_as_f32_resume_bitwise() {
    for config in variants() {
        for format in StateFormat::ALL {
            let (w0, grads) = data(4);
            let start: Vec<Vec<bf16>> = to(&w0, bf16::from_f32);
            let build = || {
                let mut o = config.build();
                o.set_state_format(format).unwrap();
                o
            };
            let (mut whole, mut first) = (build(), build());
            let (mut w_whole, mut w) = (start.clone(), start.clone());
            for g in &grads {
                whole
                    .step_all_typed(&mut w_whole, &to(g, bf16::from_f32))
                    .unwrap();
            }
            for g in &grads[..2] {
                first
                    .step_all_typed(&mut w, &to(g, bf16::from_f32))
                    .unwrap();
            }
            assert_eq!(first.state_names().last(), Some(&"master"), "{config}");
            let mut second = build();
            second.init_state(&LENS).unwrap();
            for name in first.state_names() {
                for t in 0..LENS.len() {
                    let values = first.read_tensor_state(name, t).unwrap();
                    second.write_tensor_state(name, t, &values).unwrap();
                }
            }
            second.set_tensor_steps(first.tensor_steps()).unwrap();
            let sums: Vec<f64> = first.scalar_state().iter().map(|s| s.1).collect();
            second.set_scalar_state(&sums).unwrap();
            // The trainer's weights no longer say what the master weights are: the copied
            // master weights must be what continues.
            let mut w_rounded = w.clone();
            for g in &grads[2..] {
                second
                    .step_all_typed(&mut w_rounded, &to(g, bf16::from_f32))
                    .unwrap();
            }
            assert_eq!(w_rounded, w_whole, "{config} {format}");
            assert_eq!(
                second.read_tensor_state("master", 2),
                whole.read_tensor_state("master", 2),
                "{config} {format}"
            );
            assert!(matches!(
                second.write_tensor_state("master", 0, &[0.0; 4]),
                Err(StepError::TensorLen { .. })
            ));
        }
    }
}

#[test]
fn a_tensor_back_on_half_weights_takes_its_master_weights_afresh() {
    let (w0, grads) = data(5);
    let config: OptimizerConfig = "adam:lr=0.01".parse().unwrap();
    let widen = |w: &[Vec<bf16>]| -> Vec<Vec<f32>> {
        w.iter()
            .map(|v| v.iter().map(|x| x.to_f32()).collect())
            .collect()
    };
    // bf16 weights, then one step on f32 weights (their values), then bf16 again.
    let run = |write_master: bool| -> Vec<Vec<u16>> {
        let mut opt = config.build();
        let mut w: Vec<Vec<bf16>> = to(&w0, bf16::from_f32);
        opt.step_all_typed(&mut w, &grads[0]).unwrap();
        let mut wide = widen(&w);
        opt.step_all(&mut wide, &grads[1]).unwrap();
        let mut w: Vec<Vec<bf16>> = to(&wide, bf16::from_f32);
        if write_master {
            // What the switch back must do: master weights from the weights now.
            for (t, v) in widen(&w).iter().enumerate() {
                opt.write_tensor_state("master", t, v).unwrap();
            }
        }
        for g in &grads[2..] {
            opt.step_all_typed(&mut w, g).unwrap();
        }
        w.iter()
            .map(|v| v.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    assert_eq!(run(false), run(true));
}
