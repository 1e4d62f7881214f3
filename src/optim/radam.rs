//! RAdam (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond",
//! Algorithm 2), as `torch.optim.RAdam`: Adam whose adaptive step is rectified by `r_t` once the
//! variance of its estimate is tractable (`ρ_t > 5`), plain momentum SGD before.

use super::{
    Fused, StateBuffer, check_eps, check_lr, check_unit, check_weight_decay, config_fields,
    sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// RAdam, rectified Adam, as `torch.optim.RAdam`:
///
/// `m ← m + (1−β1)(g − m);  v ← β2·v + (1−β2)·g²;  ρ∞ = 2/(1−β2) − 1;
/// ρ_t = ρ∞ − 2t·β2ᵗ/(1−β2ᵗ)`; then, when `ρ_t > 5`,
/// `r_t = √((ρ_t−4)(ρ_t−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρ_t))` and
/// `w ← w − lr·r_t·√(1−β2ᵗ)/(1−β1ᵗ) · m/(√v + ε)`, otherwise `w ← w − lr/(1−β1ᵗ) · m`.
///
/// `m` and `v` start at zero; the scalars come from each tensor's own step `t`, in f64. Weight
/// decay is an L2 term, or decoupled (`w ← w·(1 − lr·λ)` first) with
/// [`decoupled_weight_decay`](RAdamConfig::decoupled_weight_decay). Two state buffers, one pass.
///
/// ```
/// use fusedopt::{Optimizer, RAdam, RAdamConfig};
/// let mut opt = RAdam::new(RAdamConfig { lr: 0.1, ..Default::default() });
/// let mut w = [1.0f32];
/// opt.step(&mut w, &[2.0])?;
/// // Step 1 is unrectified: w − lr·m/(1 − β1) = w − lr·g.
/// assert!((w[0] - 0.8).abs() < 1e-6);
/// # Ok::<(), fusedopt::StepError>(())
/// ```
pub type RAdam = Fused<RAdamConfig>;

/// Hyperparameters of [`RAdam`]: `torch.optim.RAdam`'s defaults.
///
/// ```
/// let c = fusedopt::RAdamConfig::default();
/// assert_eq!((c.lr, c.beta1, c.beta2, c.eps), (1e-3, 0.9, 0.999, 1e-8));
/// assert!(!c.decoupled_weight_decay);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RAdamConfig {
    /// Learning rate (default 1e-3). Finite and `>= 0`.
    pub lr: f32,
    /// Decay β1 of the first moment (default 0.9), in `[0, 1)`. Kept in `f64`, as given.
    pub beta1: f64,
    /// Decay β2 of the second moment (default 0.999), in `[0, 1)`; `f64`, as `beta1`.
    pub beta2: f64,
    /// Added to `√v` in the denominator (default 1e-8). Finite and `>= 0`.
    pub eps: f32,
    /// Weight decay (default 0): an L2 term `g ← g + weight_decay·w` after `maximize`, or
    /// decoupled. Finite and `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
    /// Decoupled weight decay (default false), torch's `decoupled_weight_decay`:
    /// `w ← w·(1 − lr·weight_decay)` before the update, instead of the L2 term.
    pub decoupled_weight_decay: bool,
}

impl Default for RAdamConfig {
    fn default() -> Self {
        RAdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            maximize: false,
            decoupled_weight_decay: false,
        }
    }
}

impl RAdamConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::RAdamConfig;
    /// assert!(RAdamConfig::default().validate().is_ok());
    /// assert!(RAdamConfig { beta2: 1.0, ..Default::default() }.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        check_unit(Self::NAME, "beta1", self.beta1, false)?;
        check_unit(Self::NAME, "beta2", self.beta2, false)?;
        check_eps(Self::NAME, self.eps)?;
        check_weight_decay(Self::NAME, self.weight_decay)
    }
}

/// Per-step scalars of RAdam at step `t`, computed in f64 and rounded once to f32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RAdamStep {
    /// `lr·r_t·√(1−β2ᵗ)/(1−β1ᵗ)` when rectified, `lr/(1−β1ᵗ)` otherwise.
    step_size: f32,
    /// Whether `ρ_t > 5`: the step divides by `√v + ε`.
    rectified: bool,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    /// `1 − lr·wd`, applied when `decoupled`.
    w_decay: f32,
    decoupled: bool,
}

impl RAdamStep {
    /// The scalars of step `t` for a parameter group with learning rate `lr` and weight decay
    /// `wd`.
    pub(crate) fn new(c: &RAdamConfig, t: u64, lr: f32, wd: f32) -> Self {
        let (b1, b2, lr, t) = (c.beta1, c.beta2, f64::from(lr), t as f64);
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        let rho_inf = 2.0 / (1.0 - b2) - 1.0;
        let rho_t = rho_inf - 2.0 * t * b2.powf(t) / bc2;
        let rectified = rho_t > 5.0;
        let step_size = if rectified {
            let r = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                .sqrt();
            lr * r * bc2.sqrt() / bc1
        } else {
            lr / bc1
        };
        RAdamStep {
            step_size: step_size as f32,
            rectified,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: c.eps,
            w_decay: (1.0 - lr * f64::from(wd)) as f32,
            decoupled: c.decoupled_weight_decay && wd != 0.0,
        }
    }
}

impl Kernel<2> for RAdamStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [m, v]: &mut [V; 2]) -> V {
        *m = *m + V::splat(self.one_minus_beta1) * (g - *m);
        *v = V::splat(self.beta2) * *v + V::splat(self.one_minus_beta2) * (g * g);
        let w = if self.decoupled {
            w * V::splat(self.w_decay)
        } else {
            w
        };
        if self.rectified {
            w - V::splat(self.step_size) * *m / (v.sqrt() + V::splat(self.eps))
        } else {
            w - V::splat(self.step_size) * *m
        }
    }
}

impl RuleImpl for RAdamConfig {
    const NAME: &'static str = "radam";
    const BUFFERS: &'static [StateBuffer] = &[StateBuffer::signed("m"), StateBuffer::unsigned("v")];
    config_fields!(
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        maximize,
        decoupled_weight_decay
    );
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            maximize: self.maximize,
            l2_decay: !self.decoupled_weight_decay,
        };
        x.run(common, |h| RAdamStep::new(self, h.t, h.lr, h.weight_decay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rectification_starts_when_rho_exceeds_five() {
        let c = RAdamConfig::default();
        // With β2 = 0.999, ρ_t first exceeds 5 at step 6 (ρ_5 ≈ 4.99, ρ_6 ≈ 5.99).
        for t in 1..=5 {
            let k = RAdamStep::new(&c, t, 1.0, 0.0);
            assert!(!k.rectified, "step {t}");
            assert_eq!(k.step_size, (1.0 / (1.0 - 0.9f64.powi(t as i32))) as f32);
        }
        let k = RAdamStep::new(&c, 6, 1.0, 0.0);
        assert!(k.rectified);
        assert!(k.step_size > 0.0 && k.step_size < 1.0);
    }

    #[test]
    fn kernel_matches_formula() {
        let mut k = RAdamStep::new(&RAdamConfig::default(), 1, 1.0, 0.0);
        k = RAdamStep {
            step_size: 0.5,
            one_minus_beta1: 0.5,
            beta2: 0.5,
            one_minus_beta2: 0.5,
            eps: 0.0,
            ..k
        };
        let mut s = [1.0f32, 2.0];
        // m = 1 + 0.5·(3 − 1) = 2; v = 1 + 4.5 = 5.5; unrectified: w = 2 − 0.5·2.
        let w = k.update(2.0f32, 3.0, &mut s);
        assert_eq!((s, w), ([2.0, 5.5], 1.0));
        let k = RAdamStep {
            rectified: true,
            ..k
        };
        let mut s = [1.0f32, 2.0];
        let w = k.update(2.0f32, 3.0, &mut s);
        assert_eq!(w, 2.0 - 0.5 * 2.0 / 5.5f32.sqrt());
    }

    #[test]
    fn decoupled_decay_scales_the_weight_first() {
        let c = RAdamConfig {
            decoupled_weight_decay: true,
            ..Default::default()
        };
        let k = RAdamStep::new(&c, 1, 0.1, 0.5);
        assert!(k.decoupled);
        assert_eq!(k.update(2.0f32, 0.0, &mut [0.0; 2]), 2.0 * 0.95);
    }
}
