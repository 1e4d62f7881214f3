//! PyTorch parity: every case of `tests/parity/torch_vectors.txt` (computed by torch.optim itself,
//! see `tests/parity/gen_torch.py`) replayed with fusedopt.
//!
//! The weights after step 1 and after step 20 must match torch's within
//! `|a − b| / (|b| + 0.01) ≤ 5e-5`. Initial weights and gradients come from the splitmix64 stream
//! that the generator uses, so both sides start from and see the same exact f32 values.

use crate::common::Rng;
use fusedopt::*;
use std::collections::BTreeMap;

const VECTORS: &str = include_str!("parity/torch_vectors.txt");
const TOL: f64 = 5e-5;

#[derive(Debug, Default, Clone)]
struct Case {
    name: String,
    seed: u64,
    kind: String,
    config: BTreeMap<String, String>,
    steps: u64,
    /// (length, group) per tensor.
    tensors: Vec<(usize, ParamGroup)>,
    /// (step, tensor) → torch's weights.
    after: BTreeMap<(u64, usize), Vec<f32>>,
}

fn parse() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut case = Case::default();
    for line in VECTORS.lines().filter(|l| !l.starts_with('#')) {
        let mut it = line.split_whitespace();
        let Some(tag) = it.next() else { continue };
        let rest: Vec<&str> = it.collect();
        match tag {
            "case" => {
                case = Case {
                    name: rest[0].to_string(),
                    seed: rest[1].parse().unwrap(),
                    ..Default::default()
                }
            }
            "torch" => {}
            "fusedopt" => {
                case.kind = rest[0].to_string();
                for kv in &rest[1..] {
                    let (k, v) = kv.split_once('=').unwrap();
                    case.config.insert(k.to_string(), v.to_string());
                }
            }
            "steps" => case.steps = rest[0].parse().unwrap(),
            "tensor" => case.tensors.push((
                rest[0].parse().unwrap(),
                ParamGroup {
                    lr_scale: rest[1].parse().unwrap(),
                    weight_decay: (rest[2] != "-").then(|| rest[2].parse().unwrap()),
                },
            )),
            "after" => {
                let values = rest[2..].iter().map(|x| x.parse().unwrap()).collect();
                case.after
                    .insert((rest[0].parse().unwrap(), rest[1].parse().unwrap()), values);
            }
            "end" => cases.push(std::mem::take(&mut case)),
            other => panic!("unknown line tag {other:?}"),
        }
    }
    cases
}

/// The fusedopt optimizer a case's `fusedopt` line describes: its name and `field=value` pairs
/// are a configuration string.
fn build(case: &Case) -> Box<dyn Optimizer> {
    let fields: Vec<String> = case
        .config
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let config: OptimizerConfig = format!("{}:{}", case.kind, fields.join(","))
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    config.build()
}

/// The gradients of step `step`, drawn exactly as the generator draws them.
fn grads(rng: &mut Rng, n: usize, step: u64) -> Vec<f32> {
    let scales = [1e-3f32, 1e-1, 1.0, 10.0];
    let shrink = [1.0f32, 0.25, 0.0625][(step % 3) as usize];
    (0..n)
        .map(|j| {
            let g = rng.uniform() * scales[j % 4] * shrink;
            if j % 13 == 5 { 0.0 } else { g }
        })
        .collect()
}

/// Replays `case` on `backend` and returns the worst relative error over its recorded steps, or
/// the first element out of tolerance.
fn replay(case: &Case, backend: Backend) -> Result<f64, String> {
    let mut opt = build(case);
    opt.set_backend(backend);
    let groups: Vec<ParamGroup> = case.tensors.iter().map(|t| t.1).collect();
    if groups.iter().any(|g| *g != ParamGroup::DEFAULT) {
        opt.set_param_groups(&groups).unwrap();
    }
    let mut rng = Rng(case.seed);
    let mut ws: Vec<Vec<f32>> = case
        .tensors
        .iter()
        .map(|&(n, _)| (0..n).map(|_| rng.uniform() * 2.0).collect())
        .collect();
    let mut worst = 0f64;
    for step in 1..=case.steps {
        let gs: Vec<Vec<f32>> = case
            .tensors
            .iter()
            .map(|&(n, _)| grads(&mut rng, n, step))
            .collect();
        opt.step_all(&mut ws, &gs).unwrap();
        for (t, w) in ws.iter().enumerate() {
            let Some(expected) = case.after.get(&(step, t)) else {
                continue;
            };
            assert_eq!(expected.len(), w.len(), "{}: tensor {t}", case.name);
            for (i, (&a, &b)) in w.iter().zip(expected).enumerate() {
                let err = (a as f64 - b as f64).abs() / (b.abs() as f64 + 0.01);
                if err.is_nan() || err > TOL {
                    return Err(format!(
                        "{}: step {step}, tensor {t}, element {i}: fusedopt {a:e} vs torch {b:e} \
                         (relative error {err:.2e})",
                        case.name
                    ));
                }
                worst = worst.max(err);
            }
        }
    }
    Ok(worst)
}

#[test]
fn matches_torch_optim() {
    let cases = parse();
    assert_eq!(cases.len(), 39, "cases in the vector file");
    let mut worst: BTreeMap<String, (f64, String)> = BTreeMap::new();
    for case in &cases {
        assert_eq!(case.after.len(), 2 * case.tensors.len(), "{}", case.name);
        if case.kind == "adam" {
            // torch adds ε to the bias-corrected √v̂.
            assert_eq!(case.config["eps_mode"], "pytorch", "{}", case.name);
        }
        let err = replay(case, Backend::Simd).unwrap_or_else(|e| panic!("{e}"));
        // The scalar reference kernel computes the same bits.
        assert_eq!(Ok(err), replay(case, Backend::Scalar), "{}", case.name);
        let family = case.name.split("_wd").next().unwrap();
        let entry = worst.entry(family.split("_groups").next().unwrap().to_string());
        let e = entry.or_insert((0.0, String::new()));
        if err >= e.0 {
            *e = (err, case.name.clone());
        }
    }
    for (family, (err, case)) in &worst {
        println!("{family:>13}: worst relative error {err:.2e} ({case})");
    }
    let families: Vec<&str> = worst.keys().map(String::as_str).collect();
    assert_eq!(
        families,
        [
            "adagrad",
            "adam",
            "adamw",
            "rmsprop",
            "sgd",
            "sgd_momentum",
            "sgd_nesterov"
        ]
    );
}

/// The vectors are sensitive enough to catch a wrong option: a missing weight-decay term, an
/// ignored `maximize`, AMSGrad or decoupling off, or ε added to the uncorrected `√v` all exceed
/// the tolerance.
#[test]
fn wrong_settings_fail_the_comparison() {
    let cases = parse();
    let find = |name: &str| cases.iter().find(|c| c.name == name).unwrap();
    let mutate = |name: &str, key: &str, value: &str| {
        let mut case = find(name).clone();
        case.config.insert(key.to_string(), value.to_string());
        replay(&case, Backend::Simd).is_err()
    };
    assert!(mutate("sgd_momentum_wd0.05_max0", "weight_decay", "0"));
    assert!(mutate("rmsprop_wd0.0_max1", "maximize", "false"));
    assert!(mutate("adam_wd0.0_max0_ams1", "amsgrad", "false"));
    assert!(mutate(
        "adamw_wd0.05_max0_ams0",
        "decoupled_weight_decay",
        "false"
    ));
    assert!(mutate("adam_wd0.0_max0_ams0", "eps_mode", "sqrt_v"));
}
