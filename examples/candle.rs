//! fusedopt's candle optimizers against candle-nn's, and against fusedopt on plain slices
//! (`--features candle`).
//!
//! ```text
//! cargo run --release --features candle --example candle             # every measurement
//! cargo run --release --features candle --example candle -- --skip-candle-nn
//! ```
//!
//! - GPT-2-small's parameter list (148 Vars, 124M parameters): one AdamW step of candle-nn and of
//!   `fusedopt::candle::AdamW`, alternating.
//! - 10,000 Vars of 1,024: `fusedopt::candle::AdamW` against `step_all` over plain vectors of the
//!   same sizes.
//! - A 4,550-parameter MLP's Vars: both AdamWs.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, Device, InplaceOp2, Layout, Tensor, Var};
use candle_nn::{Optimizer as _, ParamsAdamW};
use clap::Parser;
use common::{gpt2_small, median};
use fusedopt::{Adam, AdamConfig, EpsMode, Optimizer as _, OptimizerExt as _};
use std::time::Instant;

/// Time candle optimizer steps.
#[derive(Debug, Parser)]
struct Args {
    /// Skip candle-nn's AdamW on GPT-2 small (about 6 s a step on 2 cores).
    #[arg(long)]
    skip_candle_nn: bool,
    /// Timed steps of candle-nn's AdamW on GPT-2 small.
    #[arg(long, default_value_t = 3)]
    gpt2_reps: usize,
}

/// Vars of the given sizes, and a gradient store holding a gradient for each: every Var
/// allocated first, then every gradient, as the plain vectors they are compared with.
fn model(layout: &[usize]) -> candle_core::Result<(Vec<Var>, GradStore)> {
    let vars: Vec<Var> = layout
        .iter()
        .map(|&n| Var::from_vec(vec![0.1f32; n], n, &Device::Cpu))
        .collect::<candle_core::Result<_>>()?;
    let mut grads = GradStore::default();
    for (i, (v, &n)) in vars.iter().zip(layout).enumerate() {
        let g = Tensor::from_vec(vec![0.01f32 * (1 + i % 7) as f32; n], n, &Device::Cpu)?;
        grads.insert(v.as_tensor(), g);
    }
    Ok((vars, grads))
}

/// An in-place op that does nothing.
struct Touch;

impl InplaceOp2 for Touch {
    fn name(&self) -> &'static str {
        "touch"
    }
    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        Ok(())
    }
}

/// What any step through candle's public API does per Var besides the arithmetic.
fn candle_access(vars: &[Var], grads: &GradStore) {
    use rayon::prelude::*;
    vars.par_iter().with_min_len(60).for_each(|v| {
        let g = grads.get(v).unwrap();
        let (storage, _) = g.storage_and_layout();
        std::hint::black_box(&*storage);
    });
    vars.par_iter().with_min_len(60).for_each(|v| {
        let g = grads.get(v).unwrap();
        v.inplace_op2(g, &Touch).unwrap();
    });
}

/// Times `a` and `b` alternately, `reps` times each after a warm-up, and returns their medians.
fn alternate(reps: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    a();
    b();
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        if rep % 2 == 0 {
            ta.push(time(&mut a));
            tb.push(time(&mut b));
        } else {
            tb.push(time(&mut b));
            ta.push(time(&mut a));
        }
    }
    (median(ta), median(tb))
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    println!(
        "{} threads, {} kernels; medians of alternating steps",
        rayon::current_num_threads(),
        fusedopt::simd_level()
    );
    let params = ParamsAdamW::default();

    // GPT-2 small.
    let layout = gpt2_small();
    let (vars_a, grads_a) = model(&layout)?;
    let mut ours = fusedopt::candle::AdamW::new(vars_a, params.clone())?;
    if args.skip_candle_nn {
        let (mut t, _) = alternate(5, || ours.step(&grads_a).unwrap(), || {});
        t *= 1e3;
        println!("GPT-2 small (148 Vars, 124,439,808 parameters): fusedopt {t:.1} ms");
    } else {
        let (vars_b, grads_b) = model(&layout)?;
        let mut theirs = candle_nn::AdamW::new(vars_b, params.clone())?;
        let (a, b) = alternate(
            args.gpt2_reps,
            || ours.step(&grads_a).unwrap(),
            || theirs.step(&grads_b).unwrap(),
        );
        println!(
            "GPT-2 small (148 Vars, 124,439,808 parameters): fusedopt {:.1} ms, candle-nn {:.0} ms: {:.0}x",
            a * 1e3,
            b * 1e3,
            b / a
        );
    }
    drop(ours);

    // 10,000 x 1024: through candle Vars, and on plain vectors.
    let layout = vec![1024usize; 10_000];
    let (vars, grads) = model(&layout)?;
    let mut ours = fusedopt::candle::AdamW::new(vars, params.clone())?;
    let mut weights: Vec<Vec<f32>> = layout.iter().map(|&n| vec![0.1f32; n]).collect();
    let plain_grads: Vec<Vec<f32>> = layout
        .iter()
        .enumerate()
        .map(|(i, &n)| vec![0.01f32 * (1 + i % 7) as f32; n])
        .collect();
    let mut raw = Adam::new(AdamConfig {
        eps: 1e-8,
        weight_decay: 0.01,
        decoupled_weight_decay: true,
        eps_mode: EpsMode::SqrtVHat,
        ..Default::default()
    });
    let (a, b) = alternate(
        41,
        || ours.step(&grads).unwrap(),
        || {
            raw.step_all(&mut weights, &plain_grads).unwrap();
        },
    );
    // The floor of any optimizer behind candle's public API: per Var, the gradient's lookup and
    // a read of its storage (to check it), then another lookup and an in-place op holding both
    // locks; here with no arithmetic, spread over the threads as the step spreads its Vars.
    let (vars, _) = (ours.inner().vars(), ());
    let (c, _) = alternate(41, || candle_access(vars, &grads), || {});
    println!(
        "10,000 Vars x 1,024: fusedopt::candle {:.2} ms, step_all on plain vectors {:.2} ms: {:.2}x; candle's per-Var access alone {:.2} ms, so the floor is {:.2}x",
        a * 1e3,
        b * 1e3,
        a / b,
        c * 1e3,
        (b + c) / b
    );
    assert_eq!(ours.inner().optimizer().steps(), raw.steps());

    // A small MLP: 2-layer, 4,550 parameters.
    let layout = [4096usize, 64, 384, 6];
    let (vars_a, grads_a) = model(&layout)?;
    let (vars_b, grads_b) = model(&layout)?;
    let mut ours = fusedopt::candle::AdamW::new(vars_a, params.clone())?;
    let mut theirs = candle_nn::AdamW::new(vars_b, params)?;
    let (a, b) = alternate(
        201,
        || ours.step(&grads_a).unwrap(),
        || theirs.step(&grads_b).unwrap(),
    );
    println!(
        "4,550-parameter MLP (4 Vars): fusedopt {:.1} µs, candle-nn {:.1} µs: {:.0}x",
        a * 1e6,
        b * 1e6,
        b / a
    );
    Ok(())
}
