//! Adamax (Kingma & Ba 2015, §7.1), as `torch.optim.Adamax`: `m ← m + (1−β1)(g − m);
//! u ← max(β2·u, |g| + ε); w ← w − (lr/(1−β1ᵗ))·m/u`.

use super::{
    Fused, StateBuffer, check_eps, check_lr, check_unit, check_weight_decay, config_fields,
    sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// Adamax, Adam's variant with an infinity-norm second moment, as `torch.optim.Adamax`:
///
/// `t ← t+1;  m ← m + (1−β1)(g − m);  u ← max(β2·u, |g| + ε);  w ← w − (lr/(1−β1ᵗ))·m/u`,
///
/// with `m` and `u` starting at zero. Weight decay is an L2 term on the gradient, as torch's.
/// Two state buffers (`m`, `u`), one pass.
///
/// ```
/// use fusedopt::{Adamax, AdamaxConfig, Optimizer};
/// let mut opt = Adamax::new(AdamaxConfig { lr: 0.1, eps: 0.0, ..Default::default() });
/// let mut w = [1.0f32, 1.0];
/// opt.step(&mut w, &[3.0, -0.5])?;
/// // The first step moves every weight by lr against its gradient's sign.
/// assert!((w[0] - 0.9).abs() < 1e-6 && (w[1] - 1.1).abs() < 1e-6);
/// # Ok::<(), fusedopt::StepError>(())
/// ```
pub type Adamax = Fused<AdamaxConfig>;

/// Hyperparameters of [`Adamax`]: `torch.optim.Adamax`'s defaults.
///
/// ```
/// let c = fusedopt::AdamaxConfig::default();
/// assert_eq!((c.lr, c.beta1, c.beta2, c.eps), (2e-3, 0.9, 0.999, 1e-8));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamaxConfig {
    /// Learning rate (default 2e-3). Finite and `>= 0`.
    pub lr: f32,
    /// Decay β1 of the first moment (default 0.9), in `[0, 1)`. Kept in `f64`, as given.
    pub beta1: f64,
    /// Decay β2 of the infinity norm (default 0.999), in `[0, 1)`; `f64`, as `beta1`.
    pub beta2: f64,
    /// Added to `|g|` inside the maximum (default 1e-8). Finite and `>= 0`.
    pub eps: f32,
    /// L2 weight decay (default 0): `g ← g + weight_decay·w`, after `maximize`. Finite and `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
}

impl Default for AdamaxConfig {
    fn default() -> Self {
        AdamaxConfig {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

impl AdamaxConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::AdamaxConfig;
    /// assert!(AdamaxConfig::default().validate().is_ok());
    /// assert!(AdamaxConfig { beta1: 1.0, ..Default::default() }.validate().is_err());
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

/// Per-step scalars of Adamax at step `t`, computed in f64 and rounded once to f32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamaxStep {
    /// `lr/(1−β1ᵗ)`.
    step_size: f32,
    one_minus_beta1: f32,
    beta2: f32,
    eps: f32,
}

impl AdamaxStep {
    /// The scalars of step `t` for a parameter group with learning rate `lr`.
    pub(crate) fn new(c: &AdamaxConfig, t: u64, lr: f32) -> Self {
        AdamaxStep {
            step_size: (f64::from(lr) / (1.0 - c.beta1.powf(t as f64))) as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            eps: c.eps,
        }
    }
}

impl Kernel<2> for AdamaxStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [m, u]: &mut [V; 2]) -> V {
        *m = *m + V::splat(self.one_minus_beta1) * (g - *m);
        // `Lane::max` returns its argument when that is NaN: a NaN gradient reaches `u`.
        *u = (V::splat(self.beta2) * *u).max(g.abs() + V::splat(self.eps));
        w - V::splat(self.step_size) * (*m / *u)
    }
}

impl RuleImpl for AdamaxConfig {
    const NAME: &'static str = "adamax";
    const BUFFERS: &'static [StateBuffer] = &[StateBuffer::signed("m"), StateBuffer::unsigned("u")];
    config_fields!(lr, beta1, beta2, eps, weight_decay, maximize);
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig::l2(self.lr, self.weight_decay, self.maximize);
        x.run(common, |h| AdamaxStep::new(self, h.t, h.lr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_formula() {
        let k = AdamaxStep {
            step_size: 0.5,
            one_minus_beta1: 0.5,
            beta2: 0.5,
            eps: 0.25,
        };
        let mut s = [1.0f32, 8.0];
        // m = 1 + 0.5·(3 − 1) = 2; u = max(4, 3.25) = 4; w = 2 − 0.5·(2/4).
        let w = k.update(2.0f32, -3.0 + 6.0, &mut s);
        assert_eq!((s, w), ([2.0, 4.0], 1.75));
        let mut s = [0.0f32, 1.0];
        k.update(0.0f32, -6.0, &mut s); // |g| + ε wins
        assert_eq!(s[1], 6.25);
        let mut s = [0.0f32, 1.0];
        let w = k.update(0.0f32, f32::NAN, &mut s);
        assert!(s[1].is_nan() && w.is_nan());
    }

    #[test]
    fn bias_correction_uses_the_tensors_step() {
        let c = AdamaxConfig::default();
        let k = AdamaxStep::new(&c, 3, 0.002);
        assert_eq!(k.step_size, (f64::from(0.002f32) / (1.0 - 0.9f64.powi(3))) as f32);
    }
}
