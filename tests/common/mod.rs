//! Shared helpers for the integration tests: a seeded generator, optimizer construction by kind,
//! thread pools, and plain reference implementations written from the update rules alone
//! (independently of the crate's kernels).
#![allow(dead_code)]

use fusedopt::*;

/// Every optimizer kind, for tests that sweep all six.
pub const KINDS: [Kind; 6] = [
    Kind::Sgd,
    Kind::Momentum,
    Kind::Nag,
    Kind::AdaGrad,
    Kind::RmsProp,
    Kind::Adam,
];

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Sgd,
    Momentum,
    Nag,
    AdaGrad,
    RmsProp,
    Adam,
}

/// Hyperparameters in one bag; each optimizer reads the ones it has.
#[derive(Debug, Clone, Copy)]
pub struct Hp {
    pub lr: f32,
    pub momentum: f32,
    pub decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub maximize: bool,
    /// Adam only: AdamW's decoupled weight decay.
    pub decoupled: bool,
    /// Adam only.
    pub amsgrad: bool,
    /// Adam only: `EpsMode::PyTorch`.
    pub torch_eps: bool,
}

impl Hp {
    /// The documented defaults of `kind`.
    pub fn defaults(kind: Kind) -> Hp {
        Hp {
            lr: if kind == Kind::Adam { 0.001 } else { 0.01 },
            momentum: 0.9,
            decay: 0.9,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-7,
            weight_decay: 0.0,
            maximize: false,
            decoupled: false,
            amsgrad: false,
            torch_eps: false,
        }
    }

    /// A non-default set, far from the defaults.
    pub fn unusual() -> Hp {
        Hp {
            lr: 0.037,
            momentum: 0.5,
            decay: 0.7,
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-3,
            weight_decay: 0.0,
            maximize: false,
            decoupled: false,
            amsgrad: false,
            torch_eps: false,
        }
    }
}

pub fn make(kind: Kind, hp: Hp) -> Box<dyn Optimizer> {
    let (lr, weight_decay, maximize) = (hp.lr, hp.weight_decay, hp.maximize);
    match kind {
        Kind::Sgd => Box::new(Sgd::new(SgdConfig {
            lr,
            weight_decay,
            maximize,
        })),
        Kind::Momentum => Box::new(Momentum::new(MomentumConfig {
            lr,
            momentum: hp.momentum,
            weight_decay,
            maximize,
        })),
        Kind::Nag => Box::new(Nag::new(NagConfig {
            lr,
            momentum: hp.momentum,
            weight_decay,
            maximize,
        })),
        Kind::AdaGrad => Box::new(AdaGrad::new(AdaGradConfig {
            lr,
            eps: hp.eps,
            weight_decay,
            maximize,
        })),
        Kind::RmsProp => Box::new(RmsProp::new(RmsPropConfig {
            lr,
            decay_rate: hp.decay,
            eps: hp.eps,
            weight_decay,
            maximize,
        })),
        Kind::Adam => Box::new(Adam::new(AdamConfig {
            lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay,
            maximize,
            decoupled_weight_decay: hp.decoupled,
            amsgrad: hp.amsgrad,
            eps_mode: if hp.torch_eps {
                EpsMode::PyTorch
            } else {
                EpsMode::Seed
            },
        })),
    }
}

pub fn make_default(kind: Kind) -> Box<dyn Optimizer> {
    make(kind, Hp::defaults(kind))
}

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
    pub kind: Kind,
    pub hp: Hp,
    pub t: u64,
    pub s1: Vec<F>,
    pub s2: Vec<F>,
    /// AMSGrad's running maximum of `s2`.
    pub s3: Vec<F>,
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
    pub fn new(kind: Kind, hp: Hp, n: usize) -> Self {
        let zero = F::from64(0.0);
        Reference {
            kind,
            hp,
            t: 0,
            s1: vec![zero; n],
            s2: vec![zero; n],
            s3: vec![zero; n],
        }
    }

    pub fn step(&mut self, w: &mut [F], g: &[F]) {
        let hp = self.hp;
        let c = |x: f32| F::from64(x as f64);
        let (lr, mu, eps) = (c(hp.lr), c(hp.momentum), c(hp.eps));
        self.t += 1;
        let t = self.t as f64;
        let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
        let lr_t = F::from64(hp.lr as f64 * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t)));
        let one_minus_b1 = F::from64(1.0 - b1);
        let one_minus_b2 = F::from64(1.0 - b2);
        let rho = c(hp.decay);
        let one_minus_rho = F::from64(1.0 - hp.decay as f64);
        let wd = c(hp.weight_decay);
        let adamw = self.kind == Kind::Adam && hp.decoupled;
        let w_decay = F::from64(1.0 - hp.lr as f64 * hp.weight_decay as f64);
        let bc1 = 1.0 - b1.powf(t);
        let bc2_sqrt = (1.0 - b2.powf(t)).sqrt();
        for i in 0..w.len() {
            // Gradient transforms: negate, then the L2 term (skipped at 0, as documented).
            let mut gi = g[i];
            if hp.maximize {
                gi = gi.neg();
            }
            if hp.weight_decay != 0.0 && !adamw {
                gi = gi + wd * w[i];
            }
            if adamw && hp.weight_decay != 0.0 {
                w[i] = w[i] * w_decay;
            }
            match self.kind {
                Kind::Sgd => w[i] = w[i] - lr * gi,
                Kind::Momentum => {
                    let v = mu * self.s1[i] - lr * gi;
                    self.s1[i] = v;
                    w[i] = w[i] + v;
                }
                Kind::Nag => {
                    let v = mu * self.s1[i] - lr * gi;
                    self.s1[i] = v;
                    w[i] = w[i] + mu * v - lr * gi;
                }
                Kind::AdaGrad => {
                    let h = self.s1[i] + gi * gi;
                    self.s1[i] = h;
                    w[i] = w[i] - lr * gi / (h.sqrt() + eps);
                }
                Kind::RmsProp => {
                    let h = rho * self.s1[i] + one_minus_rho * (gi * gi);
                    self.s1[i] = h;
                    w[i] = w[i] - lr * gi / (h.sqrt() + eps);
                }
                Kind::Adam => {
                    let m = self.s1[i] + one_minus_b1 * (gi - self.s1[i]);
                    let v = self.s2[i] + one_minus_b2 * (gi * gi - self.s2[i]);
                    self.s1[i] = m;
                    self.s2[i] = v;
                    let mut v_used = v;
                    if hp.amsgrad {
                        // max(v_max, v), a NaN in v winning.
                        if !self.s3[i].gt(v) {
                            self.s3[i] = v;
                        }
                        v_used = self.s3[i];
                    }
                    if hp.torch_eps {
                        let denom = v_used.sqrt() / F::from64(bc2_sqrt) + eps;
                        w[i] = w[i] - F::from64(hp.lr as f64 / bc1) * (m / denom);
                    } else {
                        w[i] = w[i] - lr_t * m / (v_used.sqrt() + eps);
                    }
                }
            }
        }
    }
}
