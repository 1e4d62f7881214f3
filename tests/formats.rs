//! Compact state formats (bf16 with stochastic rounding, 8-bit block-wise): bitwise identical
//! across tiers, thread counts, chunk lengths and the ways a step is fed; close to `f32` state;
//! and their special cases (format changes, non-finite blocks).

use crate::common::*;
use fusedopt::*;

const LENS: [usize; 7] = [5, 0, 1031, 17, 70_000, 256, 257];
const COMPACT: [StateFormat; 2] = [StateFormat::Bf16, StateFormat::Q8];

/// Every stateful optimizer with options (SGD keeps no state; LARS with momentum), and Adam with AMSGrad.
fn variants() -> Vec<OptimizerConfig> {
    let mut v: Vec<OptimizerConfig> = configs()
        .into_iter()
        .map(|c| with(unusual(c), "weight_decay=0.01"))
        .filter(|c| !stateless(c))
        .collect();
    v.push("adamw:amsgrad=true,lr=0.01".parse().unwrap());
    v.push("momentum:form=buffer,lr=0.05".parse().unwrap());
    v
}

fn model(seed: u64) -> (Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>) {
    let mut rng = Rng(seed);
    let w: Vec<Vec<f32>> = LENS.iter().map(|&n| rng.vec(n, 1.0)).collect();
    let grads = (0..5)
        .map(|_| LENS.iter().map(|&n| rng.vec(n, 2.0)).collect())
        .collect();
    (w, grads)
}

fn build(config: OptimizerConfig, format: StateFormat) -> Box<dyn Optimizer> {
    let mut opt = config.build();
    opt.set_state_format(format).unwrap();
    opt
}

fn bits(ws: &[Vec<f32>]) -> Vec<Vec<u32>> {
    ws.iter()
        .map(|w| w.iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// The reference run: scalar kernels, one chunk, one thread, `step_all`.
fn baseline(config: OptimizerConfig, format: StateFormat) -> Vec<Vec<f32>> {
    let (mut w, grads) = model(1);
    let mut opt = build(config, format);
    opt.set_backend(Backend::Scalar);
    opt.set_chunk_len(usize::MAX);
    pool(1).install(|| {
        for g in &grads {
            opt.step_all(&mut w, g).unwrap();
        }
    });
    w
}

#[test]
fn compact_state_is_bitwise_identical_across_tiers_threads_chunks_and_feeds() {
    for config in variants() {
        for format in COMPACT {
            let expected = bits(&baseline(config, format));
            let mut backends = vec![Backend::Simd];
            backends.extend(SimdLevel::available().map(Backend::Level));
            for backend in backends {
                for (threads, chunk) in [(1, 0), (2, 256), (3, 512), (2, 1000), (3, 0)] {
                    let what =
                        format!("{config} {format} {backend:?} threads={threads} chunk={chunk}");
                    let (w0, grads) = model(1);
                    let mut opt = build(config, format);
                    opt.set_backend(backend);
                    opt.set_chunk_len(chunk);
                    let mut w = w0.clone();
                    pool(threads).install(|| {
                        for g in &grads {
                            opt.step_all(&mut w, g).unwrap();
                        }
                    });
                    assert_eq!(bits(&w), expected, "step_all {what}");
                    // The same through step_feed, one tensor at a time.
                    let mut fed = build(config, format);
                    fed.set_backend(backend);
                    fed.set_chunk_len(chunk);
                    let mut locked = Locked::new(&w0, &[]);
                    pool(threads).install(|| {
                        for g in &grads {
                            locked.grads = g.iter().cloned().map(Some).collect();
                            fed.step_feed(&locked).unwrap();
                        }
                    });
                    assert_eq!(bits(&locked.weights()), expected, "step_feed {what}");
                }
            }
        }
    }
}

#[test]
fn compact_state_follows_f32_state_closely() {
    // Relative to the weights' movement: 5 steps from the same start.
    for config in variants() {
        let (w0, _) = model(1);
        let exact = baseline(config, StateFormat::F32);
        // Lion moves every weight by ±lr by the sign of a momentum mix: where that mix is near
        // 0, a rounded state flips a whole step, so its bound is wider.
        let widen = if config.name() == "lion" { 2.5 } else { 1.0 };
        for (format, tol) in [(StateFormat::Bf16, 0.02), (StateFormat::Q8, 0.08)] {
            let tol = tol * widen;
            let got = baseline(config, format);
            let (mut err, mut moved) = (0f64, 0f64);
            for ((a, b), w) in got.iter().zip(&exact).zip(&w0) {
                for ((&a, &b), &w) in a.iter().zip(b).zip(w) {
                    err += f64::from(a - b).powi(2);
                    moved += f64::from(b - w).powi(2);
                }
            }
            let rel = (err / moved).sqrt();
            assert!(rel < tol, "{config} {format}: {rel:.4} of the movement");
        }
    }
}

#[test]
fn state_bytes_follow_the_format() {
    for (format, per) in [
        (StateFormat::F32, 4.0),
        (StateFormat::Bf16, 2.0),
        (StateFormat::Q8, 1.0 + 4.0 / 256.0),
    ] {
        let mut opt = build("adam".parse().unwrap(), format);
        let n = 1 << 16;
        opt.step(&mut vec![0.0; n], &vec![1.0; n]).unwrap();
        assert_eq!(
            opt.state_bytes(),
            (2.0 * per * n as f64) as usize,
            "{format}"
        );
        assert_eq!(
            opt.tensor_state("m", 0).is_some(),
            format == StateFormat::F32
        );
    }
}

#[test]
fn the_format_is_fixed_once_there_is_state() {
    let mut opt = build("adam".parse().unwrap(), StateFormat::Bf16);
    assert_eq!(opt.state_format(), StateFormat::Bf16);
    opt.set_state_format(StateFormat::Q8).unwrap(); // no state yet: fine
    opt.step(&mut [1.0; 3], &[1.0; 3]).unwrap();
    assert_eq!(
        opt.set_state_format(StateFormat::F32),
        Err(StepError::StateFormat {
            held: StateFormat::Q8,
            requested: StateFormat::F32
        })
    );
    opt.set_state_format(StateFormat::Q8).unwrap(); // the same: fine
    opt.reset();
    opt.set_state_format(StateFormat::F32).unwrap();
    opt.step(&mut [1.0; 3], &[1.0; 3]).unwrap();
    assert!(opt.tensor_state("v", 0).is_some());
    // SGD keeps no state: any format, any time.
    let mut sgd = build("sgd".parse().unwrap(), StateFormat::Q8);
    sgd.step(&mut [1.0; 3], &[1.0; 3]).unwrap();
    sgd.set_state_format(StateFormat::Bf16).unwrap();
    sgd.step(&mut [1.0; 3], &[1.0; 3]).unwrap();
}

#[test]
fn a_non_finite_value_poisons_its_8_bit_block_only() {
    let mut opt = build("adam".parse().unwrap(), StateFormat::Q8);
    let mut w = vec![1.0f32; 1024];
    let mut g = vec![0.5f32; 1024];
    g[300] = f32::NAN; // block 1 (elements 256..512)
    opt.step(&mut w, &g).unwrap();
    assert!(w[300].is_nan());
    g[300] = 0.5;
    opt.step(&mut w, &g).unwrap();
    for (i, x) in w.iter().enumerate() {
        assert_eq!(x.is_nan(), (256..512).contains(&i), "element {i}: {x}");
    }
    // bf16 state keeps a NaN to its element.
    let mut opt = build("adam".parse().unwrap(), StateFormat::Bf16);
    let mut w = vec![1.0f32; 1024];
    g[300] = f32::NAN;
    opt.step(&mut w, &g).unwrap();
    g[300] = 0.5;
    opt.step(&mut w, &g).unwrap();
    assert!(w.iter().enumerate().all(|(i, x)| x.is_nan() == (i == 300)));
}

#[test]
fn compact_state_trains_a_quadratic_like_f32() {
    // Adam on f(w) = sum c_i (w_i - t_i)^2 with spread curvatures: the loss falls as with f32.
    let n = 4096;
    let mut rng = Rng(5);
    let c: Vec<f32> = (0..n).map(|i| 0.1 + (i % 97) as f32 / 10.0).collect();
    let t = rng.vec(n, 1.0);
    let loss = |w: &[f32]| -> f64 {
        w.iter()
            .zip(&t)
            .zip(&c)
            .map(|((&w, &t), &c)| f64::from(c) * f64::from(w - t).powi(2))
            .sum()
    };
    let mut finals = vec![];
    for format in [StateFormat::F32, StateFormat::Bf16, StateFormat::Q8] {
        let mut opt = build("adam:lr=0.01".parse().unwrap(), format);
        let mut w = vec![0.0f32; n];
        for _ in 0..400 {
            let g: Vec<f32> = (0..n).map(|i| 2.0 * c[i] * (w[i] - t[i])).collect();
            opt.step(&mut w, &g).unwrap();
        }
        finals.push(loss(&w));
    }
    let start = loss(&vec![0.0; n]);
    assert!(finals[0] < start * 1e-3, "{finals:?} from {start}");
    for (format, f) in [("bf16", finals[1]), ("q8", finals[2])] {
        assert!(
            f < start * 2e-3,
            "{format}: {f} vs f32 {} from {start}",
            finals[0]
        );
    }
}

#[test]
fn compact_state_files_resume_bitwise_and_refuse_another_format() {
    let dir = std::env::temp_dir();
    for config in variants() {
        for format in COMPACT {
            let path = dir.join(format!(
                "fusedopt-formats-{}-{format}.safetensors",
                std::process::id()
            ));
            let (w0, grads) = model(2);
            let mut whole = build(config, format);
            let mut w_whole = w0.clone();
            for g in &grads {
                whole.step_all(&mut w_whole, g).unwrap();
            }
            let mut first = build(config, format);
            let mut w = w0.clone();
            for g in &grads[..2] {
                first.step_all(&mut w, g).unwrap();
            }
            first.save_state(&path).unwrap();
            // Another format refuses the file and keeps its own (empty) state.
            for other in StateFormat::ALL.into_iter().filter(|&f| f != format) {
                let mut wrong = build(config, other);
                match wrong.load_state(&path) {
                    Err(StateError::StateFormat {
                        expected, found, ..
                    }) => {
                        assert_eq!((expected, found), (other, format));
                    }
                    other => panic!("{config} {format}: {other:?}"),
                }
                assert_eq!((wrong.steps(), wrong.layout()), (0, None));
            }
            let mut second = build(config, format);
            second.load_state(&path).unwrap();
            assert_eq!(second.state_bytes(), first.state_bytes());
            for g in &grads[2..] {
                second.step_all(&mut w, g).unwrap();
            }
            assert_eq!(bits(&w), bits(&w_whole), "{config} {format}");
            // A damaged file is refused.
            let mut bytes = std::fs::read(&path).unwrap();
            let at = bytes.len() - 3;
            bytes[at] ^= 0x40;
            std::fs::write(&path, &bytes).unwrap();
            let mut third = build(config, format);
            assert!(matches!(
                third.load_state(&path),
                Err(StateError::Checksum { .. })
            ));
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn compact_state_read_and_written_as_f32_resumes_bitwise() {
    for config in variants() {
        for format in StateFormat::ALL {
            let (w0, grads) = model(4);
            let (mut whole, mut first) = (build(config, format), build(config, format));
            let (mut w_whole, mut w) = (w0.clone(), w0.clone());
            for g in &grads {
                whole.step_all(&mut w_whole, g).unwrap();
            }
            for g in &grads[..2] {
                first.step_all(&mut w, g).unwrap();
            }
            let mut second = build(config, format);
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
            for g in &grads[2..] {
                second.step_all(&mut w, g).unwrap();
            }
            assert_eq!(bits(&w), bits(&w_whole), "{config} {format}");
            assert!(
                matches!(
                    second.write_tensor_state("v_max", 0, &[0.0; 5]),
                    Err(StepError::NoState { .. })
                ) || config.name() == "adam"
            );
        }
    }
}
