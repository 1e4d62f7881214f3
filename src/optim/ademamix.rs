//! AdEMAMix (Pagliardini, Ablin & Grangier 2024, "The AdEMAMix Optimizer: Better, Faster,
//! Older", Algorithm 1), as in bitsandbytes: Adam's fast EMA mixed with a slow one,
//! `w ← w − lr·((m̂1 + α·m2)/(√ν̂ + ε) + λ·w)`, with the warm-ups of `α` and `β3`.

use super::{
    Fused, StateBuffer, check, check_eps, check_lr, check_unit, check_weight_decay,
    config_fields, sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// AdEMAMix, as bitsandbytes' `AdEMAMix` (the paper's Algorithm 1):
///
/// `m1 ← β1·m1 + (1−β1)·g;  m2 ← β3_t·m2 + (1−β3_t)·g;  ν ← β2·ν + (1−β2)·g²;
/// w ← w − lr·((m1/(1−β1ᵗ) + α_t·m2) / (√ν/√(1−β2ᵗ) + ε) + λ·w)`,
///
/// with the three buffers starting at zero and, at a tensor's step `t`, the warm-ups
/// `α_t = min(t·α/T_α, α)` and
/// `β3_t = min(exp(ln β1·ln β3 / ((1 − t/T_β3)·ln β3 + (t/T_β3)·ln β1)), β3)` (none when
/// `T_α`, `T_β3` are 0). Weight decay λ is decoupled, as in the paper. Three state buffers, one
/// pass.
///
/// ```
/// use fusedopt::{AdEMAMix, AdEMAMixConfig, Optimizer};
/// let mut opt = AdEMAMix::new(AdEMAMixConfig { lr: 0.1, weight_decay: 0.0, ..Default::default() });
/// let mut w = [1.0f32];
/// opt.step(&mut w, &[2.0])?;
/// // Step 1: m̂1/√ν̂ = 1 and α·m2/√ν̂ = 5·1e-4·2/2: w = 1 − 0.1·(1 + 5e-4).
/// assert!((w[0] - (1.0 - 0.1 * 1.0005)).abs() < 1e-6);
/// # Ok::<(), fusedopt::StepError>(())
/// ```
pub type AdEMAMix = Fused<AdEMAMixConfig>;

/// Hyperparameters of [`AdEMAMix`]: bitsandbytes' defaults.
///
/// ```
/// let c = fusedopt::AdEMAMixConfig::default();
/// assert_eq!((c.lr, c.beta1, c.beta2, c.beta3, c.alpha), (1e-3, 0.9, 0.999, 0.9999, 5.0));
/// assert_eq!((c.t_alpha, c.t_beta3, c.eps, c.weight_decay), (0, 0, 1e-8, 1e-2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdEMAMixConfig {
    /// Learning rate (default 1e-3). Finite and `>= 0`.
    pub lr: f32,
    /// Decay β1 of the fast EMA (default 0.9), in `[0, 1)`. Kept in `f64`, as given.
    pub beta1: f64,
    /// Decay β2 of the second moment (default 0.999), in `[0, 1)`; `f64`.
    pub beta2: f64,
    /// Decay β3 of the slow EMA (default 0.9999), in `[0, 1]`; `f64`.
    pub beta3: f64,
    /// Weight α of the slow EMA (default 5). Finite and `>= 0`.
    pub alpha: f64,
    /// Warm-up length `T_α` of `α`, in steps (default 0: none): `α_t = min(t·α/T_α, α)`.
    pub t_alpha: u64,
    /// Warm-up length `T_β3` of `β3`, in steps (default 0: none); with one, `β1` and `β3` must
    /// lie in `(0, 1)`.
    pub t_beta3: u64,
    /// Added to the bias-corrected `√ν̂` (default 1e-8). Finite and `>= 0`.
    pub eps: f32,
    /// Decoupled weight decay λ (default 1e-2): the update gains `λ·w`. Finite and `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
}

impl Default for AdEMAMixConfig {
    fn default() -> Self {
        AdEMAMixConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            beta3: 0.9999,
            alpha: 5.0,
            t_alpha: 0,
            t_beta3: 0,
            eps: 1e-8,
            weight_decay: 1e-2,
            maximize: false,
        }
    }
}

impl AdEMAMixConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::AdEMAMixConfig;
    /// assert!(AdEMAMixConfig::default().validate().is_ok());
    /// let warm = AdEMAMixConfig { t_beta3: 100, beta3: 1.0, ..Default::default() };
    /// assert!(warm.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        check_unit(Self::NAME, "beta1", self.beta1, false)?;
        check_unit(Self::NAME, "beta2", self.beta2, false)?;
        check_unit(Self::NAME, "beta3", self.beta3, true)?;
        let a = self.alpha;
        check(Self::NAME, "alpha", a as f32, a.is_finite() && a >= 0.0, "finite and >= 0")?;
        if self.t_beta3 != 0 {
            // The warm-up takes logarithms of both.
            let open = |b: f64| b > 0.0 && b < 1.0;
            let expected = "in (0, 1) with a t_beta3 warm-up";
            check(Self::NAME, "beta1", self.beta1 as f32, open(self.beta1), expected)?;
            check(Self::NAME, "beta3", self.beta3 as f32, open(self.beta3), expected)?;
        }
        check_eps(Self::NAME, self.eps)?;
        check_weight_decay(Self::NAME, self.weight_decay)
    }

    /// The weight `α_t` of the slow EMA at step `t`.
    ///
    /// ```
    /// let c = fusedopt::AdEMAMixConfig { t_alpha: 100, ..Default::default() };
    /// assert_eq!((c.alpha_at(10), c.alpha_at(100), c.alpha_at(1000)), (0.5, 5.0, 5.0));
    /// ```
    pub fn alpha_at(&self, t: u64) -> f64 {
        match self.t_alpha {
            0 => self.alpha,
            warm => (t as f64 * self.alpha / warm as f64).min(self.alpha),
        }
    }

    /// The decay `β3_t` of the slow EMA at step `t`: from `β1` at step 0 to `β3` at `T_β3`, with
    /// `1/ln β3_t` linear in `t`.
    ///
    /// ```
    /// let c = fusedopt::AdEMAMixConfig { t_beta3: 100, ..Default::default() };
    /// assert!((c.beta3_at(0) - 0.9).abs() < 1e-12); // β1 at the start
    /// assert!(c.beta3_at(1) > 0.99); // 1/ln β3_t grows fast from there
    /// assert!((c.beta3_at(100) - 0.9999).abs() < 1e-12 && c.beta3_at(200) == 0.9999);
    /// ```
    pub fn beta3_at(&self, t: u64) -> f64 {
        match self.t_beta3 {
            0 => self.beta3,
            warm => {
                let (ln1, ln3) = (self.beta1.ln(), self.beta3.ln());
                let s = t as f64 / warm as f64;
                (ln1 * ln3 / ((1.0 - s) * ln3 + s * ln1)).exp().min(self.beta3)
            }
        }
    }
}

/// Per-step scalars of AdEMAMix at step `t`, computed in f64 and rounded once to f32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdEMAMixStep {
    lr: f32,
    /// `1/(1−β1ᵗ)`.
    inv_bc1: f32,
    /// `√(1−β2ᵗ)`.
    bc2_sqrt: f32,
    alpha: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    beta3: f32,
    one_minus_beta3: f32,
    eps: f32,
    weight_decay: f32,
}

impl AdEMAMixStep {
    /// The scalars of step `t` for a parameter group with learning rate `lr` and weight decay
    /// `wd`.
    pub(crate) fn new(c: &AdEMAMixConfig, t: u64, lr: f32, wd: f32) -> Self {
        let tf = t as f64;
        let beta3 = c.beta3_at(t);
        AdEMAMixStep {
            lr,
            inv_bc1: (1.0 / (1.0 - c.beta1.powf(tf))) as f32,
            bc2_sqrt: (1.0 - c.beta2.powf(tf)).sqrt() as f32,
            alpha: c.alpha_at(t) as f32,
            beta1: c.beta1 as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            beta3: beta3 as f32,
            one_minus_beta3: (1.0 - beta3) as f32,
            eps: c.eps,
            weight_decay: wd,
        }
    }
}

impl Kernel<3> for AdEMAMixStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [m1, m2, nu]: &mut [V; 3]) -> V {
        *m1 = V::splat(self.beta1) * *m1 + V::splat(self.one_minus_beta1) * g;
        *m2 = V::splat(self.beta3) * *m2 + V::splat(self.one_minus_beta3) * g;
        *nu = V::splat(self.beta2) * *nu + V::splat(self.one_minus_beta2) * (g * g);
        let denom = nu.sqrt() / V::splat(self.bc2_sqrt) + V::splat(self.eps);
        let u = (*m1 * V::splat(self.inv_bc1) + V::splat(self.alpha) * *m2) / denom;
        // No decay term at 0 (so an infinite weight stays infinite, not 0·∞).
        if self.weight_decay != 0.0 {
            w - V::splat(self.lr) * (u + V::splat(self.weight_decay) * w)
        } else {
            w - V::splat(self.lr) * u
        }
    }
}

impl RuleImpl for AdEMAMixConfig {
    const NAME: &'static str = "ademamix";
    const BUFFERS: &'static [StateBuffer] = &[
        StateBuffer::signed("m1"),
        StateBuffer::signed("m2"),
        StateBuffer::unsigned("nu"),
    ];
    config_fields!(
        lr,
        beta1,
        beta2,
        beta3,
        alpha,
        t_alpha,
        t_beta3,
        eps,
        weight_decay,
        maximize
    );
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            maximize: self.maximize,
            l2_decay: false,
        };
        x.run(common, |h| AdEMAMixStep::new(self, h.t, h.lr, h.weight_decay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_formula() {
        let k = AdEMAMixStep {
            lr: 0.5,
            inv_bc1: 2.0,
            bc2_sqrt: 0.5,
            alpha: 4.0,
            beta1: 0.5,
            one_minus_beta1: 0.5,
            beta2: 0.5,
            one_minus_beta2: 0.5,
            beta3: 0.75,
            one_minus_beta3: 0.25,
            eps: 0.0,
            weight_decay: 0.25,
        };
        let mut s = [1.0f32, 2.0, 1.0];
        // m1 = 0.5 + 1.5 = 2; m2 = 1.5 + 0.75 = 2.25; ν = 0.5 + 4.5 = 5; d = √5/0.5.
        let w = k.update(2.0f32, 3.0, &mut s);
        assert_eq!(s, [2.0, 2.25, 5.0]);
        let u = (2.0f32 * 2.0 + 4.0 * 2.25) / (5.0f32.sqrt() / 0.5);
        assert_eq!(w, 2.0 - 0.5 * (u + 0.25 * 2.0));
    }

    #[test]
    fn warm_ups_follow_the_paper() {
        let c = AdEMAMixConfig {
            t_alpha: 1000,
            t_beta3: 1000,
            ..Default::default()
        };
        assert_eq!(c.alpha_at(250), 1.25);
        // 1/ln β3_t interpolates linearly between 1/ln β1 and 1/ln β3.
        let inv = |b: f64| 1.0 / b.ln();
        let mid = inv(c.beta3_at(500));
        assert!((mid - 0.5 * (inv(0.9) + inv(0.9999))).abs() < 1e-9 * mid.abs());
        assert_eq!(c.beta3_at(5000), 0.9999);
        let k = AdEMAMixStep::new(&c, 500, 1e-3, 0.0);
        assert_eq!(k.one_minus_beta3, (1.0 - c.beta3_at(500)) as f32);
    }
}
