//! `fusedopt::candle` (feature `candle`): against candle-nn's own optimizers, missing gradients,
//! many Vars, state files across restarts with the Vars in another order, and refusals.
#![cfg(feature = "candle")]

use crate::common::Rng;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer as _, ParamsAdamW, VarBuilder, VarMap};
use fusedopt::candle::{AdamW, Sgd, VarOptimizer};
use fusedopt::{AdamConfig, MomentumConfig, Optimizer as _, OptimizerExt as _, StateError};

type Result<T> = candle_core::Result<T>;

const SHAPES: [&[usize]; 4] = [&[64], &[32, 16], &[7], &[3, 5, 2]];

fn var(rng: &mut Rng, shape: &[usize]) -> Result<Var> {
    let n: usize = shape.iter().product();
    Var::from_tensor(&Tensor::from_vec(rng.vec(n, 1.0), shape, &Device::Cpu)?)
}

fn values(v: &Var) -> Result<Vec<f32>> {
    v.as_tensor().flatten_all()?.to_vec1()
}

/// Vars of `SHAPES` with random values, and an independent copy of them.
fn twins(rng: &mut Rng) -> Result<(Vec<Var>, Vec<Var>)> {
    let ours: Vec<Var> = SHAPES.iter().map(|s| var(rng, s)).collect::<Result<_>>()?;
    let theirs = ours
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
        .collect::<Result<_>>()?;
    Ok((ours, theirs))
}

/// A gradient store holding `grads[i]` for `vars[i]` where present.
fn store(vars: &[Var], grads: &[Option<Tensor>]) -> GradStore {
    let mut store = GradStore::default();
    for (v, g) in vars.iter().zip(grads) {
        if let Some(g) = g {
            store.insert(v.as_tensor(), g.clone());
        }
    }
    store
}

fn random_grads(rng: &mut Rng, scale: f32) -> Result<Vec<Option<Tensor>>> {
    SHAPES
        .iter()
        .map(|s| {
            let n: usize = s.iter().product();
            Ok(Some(Tensor::from_vec(rng.vec(n, scale), *s, &Device::Cpu)?))
        })
        .collect()
}

/// The largest difference between `a` and `b` relative to the tensor's scale:
/// max |a − b| / max |b|, over the tensors. (Element-wise relative differences mean little for
/// values near zero: both sides round each operation to f32 in their own order, so they differ
/// by an ulp or two of the tensor's values, not of a value near zero.)
fn worst(a: &[Var], b: &[Var]) -> Result<f64> {
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (values(x)?, values(y)?);
        let scale = y.iter().fold(0f64, |m, &q| m.max(q.abs() as f64));
        let diff = x
            .iter()
            .zip(&y)
            .fold(0f64, |m, (&p, &q)| m.max((p as f64 - q as f64).abs()));
        worst = worst.max(diff / scale);
    }
    Ok(worst)
}

#[test]
fn adamw_follows_candle_nn_for_300_steps() -> Result<()> {
    for params in [
        ParamsAdamW::default(),
        ParamsAdamW {
            lr: 0.01,
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-6,
            weight_decay: 0.1,
        },
    ] {
        let mut rng = Rng(1);
        let (ours, theirs) = twins(&mut rng)?;
        let mut a = AdamW::new(ours.clone(), params.clone())?;
        let mut b = candle_nn::AdamW::new(theirs.clone(), params.clone())?;
        for _ in 0..300 {
            let grads = random_grads(&mut rng, 2.0)?;
            a.step(&store(&ours, &grads))?;
            b.step(&store(&theirs, &grads))?;
        }
        let err = worst(&ours, &theirs)?;
        println!(
            "AdamW {params:?}: worst relative difference from candle-nn after 300 steps {err:.2e}"
        );
        assert!(err <= 1e-6, "{err:e}");
    }
    Ok(())
}

#[test]
fn sgd_follows_candle_nn() -> Result<()> {
    let mut rng = Rng(2);
    let (ours, theirs) = twins(&mut rng)?;
    let mut a = Sgd::new(ours.clone(), 0.05)?;
    let mut b = candle_nn::SGD::new(theirs.clone(), 0.05)?;
    for _ in 0..100 {
        let grads = random_grads(&mut rng, 1.0)?;
        a.step(&store(&ours, &grads))?;
        b.step(&store(&theirs, &grads))?;
    }
    let err = worst(&ours, &theirs)?;
    println!("SGD: worst relative difference from candle-nn after 100 steps {err:.2e}");
    assert!(err <= 1e-6, "{err:e}");
    assert_eq!(a.learning_rate(), 0.05);
    a.set_learning_rate(0.01);
    assert_eq!(a.learning_rate(), 0.01);
    Ok(())
}

/// A two-layer MLP on a fixed regression task; returns the loss of every step.
fn train(varmap: &VarMap, step: &mut dyn FnMut(&Tensor) -> Result<()>) -> Result<Vec<f32>> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let l1 = candle_nn::linear(8, 32, vb.pp("l1"))?;
    let l2 = candle_nn::linear(32, 1, vb.pp("l2"))?;
    let mut rng = Rng(3);
    let x = Tensor::from_vec(rng.vec(64 * 8, 1.0), (64, 8), &Device::Cpu)?;
    let y = x.sum_keepdim(1)?.sin()?;
    let mut losses = Vec::new();
    for _ in 0..300 {
        use candle_core::Module;
        let pred = l2.forward(&l1.forward(&x)?.relu()?)?;
        let loss = (pred - &y)?.sqr()?.mean_all()?;
        losses.push(loss.to_scalar::<f32>()?);
        step(&loss)?;
    }
    Ok(losses)
}

/// Overwrites every Var of `map` with values drawn from `rng`, scaled by 1/√(fan-in), in the
/// order of their names so that the result does not depend on the map's iteration order.
fn seed_varmap(map: &VarMap, rng: &mut Rng) -> Result<()> {
    let data = map.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let fan_in = *dims.last().unwrap_or(&1) as f32;
        let n: usize = dims.iter().product();
        let values = Tensor::from_vec(rng.vec(n, fan_in.sqrt().recip()), dims, &Device::Cpu)?;
        var.set(&values)?;
    }
    Ok(())
}

/// A VarMap with the same Vars (names and values) as `from`.
fn copy_varmap(from: &VarMap) -> Result<VarMap> {
    let to = VarMap::new();
    {
        let mut data = to.data().lock().unwrap();
        for (name, v) in from.data().lock().unwrap().iter() {
            data.insert(name.clone(), Var::from_tensor(&v.as_tensor().copy()?)?);
        }
    }
    Ok(to)
}

#[test]
fn a_training_run_matches_candle_nn() -> Result<()> {
    // Create the Vars once, give them seeded values (candle's own init is unseeded, and some
    // draws make the comparison below tighter than others), then train two copies.
    let init = VarMap::new();
    train(&init, &mut |_| Ok(()))?;
    seed_varmap(&init, &mut Rng(6))?;
    let (ours, theirs) = (copy_varmap(&init)?, copy_varmap(&init)?);
    let params = ParamsAdamW {
        lr: 0.01,
        ..Default::default()
    };
    let mut a = AdamW::from_varmap(&ours, params.clone())?;
    let mut b = candle_nn::AdamW::new(theirs.all_vars(), params)?;
    let la = train(&ours, &mut |loss| a.backward_step(loss))?;
    let lb = train(&theirs, &mut |loss| b.backward_step(loss))?;
    let worst = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    println!(
        "training run: loss {:.4} -> {:.2e}; largest loss difference from candle-nn {worst:.2e}",
        la[0], la[299]
    );
    assert!(
        la[299] < la[0] * 0.01,
        "did not learn: {} -> {}",
        la[0],
        la[299]
    );
    assert!(worst <= 1e-5, "{worst:e}");
    Ok(())
}

#[test]
fn vars_without_a_gradient_are_left_alone() -> Result<()> {
    let mut rng = Rng(4);
    let vars: Vec<Var> = SHAPES
        .iter()
        .map(|s| var(&mut rng, s))
        .collect::<Result<_>>()?;
    let before: Vec<Vec<f32>> = vars.iter().map(values).collect::<Result<_>>()?;
    let mut opt = VarOptimizer::new(vars.clone(), AdamConfig::default())?;
    for _ in 0..3 {
        let mut grads = random_grads(&mut rng, 1.0)?;
        grads[1] = None;
        opt.step(&store(&vars, &grads))?;
    }
    assert_eq!(values(&vars[1])?, before[1]);
    assert_ne!(values(&vars[0])?, before[0]);
    assert_eq!(opt.optimizer().tensor_steps(), [3, 0, 3, 3]);
    Ok(())
}

/// LAMB and LARS through candle: each Var takes its own trust ratio, bitwise the f32 reference
/// of that tensor alone.
#[test]
fn trust_ratio_rules_measure_each_var_alone() -> Result<()> {
    use crate::common::{Reference, assert_same};
    fn run<R: fusedopt::Rule>(config: R, name: &str) -> Result<()> {
        let mut rng = Rng(6);
        let vars: Vec<Var> = SHAPES
            .iter()
            .map(|s| var(&mut rng, s))
            .collect::<Result<_>>()?;
        let before: Vec<Vec<f32>> = vars.iter().map(values).collect::<Result<_>>()?;
        let mut opt = VarOptimizer::new(vars.clone(), config)?;
        let all: Vec<Vec<Option<Tensor>>> = (0..3)
            .map(|_| random_grads(&mut rng, 1.0))
            .collect::<Result<_>>()?;
        for grads in &all {
            opt.step(&store(&vars, grads))?;
        }
        let parsed: fusedopt::OptimizerConfig = name.parse().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let mut w = before[i].clone();
            let mut r = Reference::<f32>::new(parsed, w.len());
            for grads in &all {
                let g: Vec<f32> = grads[i].as_ref().unwrap().flatten_all()?.to_vec1()?;
                r.step(&mut w, &g);
            }
            assert_same(&values(v)?, &w, &format!("{name} var {i}"));
        }
        Ok(())
    }
    let lamb = "lamb:lr=0.01,weight_decay=0.1";
    run(
        fusedopt::LambConfig {
            lr: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        },
        lamb,
    )?;
    let lars = "lars:lr=0.5,momentum=0.9,weight_decay=0.01";
    let config = fusedopt::LarsConfig {
        lr: 0.5,
        momentum: 0.9,
        weight_decay: 0.01,
        ..Default::default()
    };
    run(config, lars)
}

#[test]
fn ten_thousand_vars_step_as_step_all_does() -> Result<()> {
    let mut rng = Rng(5);
    let vars: Vec<Var> = (0..10_000)
        .map(|_| var(&mut rng, &[16]))
        .collect::<Result<_>>()?;
    let mut raw: Vec<Vec<f32>> = vars.iter().map(values).collect::<Result<_>>()?;
    let grads: Vec<Option<Tensor>> = (0..10_000)
        .map(|_| Ok(Some(Tensor::from_vec(rng.vec(16, 1.0), 16, &Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let raw_grads: Vec<Vec<f32>> = grads
        .iter()
        .map(|g| g.as_ref().unwrap().to_vec1())
        .collect::<Result<_>>()?;
    let mut opt = VarOptimizer::new(vars.clone(), MomentumConfig::default())?;
    let mut reference = fusedopt::Momentum::new(MomentumConfig::default());
    let grads = store(&vars, &grads);
    for _ in 0..2 {
        opt.step(&grads)?;
        reference.step_all(&mut raw, &raw_grads).unwrap();
    }
    for (v, r) in vars.iter().zip(&raw) {
        assert_eq!(&values(v)?, r);
    }
    Ok(())
}

/// A VarMap of four named Vars, inserted in the order of `names`.
fn named_varmap(names: &[&str]) -> Result<VarMap> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for name in names {
            // The same values for the same name, whatever the order.
            let seed = name.bytes().map(u64::from).sum();
            data.insert(name.to_string(), var(&mut Rng(seed), &[17])?);
        }
    }
    Ok(varmap)
}

/// Steps `opt` over the Vars of `varmap` with gradients from `rng`, in name order.
fn step_named(opt: &mut AdamW, varmap: &VarMap, rng: &mut Rng) -> Result<()> {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut store = GradStore::default();
    for name in names {
        store.insert(
            data[name].as_tensor(),
            Tensor::from_vec(rng.vec(17, 1.0), 17, &Device::Cpu)?,
        );
    }
    opt.step(&store)
}

#[test]
fn state_files_survive_a_restart_with_the_vars_in_another_order() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("fusedopt-candle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("adamw.safetensors");
    let names = ["h.0.ln.weight", "h.0.ln.bias", "wte", "lm_head"];
    let mut reversed = names;
    reversed.reverse();

    // Uninterrupted: six steps.
    let straight = named_varmap(&names)?;
    let mut a = AdamW::from_varmap(&straight, ParamsAdamW::default())?;
    let mut rng = Rng(6);
    for _ in 0..6 {
        step_named(&mut a, &straight, &mut rng)?;
    }
    // Three steps, save; restart with the map filled in reverse order; load; three more.
    let first = named_varmap(&names)?;
    let mut b = AdamW::from_varmap(&first, ParamsAdamW::default())?;
    let mut rng = Rng(6);
    for _ in 0..3 {
        step_named(&mut b, &first, &mut rng)?;
    }
    b.inner().optimizer().save_state(&path).unwrap();
    let restarted = copy_varmap(&first)?;
    let reordered = VarMap::new();
    for name in reversed {
        let v = restarted.data().lock().unwrap()[name].clone();
        reordered.data().lock().unwrap().insert(name.to_string(), v);
    }
    let mut c = AdamW::from_varmap(&reordered, ParamsAdamW::default())?;
    c.inner_mut().optimizer_mut().load_state(&path).unwrap();
    for _ in 0..3 {
        step_named(&mut c, &reordered, &mut rng)?;
    }
    for name in names {
        let x = values(&straight.data().lock().unwrap()[name])?;
        let y = values(&reordered.data().lock().unwrap()[name])?;
        assert_eq!(x, y, "{name}");
    }

    // A model whose names differ is refused, naming the first difference.
    let other = named_varmap(&["h.0.ln.weight", "h.0.ln.bias", "wpe", "lm_head"])?;
    let mut d = AdamW::from_varmap(&other, ParamsAdamW::default())?;
    let err = d.inner_mut().optimizer_mut().load_state(&path).unwrap_err();
    assert!(matches!(err, StateError::Names { .. }), "{err}");
    assert!(err.to_string().contains("wpe"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
    Ok(())
}

#[test]
fn bad_vars_and_gradients_are_refused_before_anything_changes() -> Result<()> {
    let mut rng = Rng(7);
    let a = var(&mut rng, &[4, 3])?;
    let b = var(&mut rng, &[5])?;
    // Construction: a non-f32 Var, a Var twice.
    let f64_var = Var::zeros(4, DType::F64, &Device::Cpu)?;
    let err = VarOptimizer::new(vec![a.clone(), f64_var], AdamConfig::default()).unwrap_err();
    assert!(err.to_string().contains("F64"), "{err}");
    let err = VarOptimizer::new(vec![a.clone(), b.clone(), a.clone()], AdamConfig::default())
        .unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");

    let mut opt = VarOptimizer::new(vec![a.clone(), b.clone()], AdamConfig::default())?;
    let (a0, b0) = (values(&a)?, values(&b)?);
    let ones = |shape: &[usize]| Tensor::ones(shape, DType::F32, &Device::Cpu);
    let cases: Vec<(&str, GradStore)> = vec![
        // A gradient that is a Var's own storage: refused without touching a lock twice.
        (
            "shares storage",
            store(
                &[a.clone(), b.clone()],
                &[Some(ones(&[4, 3])?), Some(b.as_tensor().clone())],
            ),
        ),
        (
            "shape",
            store(
                &[a.clone(), b.clone()],
                &[Some(ones(&[3, 4])?), Some(ones(&[5])?)],
            ),
        ),
        (
            "F64",
            store(
                &[a.clone(), b.clone()],
                &[Some(Tensor::ones((4, 3), DType::F64, &Device::Cpu)?), None],
            ),
        ),
    ];
    for (what, grads) in cases {
        let err = opt.step(&grads).unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
        assert_eq!(
            (values(&a)?, values(&b)?),
            (a0.clone(), b0.clone()),
            "{what}"
        );
        assert_eq!(opt.optimizer().steps(), 0);
    }
    // A strided gradient is accepted (copied to a contiguous one).
    let strided = Tensor::from_vec(rng.vec(12, 1.0), (3, 4), &Device::Cpu)?.t()?;
    assert!(!strided.is_contiguous());
    let mut reference = fusedopt::Adam::new(AdamConfig::default());
    let mut expected = a0.clone();
    reference
        .step(&mut expected, &strided.flatten_all()?.to_vec1::<f32>()?)
        .unwrap();
    opt.step(&store(&[a.clone(), b.clone()], &[Some(strided), None]))?;
    assert_eq!(values(&a)?, expected);
    Ok(())
}
