//! Convergence on small problems: an ill-conditioned quadratic bowl and the Rosenbrock function.

use crate::common::*;
use fusedopt::OptimizerConfig;

/// f(w) = ½ Σ aᵢ (wᵢ − cᵢ)², aᵢ from 1 to 10: returns the loss after `steps` steps.
fn bowl(config: OptimizerConfig, steps: usize) -> (f64, f64) {
    let n = 256;
    let a: Vec<f32> = (0..n)
        .map(|i| 1.0 + 9.0 * i as f32 / (n - 1) as f32)
        .collect();
    let c = Rng(3).vec(n, 2.0);
    let loss = |w: &[f32]| -> f64 {
        w.iter()
            .zip(&a)
            .zip(&c)
            .map(|((&w, &a), &c)| 0.5 * a as f64 * ((w - c) as f64).powi(2))
            .sum()
    };
    let mut w = vec![0.0f32; n];
    let start = loss(&w);
    let mut opt = config.build();
    let mut g = vec![0.0f32; n];
    for _ in 0..steps {
        for i in 0..n {
            g[i] = a[i] * (w[i] - c[i]);
        }
        opt.step(&mut w, &g).unwrap();
    }
    (start, loss(&w))
}

#[test]
fn every_optimizer_descends_a_quadratic_bowl() {
    for config in configs() {
        let kind = config.name();
        let lr = match kind {
            "sgd" | "momentum" | "nag" => "lr=0.05",
            "adagrad" => "lr=0.5",
            // Lion's steps are ±lr in every coordinate: it settles within about lr.
            "lion" => "lr=0.015",
            // Its default decoupled decay (0.01) moves the minimum, and a slow EMA of 10,000
            // steps (β3 0.9999) carries it past the minimum of a 500-step run: β3 is sized to
            // the run.
            "ademamix" => "lr=0.02,weight_decay=0,beta3=0.99",
            // The average x of the iterates converges as 1/t: larger steps for the iterates.
            "adamw_schedulefree" => "lr=0.2",
            "sgd_schedulefree" => "lr=0.05",
            // Decay moves the minimum, and the trust ratio keeps the step's norm at lr·‖w‖
            // unless clipped to 1 (then it is Adam's step near the minimum).
            "lamb" => "lr=0.02,weight_decay=0,always_adapt=true,trust_clip=true",
            _ => "lr=0.02",
        };
        let (start, end) = bowl(with(config, lr), 500);
        println!("{kind}: bowl loss {start:.3} -> {end:.3e}");
        assert!(end < start * 1e-4, "{kind}: loss {start} -> {end}");
    }
}

#[test]
fn momentum_beats_plain_sgd_on_the_bowl() {
    let run = |name: &str| bowl(format!("{name}:lr=0.005").parse().unwrap(), 200).1;
    let (sgd, mom, nag) = (run("sgd"), run("momentum"), run("nag"));
    assert!(
        mom < sgd * 0.1 && nag < sgd * 0.1,
        "sgd {sgd} momentum {mom} nag {nag}"
    );
}

/// Rosenbrock f(x, y) = (1 − x)² + 100 (y − x²)², minimum at (1, 1), from (−1.5, 2).
/// Many independent copies run as one tensor, started at slightly different points.
fn rosenbrock(config: OptimizerConfig, steps: usize) -> (f64, f64, f32) {
    let copies = 37;
    let f = |x: f64, y: f64| (1.0 - x).powi(2) + 100.0 * (y - x * x).powi(2);
    let mut w: Vec<f32> = (0..copies)
        .flat_map(|i| [-1.5 + 0.01 * i as f32, 2.0])
        .collect();
    let start = f(-1.5, 2.0);
    let mut opt = config.build();
    let mut g = vec![0.0f32; w.len()];
    for _ in 0..steps {
        for p in 0..copies {
            let (x, y) = (w[2 * p], w[2 * p + 1]);
            g[2 * p] = -2.0 * (1.0 - x) - 400.0 * x * (y - x * x);
            g[2 * p + 1] = 200.0 * (y - x * x);
        }
        opt.step(&mut w, &g).unwrap();
    }
    let worst = (0..copies)
        .map(|p| f(w[2 * p] as f64, w[2 * p + 1] as f64))
        .fold(0.0, f64::max);
    let dist = (0..copies)
        .map(|p| ((w[2 * p] - 1.0).powi(2) + (w[2 * p + 1] - 1.0).powi(2)).sqrt())
        .fold(0.0, f32::max);
    (start, worst, dist)
}

#[test]
fn every_optimizer_makes_progress_on_rosenbrock() {
    for config in configs() {
        let kind = config.name();
        let (lr, steps, max_dist) = match kind {
            "sgd" => ("lr=1e-3", 20_000, 0.05),
            "momentum" | "nag" => ("lr=2e-4", 10_000, 0.05),
            "adagrad" => ("lr=1.0", 20_000, 0.05),
            "rmsprop" => ("lr=1e-3", 10_000, 0.05),
            "lion" => ("lr=2e-4", 20_000, 0.05),
            // Its first steps are unrectified momentum steps of lr·m̂: as large as SGD's.
            "radam" => ("lr=1e-3", 20_000, 0.05),
            "ademamix" => ("lr=0.005,weight_decay=0", 10_000, 0.05),
            "adamw_schedulefree" => ("lr=0.02", 20_000, 0.05),
            // Its average weighs the first, far iterates as much as the last: a longer run.
            "sgd_schedulefree" => ("lr=5e-3", 40_000, 0.05),
            // One tensor: the trust ratio ‖w‖/‖u‖ keeps the step's norm at lr·‖w‖, which never
            // settles without a schedule; clipped to 1, it is Adam's step near the minimum.
            "lamb" => (
                "lr=0.005,weight_decay=0,always_adapt=true,trust_clip=true",
                10_000,
                0.05,
            ),
            "lars" => ("lr=2e-4,momentum=0.9", 10_000, 0.05),
            _ => ("lr=0.005", 10_000, 0.05),
        };
        let (start, end, dist) = rosenbrock(with(config, lr), steps);
        println!("{kind}: rosenbrock {start:.2} -> {end:.2e}, farthest copy {dist:.3} from (1, 1)");
        assert!(end < start * 1e-3, "{kind}: f {start} -> {end}");
        assert!(
            dist < max_dist,
            "{kind}: a copy ended {dist} from the minimum"
        );
    }
}
