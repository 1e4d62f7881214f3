//! Shared helpers for the integration tests: optimizer configurations, a seeded generator,
//! thread pools, and plain reference implementations written from the update rules alone
//! (independently of the crate's kernels).
#![allow(dead_code)]

use fusedopt::*;

/// The default configuration of every optimizer, for tests that sweep all six.
pub fn configs() -> Vec<OptimizerConfig> {
    OPTIMIZER_NAMES
        .iter()
        .map(|name| OptimizerConfig::default_for(name).unwrap())
        .collect()
}

/// A configuration of the same optimizer far from the defaults.
pub fn unusual(config: OptimizerConfig) -> OptimizerConfig {
    with(
        config,
        match config.name() {
            "sgd" => "lr=0.037",
            "momentum" => "lr=0.037,momentum=0.5,dampening=0.25",
            "nag" => "lr=0.037,momentum=0.5",
            "adagrad" => "lr=0.037,eps=1e-3,lr_decay=0.05,initial_accumulator_value=0.1",
            "rmsprop" => "lr=0.037,decay_rate=0.7,eps=1e-3",
            "adam" => "lr=0.037,beta1=0.8,beta2=0.95,eps=1e-3",
            "adamax" => "lr=0.037,beta1=0.8,beta2=0.95,eps=1e-3",
            "lion" => "lr=0.037,beta1=0.8,beta2=0.95",
            "radam" => {
                "lr=0.037,beta1=0.8,beta2=0.95,eps=1e-3,weight_decay=0.1,decoupled_weight_decay=true"
            }
            "nadam" => {
                "lr=0.037,beta1=0.8,beta2=0.95,eps=1e-3,momentum_decay=0.05,weight_decay=0.1,decoupled_weight_decay=true"
            }
            "ademamix" => {
                "lr=0.037,beta1=0.8,beta2=0.95,beta3=0.999,alpha=3,t_alpha=20,t_beta3=30,eps=1e-3,weight_decay=0.1"
            }
            "adamw_schedulefree" => {
                "lr=0.037,beta1=0.8,beta2=0.95,eps=1e-3,weight_decay=0.1,warmup_steps=3,r=0.5,weight_lr_power=1.5"
            }
            "sgd_schedulefree" => "lr=0.037,momentum=0.7,weight_decay=0.1,warmup_steps=3,r=0.5",
            "lamb" => "lr=0.037,beta1=0.8,beta2=0.95,eps=1e-3,weight_decay=0.1,trust_clip=true",
            "lars" => {
                "lr=0.37,momentum=0.8,dampening=0.25,weight_decay=0.1,trust_coeff=0.02,eps=1e-3"
            }
            other => panic!("no unusual configuration for {other}"),
        },
    )
}

/// `config` with the `field=value,...` overrides applied (the syntax of `OptimizerConfig`).
pub fn with(mut config: OptimizerConfig, overrides: &str) -> OptimizerConfig {
    for item in overrides.split(',').filter(|i| !i.is_empty()) {
        let (field, value) = item.split_once('=').unwrap();
        config
            .set(field, value)
            .unwrap_or_else(|e| panic!("{config}: {e}"));
    }
    config
}

/// Whether `config` keeps no state (SGD; LARS without momentum), so that any layout is fine.
pub fn stateless(config: &OptimizerConfig) -> bool {
    match config.name() {
        "sgd" => true,
        "lars" => number(config, "momentum") == 0.0,
        _ => false,
    }
}

/// The learning rate of `config`.
pub fn lr_of(config: &OptimizerConfig) -> f32 {
    number(config, "lr")
}

/// The weight decay of `config`.
pub fn weight_decay_of(config: &OptimizerConfig) -> f32 {
    number(config, "weight_decay")
}

/// The numeric field `name` of `config`.
fn number(config: &OptimizerConfig, name: &str) -> f32 {
    let (_, text) = config
        .fields()
        .into_iter()
        .find(|(f, _)| *f == name)
        .unwrap_or_else(|| panic!("{config} has no {name}"));
    text.parse().unwrap()
}

/// Parameter groups for tests: the configuration's values, no decay, half the lr, and twice the lr
/// with a decay of its own.
pub const GROUPS: [ParamGroup; 4] = [
    ParamGroup::DEFAULT,
    ParamGroup::NO_WEIGHT_DECAY,
    ParamGroup {
        lr_scale: 0.5,
        weight_decay: None,
    },
    ParamGroup {
        lr_scale: 2.0,
        weight_decay: Some(0.3),
    },
];

/// splitmix64: a tiny seeded generator, so tests need no extra crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

pub fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// Bitwise equality, treating any two NaNs as equal (NaN payloads are not specified).
pub fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

pub fn assert_same(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            same_bits(x, y),
            "{what}: element {i}: {x:e} ({:#x}) vs {y:e} ({:#x})",
            x.to_bits(),
            y.to_bits()
        );
    }
}

/// A plain reference optimizer in a float type `F` (f32 or f64), written from the update rules.
/// Per-step scalars are computed in f64 and converted to `F` once, as the rules prescribe.
pub struct Reference<F> {
    pub config: OptimizerConfig,
    pub t: u64,
    pub s1: Vec<F>,
    pub s2: Vec<F>,
    /// AMSGrad's running maximum of `s2`.
    pub s3: Vec<F>,
    /// The schedule-free rules' largest learning rate and sum of averaging weights.
    pub sums: [f64; 2],
}

pub trait Float:
    Copy
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn from64(x: f64) -> Self;
    fn to64(self) -> f64;
    fn sqrt(self) -> Self;
    /// `−x`, zeros included.
    fn neg(self) -> Self {
        Self::from64(-1.0) * self
    }
    fn gt(self, other: Self) -> bool {
        self.to64() > other.to64()
    }
    fn is_nan(self) -> bool {
        self.to64().is_nan()
    }
}

impl Float for f32 {
    fn from64(x: f64) -> Self {
        x as f32
    }
    fn to64(self) -> f64 {
        self as f64
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Float for f64 {
    fn from64(x: f64) -> Self {
        x
    }
    fn to64(self) -> f64 {
        self
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

impl<F: Float> Reference<F> {
    pub fn new(config: OptimizerConfig, n: usize) -> Self {
        let zero = F::from64(0.0);
        // torch.optim.Adagrad's initial_accumulator_value: the sum of squares starts there.
        let h0 = match config {
            OptimizerConfig::AdaGrad(h) => F::from64(h.initial_accumulator_value as f64),
            _ => zero,
        };
        Reference {
            config,
            t: 0,
            s1: vec![h0; n],
            s2: vec![zero; n],
            s3: vec![zero; n],
            sums: [0.0; 2],
        }
    }

    pub fn step(&mut self, w: &mut [F], g: &[F]) {
        let c = |x: f32| F::from64(x as f64);
        self.t += 1;
        let t = self.t as f64;
        // The gradient transforms: negate, then the L2 term (skipped at 0, as documented).
        let prep = |gi: F, wi: F, maximize: bool, l2: f32| {
            let gi = if maximize { gi.neg() } else { gi };
            if l2 != 0.0 { gi + c(l2) * wi } else { gi }
        };
        let (s1, s2, s3) = (&mut self.s1, &mut self.s2, &mut self.s3);
        match self.config {
            OptimizerConfig::Sgd(h) => {
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, h.weight_decay);
                    w[i] = w[i] - c(h.lr) * gi;
                }
            }
            OptimizerConfig::Momentum(h) if h.form == MomentumForm::Buffer => {
                // torch.optim.SGD(momentum=μ, dampening=d): b ← μ·b + (1 − d)·g (b ← g first).
                let damp = F::from64(if t > 1.0 { 1.0 - h.dampening } else { 1.0 });
                for i in 0..w.len() {
                    let gi = damp * prep(g[i], w[i], h.maximize, h.weight_decay);
                    s1[i] = c(h.momentum) * s1[i] + gi;
                    w[i] = w[i] - c(h.lr) * s1[i];
                }
            }
            OptimizerConfig::Nag(h) if h.form == MomentumForm::Buffer => {
                // torch.optim.SGD(momentum=μ, nesterov=True): w ← w − lr·(g + μ·b).
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, h.weight_decay);
                    s1[i] = c(h.momentum) * s1[i] + gi;
                    w[i] = w[i] - c(h.lr) * (gi + c(h.momentum) * s1[i]);
                }
            }
            OptimizerConfig::Momentum(h) => {
                let damp = F::from64(if t > 1.0 { 1.0 - h.dampening } else { 1.0 });
                for i in 0..w.len() {
                    let gi = damp * prep(g[i], w[i], h.maximize, h.weight_decay);
                    let v = c(h.momentum) * s1[i] - c(h.lr) * gi;
                    s1[i] = v;
                    w[i] = w[i] + v;
                }
            }
            OptimizerConfig::Nag(h) => {
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, h.weight_decay);
                    let v = c(h.momentum) * s1[i] - c(h.lr) * gi;
                    s1[i] = v;
                    w[i] = w[i] + c(h.momentum) * v - c(h.lr) * gi;
                }
            }
            OptimizerConfig::AdaGrad(h) => {
                // torch.optim.Adagrad's lr_decay: lr / (1 + (t − 1)·lr_decay).
                let lr = F::from64(h.lr as f64 / (1.0 + (t - 1.0) * h.lr_decay));
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, h.weight_decay);
                    let hi = s1[i] + gi * gi;
                    s1[i] = hi;
                    w[i] = w[i] - lr * gi / (hi.sqrt() + c(h.eps));
                }
            }
            OptimizerConfig::RmsProp(h) => {
                // torch.optim.RMSprop: centered divides by √(h − ḡ²) + ε; momentum steps
                // through b ← μ·b + g/avg.
                let rho = F::from64(h.decay_rate);
                let one_minus_rho = F::from64(1.0 - h.decay_rate);
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, h.weight_decay);
                    let hi = rho * s1[i] + one_minus_rho * (gi * gi);
                    s1[i] = hi;
                    let avg = if h.centered {
                        s3[i] = s3[i] + one_minus_rho * (gi - s3[i]);
                        (hi - s3[i] * s3[i]).sqrt() + c(h.eps)
                    } else {
                        hi.sqrt() + c(h.eps)
                    };
                    if h.momentum > 0.0 {
                        s2[i] = F::from64(h.momentum) * s2[i] + gi / avg;
                        w[i] = w[i] - c(h.lr) * s2[i];
                    } else {
                        w[i] = w[i] - c(h.lr) * gi / avg;
                    }
                }
            }
            OptimizerConfig::Adam(h) => {
                let (b1, b2) = (h.beta1, h.beta2);
                let lr_t = F::from64(h.lr as f64 * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t)));
                let one_minus_b1 = F::from64(1.0 - b1);
                let one_minus_b2 = F::from64(1.0 - b2);
                let bc1 = 1.0 - b1.powf(t);
                let bc2_sqrt = (1.0 - b2.powf(t)).sqrt();
                let adamw = h.decoupled_weight_decay && h.weight_decay != 0.0;
                let w_decay = F::from64(1.0 - h.lr as f64 * h.weight_decay as f64);
                let l2 = if h.decoupled_weight_decay {
                    0.0
                } else {
                    h.weight_decay
                };
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, l2);
                    if adamw {
                        w[i] = w[i] * w_decay;
                    }
                    let m = s1[i] + one_minus_b1 * (gi - s1[i]);
                    let v = s2[i] + one_minus_b2 * (gi * gi - s2[i]);
                    s1[i] = m;
                    s2[i] = v;
                    let mut v_used = v;
                    if h.amsgrad {
                        // max(v_max, v), a NaN in v winning.
                        if !s3[i].gt(v) {
                            s3[i] = v;
                        }
                        v_used = s3[i];
                    }
                    if h.eps_mode == EpsMode::SqrtVHat {
                        let denom = v_used.sqrt() / F::from64(bc2_sqrt) + c(h.eps);
                        w[i] = w[i] - F::from64(h.lr as f64 / bc1) * (m / denom);
                    } else {
                        w[i] = w[i] - lr_t * m / (v_used.sqrt() + c(h.eps));
                    }
                }
            }
            OptimizerConfig::Adamax(h) => {
                // Kingma & Ba (2015), Algorithm 2, with torch.optim.Adamax's ε inside the max.
                let step_size = F::from64(h.lr as f64 / (1.0 - h.beta1.powf(t)));
                let (one_minus_b1, b2) = (F::from64(1.0 - h.beta1), F::from64(h.beta2));
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, h.weight_decay);
                    s1[i] = s1[i] + one_minus_b1 * (gi - s1[i]);
                    let abs = if gi.gt(F::from64(0.0)) { gi } else { gi.neg() };
                    let candidate = abs + c(h.eps);
                    let decayed = b2 * s2[i];
                    // max(β2·u, |g| + ε), a NaN candidate winning.
                    s2[i] = if decayed.gt(candidate) {
                        decayed
                    } else {
                        candidate
                    };
                    w[i] = w[i] - step_size * (s1[i] / s2[i]);
                }
            }
            OptimizerConfig::Lion(h) => {
                // Chen et al. (2023), Algorithm 2 (decoupled weight decay λ).
                let (b1, b2) = (F::from64(h.beta1), F::from64(h.beta2));
                let (one_minus_b1, one_minus_b2) =
                    (F::from64(1.0 - h.beta1), F::from64(1.0 - h.beta2));
                let decay = F::from64(1.0 - h.lr as f64 * h.weight_decay as f64);
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, 0.0);
                    let u = b1 * s1[i] + one_minus_b1 * gi;
                    let sign = if u.is_nan() {
                        u
                    } else if u.gt(F::from64(0.0)) {
                        F::from64(1.0)
                    } else if F::from64(0.0).gt(u) {
                        F::from64(-1.0)
                    } else {
                        F::from64(0.0)
                    };
                    let wi = if h.weight_decay != 0.0 {
                        w[i] * decay
                    } else {
                        w[i]
                    };
                    w[i] = wi - c(h.lr) * sign;
                    s1[i] = b2 * s1[i] + one_minus_b2 * gi;
                }
            }
            OptimizerConfig::RAdam(h) => {
                // Liu et al. (2020), Algorithm 2, as torch.optim.RAdam (ε added to √v).
                let (b1, b2) = (h.beta1, h.beta2);
                let rho_inf = 2.0 / (1.0 - b2) - 1.0;
                let rho_t = rho_inf - 2.0 * t * b2.powf(t) / (1.0 - b2.powf(t));
                let step = if rho_t > 5.0 {
                    let r = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                        / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                        .sqrt();
                    h.lr as f64 * r * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t))
                } else {
                    h.lr as f64 / (1.0 - b1.powf(t))
                };
                let decoupled = h.decoupled_weight_decay && h.weight_decay != 0.0;
                let l2 = if h.decoupled_weight_decay {
                    0.0
                } else {
                    h.weight_decay
                };
                let decay = F::from64(1.0 - h.lr as f64 * h.weight_decay as f64);
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, l2);
                    s1[i] = s1[i] + F::from64(1.0 - b1) * (gi - s1[i]);
                    s2[i] = F::from64(b2) * s2[i] + F::from64(1.0 - b2) * (gi * gi);
                    let wi = if decoupled { w[i] * decay } else { w[i] };
                    w[i] = if rho_t > 5.0 {
                        wi - F::from64(step) * s1[i] / (s2[i].sqrt() + c(h.eps))
                    } else {
                        wi - F::from64(step) * s1[i]
                    };
                }
            }
            OptimizerConfig::NAdam(h) => {
                // Dozat (2016) with torch.optim.NAdam's momentum schedule; the product of the
                // μ's taken step by step.
                let mu = |k: f64| h.beta1 * (1.0 - 0.5 * 0.96f64.powf(k * h.momentum_decay));
                let product: f64 = (1..=self.t).map(|k| mu(k as f64)).product();
                let (mu_t, mu_next) = (mu(t), mu(t + 1.0));
                let lr = h.lr as f64;
                let gc = F::from64(lr * (1.0 - mu_t) / (1.0 - product));
                let mc = F::from64(lr * mu_next / (1.0 - product * mu_next));
                let bc2 = F::from64(1.0 - h.beta2.powf(t));
                let decoupled = h.decoupled_weight_decay && h.weight_decay != 0.0;
                let l2 = if h.decoupled_weight_decay {
                    0.0
                } else {
                    h.weight_decay
                };
                let decay = F::from64(1.0 - lr * h.weight_decay as f64);
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, l2);
                    s1[i] = s1[i] + F::from64(1.0 - h.beta1) * (gi - s1[i]);
                    s2[i] = F::from64(h.beta2) * s2[i] + F::from64(1.0 - h.beta2) * (gi * gi);
                    let d = (s2[i] / bc2).sqrt() + c(h.eps);
                    let wi = if decoupled { w[i] * decay } else { w[i] };
                    w[i] = wi - gc * (gi / d) - mc * (s1[i] / d);
                }
            }
            OptimizerConfig::AdEMAMix(h) => {
                // Pagliardini et al. (2024), Algorithm 1, with its α and β3 warm-ups.
                let alpha = if h.t_alpha == 0 {
                    h.alpha
                } else {
                    (t * h.alpha / h.t_alpha as f64).min(h.alpha)
                };
                let b3 = if h.t_beta3 == 0 {
                    h.beta3
                } else {
                    let s = t / h.t_beta3 as f64;
                    let (l1, l3) = (h.beta1.ln(), h.beta3.ln());
                    (l1 * l3 / ((1.0 - s) * l3 + s * l1)).exp().min(h.beta3)
                };
                let inv_bc1 = F::from64(1.0 / (1.0 - h.beta1.powf(t)));
                let bc2_sqrt = F::from64((1.0 - h.beta2.powf(t)).sqrt());
                let f = F::from64;
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, 0.0);
                    s1[i] = f(h.beta1) * s1[i] + f(1.0 - h.beta1) * gi;
                    s2[i] = f(b3) * s2[i] + f(1.0 - b3) * gi;
                    s3[i] = f(h.beta2) * s3[i] + f(1.0 - h.beta2) * (gi * gi);
                    let d = s3[i].sqrt() / bc2_sqrt + c(h.eps);
                    let u = (s1[i] * inv_bc1 + f(alpha) * s2[i]) / d;
                    w[i] = if h.weight_decay != 0.0 {
                        w[i] - c(h.lr) * (u + c(h.weight_decay) * w[i])
                    } else {
                        w[i] - c(h.lr) * u
                    };
                }
            }
            OptimizerConfig::ScheduleFreeAdamW(h) => {
                // Defazio et al. (2024), as facebookresearch/schedule_free's AdamWScheduleFree,
                // with d = z − y for z: y ← y + c·d + γ(β(1−c) − 1)·u, d ← (1−c)·d − γβ(1−c)·u.
                let [c_, a, keep, step] = schedule_free(
                    &mut self.sums,
                    self.t,
                    h.lr,
                    h.warmup_steps,
                    h.r,
                    h.weight_lr_power,
                    h.beta1,
                );
                let bc2 = F::from64(1.0 - h.beta2.powf(t));
                let (b2, one_minus_b2) = (F::from64(h.beta2), F::from64(1.0 - h.beta2));
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, 0.0);
                    s2[i] = b2 * s2[i] + one_minus_b2 * (gi * gi);
                    let mut u = gi / ((s2[i] / bc2).sqrt() + c(h.eps));
                    if h.weight_decay != 0.0 {
                        u = u + c(h.weight_decay) * w[i];
                    }
                    w[i] = w[i] + F::from64(c_) * s1[i] + F::from64(a) * u;
                    s1[i] = F::from64(keep) * s1[i] - F::from64(step) * u;
                }
            }
            OptimizerConfig::ScheduleFreeSgd(h) => {
                // As above, SGDScheduleFree: u = g + λ·y.
                let [c_, a, keep, step] = schedule_free(
                    &mut self.sums,
                    self.t,
                    h.lr,
                    h.warmup_steps,
                    h.r,
                    h.weight_lr_power,
                    h.momentum,
                );
                for i in 0..w.len() {
                    let u = prep(g[i], w[i], h.maximize, h.weight_decay);
                    w[i] = w[i] + F::from64(c_) * s1[i] + F::from64(a) * u;
                    s1[i] = F::from64(keep) * s1[i] - F::from64(step) * u;
                }
            }
            OptimizerConfig::Lamb(h) => {
                // You et al. (2020), "Large Batch Optimization for Deep Learning: Training BERT
                // in 76 minutes", Algorithm 2, with timm's conventions: u = m̂/(√v̂ + ε) + λw,
                // r = ‖w‖/‖u‖ (1 where a norm is 0), only for decayed tensors by default.
                let (bc1, bc2) = if h.bias_correction {
                    (1.0 - h.beta1.powf(t), 1.0 - h.beta2.powf(t))
                } else {
                    (1.0, 1.0)
                };
                let mut u = vec![F::from64(0.0); w.len()];
                for i in 0..w.len() {
                    let gi = prep(g[i], w[i], h.maximize, 0.0);
                    s1[i] = F::from64(h.beta1) * s1[i] + F::from64(1.0 - h.beta1) * gi;
                    s2[i] = F::from64(h.beta2) * s2[i] + F::from64(1.0 - h.beta2) * (gi * gi);
                    let m_hat = s1[i] * F::from64(1.0 / bc1);
                    let sqrt_v_hat = s2[i].sqrt() * F::from64(1.0 / bc2.sqrt());
                    u[i] = m_hat / (sqrt_v_hat + c(h.eps));
                    if h.weight_decay != 0.0 {
                        u[i] = u[i] + c(h.weight_decay) * w[i];
                    }
                }
                let mut r = 1.0;
                if h.weight_decay != 0.0 || h.always_adapt {
                    let (wn, un) = (norm(w), norm(&u));
                    if wn > 0.0 && un > 0.0 {
                        r = wn / un;
                    }
                    if h.trust_clip {
                        r = r.min(1.0);
                    }
                }
                for i in 0..w.len() {
                    w[i] = w[i] - F::from64(h.lr as f64 * r) * u[i];
                }
            }
            OptimizerConfig::Lars(h) => {
                // You, Gitman and Ginsburg (2017), "Large Batch Training of Convolutional
                // Networks", Algorithm 1, with the learning rate outside the momentum (timm's
                // Lars, torch's SGD): r = η‖w‖/(‖g‖ + λ‖w‖ + ε), d = r(g + λw).
                let gs: Vec<F> = (0..w.len())
                    .map(|i| prep(g[i], w[i], h.maximize, 0.0))
                    .collect();
                let adapt = h.weight_decay != 0.0 || h.always_adapt;
                let mut r = 1.0;
                if adapt {
                    let (wn, gn) = (norm(w), norm(&gs));
                    if wn > 0.0 && gn > 0.0 {
                        let denom = gn + wn * h.weight_decay as f64 + h.eps as f64;
                        r = h.trust_coeff as f64 * wn / denom;
                    }
                    if h.trust_clip {
                        r = (r / h.lr as f64).min(1.0);
                    }
                }
                for i in 0..w.len() {
                    let d = if adapt {
                        F::from64(r) * (gs[i] + c(h.weight_decay) * w[i])
                    } else {
                        gs[i]
                    };
                    let step = if h.momentum > 0.0 {
                        let mu = c(h.momentum);
                        s1[i] = if self.t == 1 {
                            d
                        } else {
                            mu * s1[i] + F::from64(1.0 - h.dampening) * d
                        };
                        if h.nesterov { d + mu * s1[i] } else { s1[i] }
                    } else {
                        d
                    };
                    w[i] = w[i] - c(h.lr) * step;
                }
            }
            other => panic!("no reference for {other}"),
        }
    }
}

/// The Euclidean norm of `x`, in f64, with the additions in the order the crate documents for
/// its per-tensor norms (so that an f32 reference matches bit for bit): slices of 8192 elements
/// added in order, within a slice element `i` into accumulator `i % 8`, combined pairwise.
fn norm<F: Float>(x: &[F]) -> f64 {
    let mut total = 0.0;
    for slice in x.chunks(8192) {
        let mut acc = [0f64; 8];
        for (i, v) in slice.iter().enumerate() {
            acc[i % 8] += v.to64() * v.to64();
        }
        total += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
    total.sqrt()
}

/// The schedule-free averaging of step `t` (advancing `sums`, the largest learning rate and the
/// sum of weights): `[c, γ_k(β(1−c) − 1), 1 − c, γ_kβ(1 − c)]`.
fn schedule_free(
    sums: &mut [f64; 2],
    t: u64,
    lr: f32,
    warmup: u64,
    r: f64,
    power: f64,
    beta: f64,
) -> [f64; 4] {
    let sched = if t <= warmup {
        t as f64 / warmup as f64
    } else {
        1.0
    };
    let t = t as f64;
    let lr = lr as f64 * sched;
    sums[0] = sums[0].max(lr);
    let weight = t.powf(r) * sums[0].powf(power);
    sums[1] += weight;
    let c = if sums[1] == 0.0 {
        0.0
    } else {
        weight / sums[1]
    };
    [
        c,
        lr * (beta * (1.0 - c) - 1.0),
        1.0 - c,
        lr * beta * (1.0 - c),
    ]
}

#[path = "../../examples/common/locked.rs"]
mod locked;
#[allow(unused_imports)]
pub use locked::Locked;
