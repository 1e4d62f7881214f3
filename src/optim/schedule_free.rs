//! Schedule-free AdamW and SGD (Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky 2024, "The
//! Road Less Scheduled"), with the semantics of `facebookresearch/schedule_free`
//! (`AdamWScheduleFree`, `SGDScheduleFree`): gradients are taken at `y = (1−β)·z + β·x`, the
//! base iterate `z` takes plain steps, and `x` averages the `z`s with weights `c_{k+1}`.
//!
//! At step `k + 1` (`k` steps applied before it) with base learning rate `γ`:
//! `γ_k = γ·min(1, (k+1)/warmup_steps)`, `γ_max = max(γ_max, γ_k)`,
//! `w_k = (k+1)^r·γ_max^p`, `W = W + w_k`, `c = w_k/W` (0 while `W` is 0), then for every
//! parameter, with `u` the step direction (AdamW: `g/(√(v/(1−β2^(k+1))) + ε) + λ·y`, `v` the
//! second moment; SGD: `g + λ·y`):
//!
//! `y ← (1 − c)·y + c·z + γ_k·(β·(1 − c) − 1)·u;   z ← z − γ_k·u`.
//!
//! The engine keeps `d = z − y` instead of `z` (which starts at 0, is small next to the
//! weights, and keeps its precision in bf16 and 8-bit state): `y ← y + c·d + γ_k·(β·(1−c) − 1)·u`
//! and `d ← (1 − c)·d − γ_k·β·(1 − c)·u`, the same iterates in exact arithmetic.
//! [`eval`](crate::Optimizer::eval) sets the weights to `x = y − ((1−β)/β)·d` and
//! [`train`](crate::Optimizer::train) back to `y = x + ((1−β)/β)·d`.
//!
//! `k`, `γ_max` and `W` are the optimizer's, as the reference keeps them per parameter group:
//! every applied step advances them, tensors without a gradient included, and `c` comes from
//! the optimizer's learning rate (a group's `lr_scale` scales its `γ_k`, not its average's
//! weights: with constant scales, the same `c`).

use super::{Fused, StateBuffer, check, check_eps, check_lr, check_weight_decay, config_fields};
use super::{check_unit, sealed::RuleImpl};
use crate::engine::{CommonConfig, StepRunner, Sums};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// Schedule-free AdamW (`AdamWScheduleFree` of `facebookresearch/schedule_free`): Adam's
/// normalised gradient, without its first moment (the averaging replaces it), and no learning
/// rate schedule (a linear warm-up at most). Two state buffers (`d = z − y`, `v`), one pass.
/// Call [`eval`](crate::Optimizer::eval) before evaluating or saving the model and
/// [`train`](crate::Optimizer::train) before the next step.
///
/// ```
/// use fusedopt::{Optimizer, ScheduleFreeAdamW, ScheduleFreeAdamWConfig};
/// let mut opt = ScheduleFreeAdamW::new(ScheduleFreeAdamWConfig { lr: 0.1, ..Default::default() });
/// let mut w = [1.0f32];
/// opt.step(&mut w, &[2.0])?;
/// // Step 1: c = 1, u = 2/(2 + 1e-8) ≈ 1: y = z = 1 − 0.1·u; the average x is z too.
/// assert!((w[0] - 0.9).abs() < 1e-6);
/// opt.eval(&mut [&mut w])?;
/// assert!((w[0] - 0.9).abs() < 1e-6);
/// # Ok::<(), fusedopt::StepError>(())
/// ```
pub type ScheduleFreeAdamW = Fused<ScheduleFreeAdamWConfig>;

/// Schedule-free SGD (`SGDScheduleFree` of `facebookresearch/schedule_free`): plain gradient
/// steps for `z`, the interpolation `momentum` playing β. One state buffer (`d = z − y`), one
/// pass.
///
/// ```
/// use fusedopt::{Optimizer, ScheduleFreeSgd, ScheduleFreeSgdConfig};
/// let mut opt = ScheduleFreeSgd::new(ScheduleFreeSgdConfig { lr: 0.5, ..Default::default() });
/// let mut w = [1.0f32];
/// opt.step(&mut w, &[1.0])?; // c = 1: y = z = 1 − 0.5
/// assert_eq!(w, [0.5]);
/// opt.step(&mut w, &[1.0])?; // c = 1/2, d = 0: y = 0.5 + 0.5·(0.9·0.5 − 1) = 0.225
/// assert!((w[0] - 0.225).abs() < 1e-6);
/// # Ok::<(), fusedopt::StepError>(())
/// ```
pub type ScheduleFreeSgd = Fused<ScheduleFreeSgdConfig>;

/// Hyperparameters of [`ScheduleFreeAdamW`]: the reference implementation's defaults.
///
/// ```
/// let c = fusedopt::ScheduleFreeAdamWConfig::default();
/// assert_eq!((c.lr, c.beta1, c.beta2, c.eps, c.weight_decay), (0.0025, 0.9, 0.999, 1e-8, 0.0));
/// assert_eq!((c.warmup_steps, c.r, c.weight_lr_power), (0, 0.0, 2.0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleFreeAdamWConfig {
    /// Base learning rate γ (default 0.0025). Finite and `>= 0`.
    pub lr: f32,
    /// Interpolation β between the average `x` and the iterate `z` (default 0.9), in `(0, 1]`.
    /// Kept in `f64`, as given.
    pub beta1: f64,
    /// Decay β2 of the second moment (default 0.999), in `[0, 1)`; `f64`.
    pub beta2: f64,
    /// Added to the bias-corrected `√v` (default 1e-8). Finite and `>= 0`.
    pub eps: f32,
    /// Weight decay λ, taken at `y` and added to the normalised gradient (default 0). Finite
    /// and `>= 0`.
    pub weight_decay: f32,
    /// Length of the linear learning-rate warm-up, in steps (default 0: none).
    pub warmup_steps: u64,
    /// Power `r` of the step in the averaging weights `(k+1)^r·γ_max^p` (default 0). Finite.
    pub r: f64,
    /// Power `p` of the largest learning rate so far in the averaging weights (default 2).
    /// Finite and `>= 0`.
    pub weight_lr_power: f64,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
}

impl Default for ScheduleFreeAdamWConfig {
    fn default() -> Self {
        ScheduleFreeAdamWConfig {
            lr: 0.0025,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            r: 0.0,
            weight_lr_power: 2.0,
            maximize: false,
        }
    }
}

/// Hyperparameters of [`ScheduleFreeSgd`]: the reference implementation's defaults.
///
/// ```
/// let c = fusedopt::ScheduleFreeSgdConfig::default();
/// assert_eq!((c.lr, c.momentum, c.weight_decay), (1.0, 0.9, 0.0));
/// assert_eq!((c.warmup_steps, c.r, c.weight_lr_power), (0, 0.0, 2.0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleFreeSgdConfig {
    /// Base learning rate γ (default 1). Finite and `>= 0`.
    pub lr: f32,
    /// Interpolation β between the average `x` and the iterate `z` (default 0.9), in `(0, 1)`
    /// as the reference requires. Kept in `f64`, as given.
    pub momentum: f64,
    /// Weight decay λ, an L2 term taken at `y`: `g ← g + λ·y` (default 0). Finite and `>= 0`.
    pub weight_decay: f32,
    /// Length of the linear learning-rate warm-up, in steps (default 0: none).
    pub warmup_steps: u64,
    /// Power `r` of the step in the averaging weights (default 0). Finite.
    pub r: f64,
    /// Power `p` of the largest learning rate so far in the averaging weights (default 2).
    /// Finite and `>= 0`.
    pub weight_lr_power: f64,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
}

impl Default for ScheduleFreeSgdConfig {
    fn default() -> Self {
        ScheduleFreeSgdConfig {
            lr: 1.0,
            momentum: 0.9,
            weight_decay: 0.0,
            warmup_steps: 0,
            r: 0.0,
            weight_lr_power: 2.0,
            maximize: false,
        }
    }
}

/// Checks the averaging's hyperparameters.
fn check_averaging(name: &'static str, r: f64, power: f64) -> Result<(), StepError> {
    check(name, "r", r as f32, r.is_finite(), "finite")?;
    let ok = power.is_finite() && power >= 0.0;
    check(name, "weight_lr_power", power as f32, ok, "finite and >= 0")
}

impl ScheduleFreeAdamWConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::ScheduleFreeAdamWConfig;
    /// assert!(ScheduleFreeAdamWConfig::default().validate().is_ok());
    /// let err = ScheduleFreeAdamWConfig { beta1: 0.0, ..Default::default() }.validate().unwrap_err();
    /// assert_eq!(err.to_string(), "adamw_schedulefree: beta1 = 0 is invalid, expected in (0, 1]");
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        let b = self.beta1;
        check(Self::NAME, "beta1", b as f32, b > 0.0 && b <= 1.0, "in (0, 1]")?;
        check_unit(Self::NAME, "beta2", self.beta2, false)?;
        check_eps(Self::NAME, self.eps)?;
        check_weight_decay(Self::NAME, self.weight_decay)?;
        check_averaging(Self::NAME, self.r, self.weight_lr_power)
    }
}

impl ScheduleFreeSgdConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::ScheduleFreeSgdConfig;
    /// assert!(ScheduleFreeSgdConfig::default().validate().is_ok());
    /// let err = ScheduleFreeSgdConfig { momentum: 1.0, ..Default::default() }.validate().unwrap_err();
    /// assert_eq!(err.to_string(), "sgd_schedulefree: momentum = 1 is invalid, expected in (0, 1)");
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        let m = self.momentum;
        check(Self::NAME, "momentum", m as f32, m > 0.0 && m < 1.0, "in (0, 1)")?;
        check_weight_decay(Self::NAME, self.weight_decay)?;
        check_averaging(Self::NAME, self.r, self.weight_lr_power)
    }
}

/// The averaging of one step: its learning rate's warm-up factor, the weight `c` of the new
/// iterate in the average, and the running values `[k, γ_max, W]` after it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Averaging {
    /// `min(1, (k+1)/warmup_steps)`.
    sched: f64,
    /// `c = w_k / W`, 0 while `W` is 0.
    c: f64,
    /// `[k, γ_max, W]` after the step.
    sums: Sums,
}

/// The averaging of the step after `k` others, from the running values `[k, γ_max, W]` before
/// it (all start at 0: `max(γ, 0) = max(γ, −1)`, the reference's start, for `γ >= 0`).
fn averaging(lr: f32, warmup: u64, r: f64, power: f64, [k, lr_max, sum]: Sums) -> Averaging {
    let t = k + 1.0;
    let sched = if k < warmup as f64 { t / warmup as f64 } else { 1.0 };
    let lr_max = lr_max.max(f64::from(lr) * sched);
    let weight = t.powf(r) * lr_max.powf(power);
    let sum = sum + weight;
    let c = if sum == 0.0 { 0.0 } else { weight / sum };
    Averaging {
        sched,
        c,
        sums: [t, lr_max, sum],
    }
}

/// The coefficients both kernels share, for a group learning rate `lr` scheduled by `a.sched`
/// and interpolation `beta`: `(c, γ_k·(β(1−c) − 1), 1 − c, γ_k·β·(1 − c))`, each rounded once.
fn interpolation(a: Averaging, lr: f32, beta: f64) -> [f32; 4] {
    let lr = f64::from(lr) * a.sched;
    let keep = 1.0 - a.c;
    [
        a.c as f32,
        (lr * (beta * keep - 1.0)) as f32,
        keep as f32,
        (lr * beta * keep) as f32,
    ]
}

/// Per-step scalars of schedule-free AdamW.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScheduleFreeAdamWStep {
    beta2: f32,
    one_minus_beta2: f32,
    /// `1 − β2^(k+1)`.
    bias2: f32,
    eps: f32,
    weight_decay: f32,
    decay: bool,
    /// `[c, γ_k·(β(1−c) − 1), 1 − c, γ_k·β·(1 − c)]`.
    mix: [f32; 4],
}

impl Kernel<2> for ScheduleFreeAdamWStep {
    #[inline(always)]
    fn update<V: Lane>(&self, y: V, g: V, [d, v]: &mut [V; 2]) -> V {
        let [c, a, keep, step] = self.mix.map(V::splat);
        *v = V::splat(self.beta2) * *v + V::splat(self.one_minus_beta2) * (g * g);
        let u = g / ((*v / V::splat(self.bias2)).sqrt() + V::splat(self.eps));
        let u = if self.decay {
            u + V::splat(self.weight_decay) * y
        } else {
            u
        };
        let y = y + c * *d + a * u;
        *d = keep * *d - step * u;
        y
    }
}

/// Per-step scalars of schedule-free SGD (the L2 term is the engine's).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScheduleFreeSgdStep {
    /// As [`ScheduleFreeAdamWStep::mix`].
    mix: [f32; 4],
}

impl Kernel<1> for ScheduleFreeSgdStep {
    #[inline(always)]
    fn update<V: Lane>(&self, y: V, g: V, [d]: &mut [V; 1]) -> V {
        let [c, a, keep, step] = self.mix.map(V::splat);
        let y = y + c * *d + a * g;
        *d = keep * *d - step * g;
        y
    }
}

impl RuleImpl for ScheduleFreeAdamWConfig {
    const NAME: &'static str = "adamw_schedulefree";
    const BUFFERS: &'static [StateBuffer] =
        &[StateBuffer::signed("d"), StateBuffer::unsigned("v")];
    const SUMS: &'static [&'static str] = &["k", "lr_max", "weight_sum"];
    config_fields!(
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        warmup_steps,
        r,
        weight_lr_power,
        maximize
    );
    fn advance(&self, sums: &mut Sums) {
        let (lr, w, r, p) = (self.lr, self.warmup_steps, self.r, self.weight_lr_power);
        *sums = averaging(lr, w, r, p, *sums).sums;
    }
    fn eval_shift(&self) -> Option<(usize, f64)> {
        Some((0, 1.0 - 1.0 / self.beta1))
    }
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let (lr, w, r, p) = (self.lr, self.warmup_steps, self.r, self.weight_lr_power);
        let avg = averaging(lr, w, r, p, x.clock());
        let bias2 = (1.0 - self.beta2.powf(avg.sums[0])) as f32;
        let common = CommonConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            maximize: self.maximize,
            l2_decay: false,
        };
        x.run(common, |h| ScheduleFreeAdamWStep {
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            bias2,
            eps: self.eps,
            weight_decay: h.weight_decay,
            decay: h.weight_decay != 0.0,
            mix: interpolation(avg, h.lr, self.beta1),
        })
    }
}

impl RuleImpl for ScheduleFreeSgdConfig {
    const NAME: &'static str = "sgd_schedulefree";
    const BUFFERS: &'static [StateBuffer] = &[StateBuffer::signed("d")];
    const SUMS: &'static [&'static str] = &["k", "lr_max", "weight_sum"];
    config_fields!(
        lr,
        momentum,
        weight_decay,
        warmup_steps,
        r,
        weight_lr_power,
        maximize
    );
    fn advance(&self, sums: &mut Sums) {
        let (lr, w, r, p) = (self.lr, self.warmup_steps, self.r, self.weight_lr_power);
        *sums = averaging(lr, w, r, p, *sums).sums;
    }
    fn eval_shift(&self) -> Option<(usize, f64)> {
        Some((0, 1.0 - 1.0 / self.momentum))
    }
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let (lr, w, r, p) = (self.lr, self.warmup_steps, self.r, self.weight_lr_power);
        let avg = averaging(lr, w, r, p, x.clock());
        let common = CommonConfig::l2(self.lr, self.weight_decay, self.maximize);
        x.run(common, |h| ScheduleFreeSgdStep {
            mix: interpolation(avg, h.lr, self.momentum),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averaging_follows_the_reference() {
        // Constant γ, no warm-up, r = 0, p = 2: every weight is γ², so c = 1/(k+1).
        let mut sums = [0.0; 3];
        for k in 0..5 {
            let a = averaging(0.5, 0, 0.0, 2.0, sums);
            assert_eq!(a.sums[0], k as f64 + 1.0);
            assert_eq!(a.c, 1.0 / (k as f64 + 1.0));
            sums = a.sums;
        }
        // Warm-up over 4 steps: γ_k = γ·(k+1)/4, weights γ_k² (γ_max grows with it).
        let (mut sums, mut total) = ([0.0; 3], 0.0);
        for k in 0..6u64 {
            let a = averaging(2.0, 4, 0.0, 2.0, sums);
            let lr = 2.0 * ((k as f64 + 1.0) / 4.0).min(1.0);
            total += lr * lr;
            assert!((a.c - lr * lr / total).abs() < 1e-15, "{k}");
            sums = a.sums;
        }
        // γ = 0: W stays 0 and c is 0 (the reference's ZeroDivisionError branch).
        assert_eq!(averaging(0.0, 0, 0.0, 2.0, [0.0; 3]).c, 0.0);
        // A learning rate that drops keeps γ_max.
        let a = averaging(0.1, 0, 0.0, 1.0, [3.0, 1.0, 3.0]);
        assert_eq!(a.sums, [4.0, 1.0, 4.0]);
        assert_eq!(a.c, 0.25);
    }

    #[test]
    fn kernels_match_the_z_form() {
        // One SGD step from y = 1, z = 3 (d = 2) with c = 0.25, γ = 0.5, β = 0.8, g = 1:
        // y' = 0.75·1 + 0.25·3 + 0.5·(0.8·0.75 − 1)·1 = 1.3; z' = 3 − 0.5 = 2.5; d' = 1.2.
        let a = Averaging {
            sched: 1.0,
            c: 0.25,
            sums: [0.0; 3],
        };
        let k = ScheduleFreeSgdStep {
            mix: interpolation(a, 0.5, 0.8),
        };
        let mut d = [2.0f32];
        let y = k.update(1.0f32, 1.0, &mut d);
        assert!((y - 1.3).abs() < 1e-6 && (d[0] - 1.2).abs() < 1e-6, "{y} {d:?}");
        let y = k.update(1.0f32, f32::NAN, &mut [0.0]);
        assert!(y.is_nan(), "a NaN gradient must reach the weight");
    }
}
