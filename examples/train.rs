//! End-to-end training: a two-layer MLP classifies a synthetic three-arm spiral.
//!
//! ```text
//! cargo run --release --example train -- --optimizer adam
//! cargo run --release --example train -- --optimizer momentum:lr=0.05,momentum=0.9 --epochs 30
//! cargo run --release --example train -- --optimizer adamw:lr=0.01,weight_decay=0.01 \
//!     --schedule warmup-cosine
//! cargo run --release --example train -- --optimizer adam --state-format q8
//! ```
//!
//! `--optimizer` takes a configuration string, `name[:field=value,...]` (see
//! `fusedopt::OptimizerConfig`): every hyperparameter of every optimizer is reachable from it.
//! The model's four tensors (W1, b1, W2, b2) are updated with one `step_all` call per batch.
//! Weight decay applies to W1 and W2 only: the biases get `ParamGroup::NO_WEIGHT_DECAY`. A
//! `--schedule` sets the learning rate before every step with `Optimizer::set_lr`. Every epoch
//! prints the training loss, accuracy on a held-out set, the learning rate, and the time spent
//! inside the optimizer step.

use clap::{Parser, ValueEnum};
use fusedopt::*;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Lr {
    /// The optimizer's `lr` throughout.
    Constant,
    /// Cosine annealing to lr/100 over the run.
    Cosine,
    /// Linear warm-up over the first epoch, then cosine annealing to lr/100.
    WarmupCosine,
    /// One-cycle: up to 10·lr over the first 30% of the run, then down to lr/1000 (PyTorch's
    /// defaults, with max_lr = 10·lr).
    OneCycle,
}

/// Train a small MLP on a synthetic spiral with a fusedopt optimizer.
#[derive(Debug, Parser)]
struct Args {
    /// The optimizer and its hyperparameters: a name (sgd, momentum, nag, adagrad, rmsprop, adam,
    /// adamw) with optional overrides, for example `adam:lr=0.01,beta2=0.99` or
    /// `adamw:weight_decay=0.05,amsgrad=true`. Weight decay never applies to the biases.
    #[arg(long, default_value = "adam")]
    optimizer: OptimizerConfig,
    /// Clip every step by the global gradient norm (torch.nn.utils.clip_grad_norm_'s rule).
    #[arg(long)]
    max_grad_norm: Option<f32>,
    /// How the optimizer stores its state: f32, bf16 (stochastic rounding) or q8 (8-bit
    /// block-wise).
    #[arg(long, default_value = "f32")]
    state_format: StateFormat,
    /// Learning-rate schedule over the whole run.
    #[arg(long, value_enum, default_value = "constant")]
    schedule: Lr,
    /// Training epochs.
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Hidden units.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Training samples (a further quarter is generated for testing).
    #[arg(long, default_value_t = 6000)]
    samples: usize,
    /// Threads of the optimizer's rayon pool [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the data set and the initial weights.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

const CLASSES: usize = 3;

/// splitmix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit().max(1e-7), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// Three interleaved spiral arms with noise: (x, y) points and their arm.
fn spiral(n: usize, rng: &mut Rng) -> (Vec<[f32; 2]>, Vec<usize>) {
    let mut xs = Vec::with_capacity(n);
    let mut ys = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % CLASSES;
        let r = rng.unit();
        let angle =
            4.0 * r + class as f32 * std::f32::consts::TAU / CLASSES as f32 + 0.2 * rng.normal();
        xs.push([r * angle.cos(), r * angle.sin()]);
        ys.push(class);
    }
    (xs, ys)
}

/// W1 [2×H], b1 [H], W2 [H×C], b2 [C], each a flat tensor.
struct Mlp {
    hidden: usize,
    params: [Vec<f32>; 4],
    grads: [Vec<f32>; 4],
}

impl Mlp {
    fn new(hidden: usize, rng: &mut Rng) -> Mlp {
        let he = |fan_in: usize, n: usize, rng: &mut Rng| -> Vec<f32> {
            (0..n)
                .map(|_| rng.normal() * (2.0 / fan_in as f32).sqrt())
                .collect()
        };
        let params = [
            he(2, 2 * hidden, rng),
            vec![0.0; hidden],
            he(hidden, hidden * CLASSES, rng),
            vec![0.0; CLASSES],
        ];
        let grads = params.clone().map(|p| vec![0.0; p.len()]);
        Mlp {
            hidden,
            params,
            grads,
        }
    }

    /// Hidden activations and class probabilities of one point.
    fn forward(&self, x: &[f32; 2], h: &mut [f32], p: &mut [f32; CLASSES]) {
        let [w1, b1, w2, b2] = &self.params;
        for j in 0..self.hidden {
            h[j] = (x[0] * w1[j] + x[1] * w1[self.hidden + j] + b1[j]).max(0.0);
        }
        let mut logits = [0f32; CLASSES];
        for (c, l) in logits.iter_mut().enumerate() {
            *l = b2[c]
                + (0..self.hidden)
                    .map(|j| h[j] * w2[j * CLASSES + c])
                    .sum::<f32>();
        }
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        for c in 0..CLASSES {
            p[c] = (logits[c] - max).exp() / sum;
        }
    }

    /// Mean cross-entropy of a batch; fills `self.grads` with its gradient.
    fn backward(&mut self, batch: &[usize], xs: &[[f32; 2]], ys: &[usize]) -> f32 {
        for g in &mut self.grads {
            g.fill(0.0);
        }
        let (hn, scale) = (self.hidden, 1.0 / batch.len() as f32);
        let mut h = vec![0f32; hn];
        let mut p = [0f32; CLASSES];
        let mut loss = 0.0;
        for &i in batch {
            self.forward(&xs[i], &mut h, &mut p);
            loss -= p[ys[i]].max(1e-12).ln();
            let mut dlogit = p;
            dlogit[ys[i]] -= 1.0;
            let [gw1, gb1, gw2, gb2] = &mut self.grads;
            let w2 = &self.params[2];
            for c in 0..CLASSES {
                gb2[c] += dlogit[c] * scale;
            }
            for j in 0..hn {
                let mut dh = 0.0;
                for c in 0..CLASSES {
                    gw2[j * CLASSES + c] += h[j] * dlogit[c] * scale;
                    dh += w2[j * CLASSES + c] * dlogit[c];
                }
                if h[j] > 0.0 {
                    gb1[j] += dh * scale;
                    gw1[j] += xs[i][0] * dh * scale;
                    gw1[hn + j] += xs[i][1] * dh * scale;
                }
            }
        }
        loss * scale
    }

    fn accuracy(&self, xs: &[[f32; 2]], ys: &[usize]) -> f32 {
        let mut h = vec![0f32; self.hidden];
        let mut p = [0f32; CLASSES];
        let right = xs
            .iter()
            .zip(ys)
            .filter(|(x, y)| {
                self.forward(x, &mut h, &mut p);
                (0..CLASSES).max_by(|&a, &b| p[a].total_cmp(&p[b])) == Some(**y)
            })
            .count();
        right as f32 / ys.len() as f32
    }
}

/// The learning-rate schedule of the run, around the optimizer's configured `lr`.
fn schedule(kind: Lr, lr: f32, total: u64, warmup: u64) -> schedule::Schedule {
    use schedule::Schedule;
    match kind {
        Lr::Constant => Schedule::Constant { lr },
        Lr::Cosine => Schedule::Cosine {
            base: lr,
            min: lr / 100.0,
            total,
        },
        Lr::WarmupCosine => Schedule::WarmupCosine {
            base: lr,
            min: lr / 100.0,
            warmup,
            total,
        },
        Lr::OneCycle => Schedule::OneCycle {
            max_lr: 10.0 * lr,
            total,
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
        },
    }
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(t) = args.threads {
        pool = pool.num_threads(t);
    }
    let pool = pool.build()?;
    // The whole run happens inside the pool, so each step dispatches to it directly.
    pool.install(|| train(&args, pool.current_num_threads()))
}

fn train(args: &Args, threads: usize) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut rng = Rng(args.seed);
    let (xs, ys) = spiral(args.samples, &mut rng);
    let (test_x, test_y) = spiral(args.samples / 4, &mut rng);
    let mut model = Mlp::new(args.hidden, &mut rng);
    let mut opt = args.optimizer.build();
    opt.set_settings(
        opt.settings()
            .with_max_grad_norm(args.max_grad_norm)
            .with_state_format(args.state_format),
    )?;
    // W1, b1, W2, b2: no weight decay on the biases.
    let decay = ParamGroup::DEFAULT;
    opt.set_param_groups(&[
        decay,
        ParamGroup::NO_WEIGHT_DECAY,
        decay,
        ParamGroup::NO_WEIGHT_DECAY,
    ])?;
    let batches_per_epoch = args.samples.div_ceil(args.batch.max(1)) as u64;
    let lr = schedule(
        args.schedule,
        opt.lr(),
        batches_per_epoch * args.epochs as u64,
        batches_per_epoch,
    );
    let mut step = 0u64;
    let n_params: usize = model.params.iter().map(Vec::len).sum();
    println!(
        "{} on a {}-arm spiral: {} train / {} test points, MLP 2-{}-{} ({} parameters), {} threads, {} kernels",
        opt.name(),
        CLASSES,
        xs.len(),
        test_x.len(),
        args.hidden,
        CLASSES,
        n_params,
        threads,
        opt.backend().level(),
    );
    println!(
        "{:>5} {:>10} {:>9} {:>10} {:>14} {:>10}",
        "epoch", "loss", "test acc", "lr", "optimizer ms", "max |g|"
    );
    let mut order: Vec<usize> = (0..xs.len()).collect();
    for epoch in 1..=args.epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        let (mut loss, mut batches, mut in_step) = (0.0, 0, Duration::ZERO);
        let mut max_norm = None::<f32>;
        for batch in order.chunks(args.batch.max(1)) {
            loss += model.backward(batch, &xs, &ys);
            batches += 1;
            opt.set_lr(lr.lr_at(step));
            step += 1;
            let start = Instant::now();
            let report = opt.step_all(&mut model.params, &model.grads)?;
            if let Some(n) = report.grad_norm {
                max_norm = Some(max_norm.map_or(n, |m| m.max(n)));
            }
            in_step += start.elapsed();
        }
        println!(
            "{epoch:>5} {:>10.4} {:>8.1}% {:>10.2e} {:>14.3} {:>10}",
            loss / batches as f32,
            100.0 * model.accuracy(&test_x, &test_y),
            opt.lr(),
            in_step.as_secs_f64() * 1e3,
            max_norm.map_or("-".to_string(), |n| format!("{n:.3}"))
        );
    }
    Ok(())
}
