//! RMSProp: `h ← ρ·h + (1−ρ)·g²; w ← w − lr·g / (√h + ε)`.

use super::{
    Fused, StateBuffer, check_eps, check_lr, check_unit, check_weight_decay, config_fields,
    sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// RMSProp: `h ← ρ·h + (1−ρ)·g²; w ← w − lr·g / (√h + ε)`, with `h` starting at zero.
///
/// ```
/// use fusedopt::{Optimizer, RmsProp, RmsPropConfig};
/// let mut opt = RmsProp::new(RmsPropConfig {
///     lr: 0.1,
///     decay_rate: 0.75,
///     eps: 0.0,
///     ..Default::default()
/// });
/// let mut w = [1.0f32];
/// opt.step(&mut w, &[2.0]).unwrap(); // h = 0.25·4 = 1: w = 1 − 0.1·2/1
/// assert_eq!(w, [0.8]);
/// ```
pub type RmsProp = Fused<RmsPropConfig>;

/// Hyperparameters of [`RmsProp`].
///
/// ```
/// let c = fusedopt::RmsPropConfig::default();
/// assert_eq!((c.lr, c.decay_rate, c.eps), (0.01, 0.9, 1e-7));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsPropConfig {
    /// Learning rate (default 0.01). Finite and `>= 0`.
    pub lr: f32,
    /// Decay ρ of the running mean of squared gradients (default 0.9), in `[0, 1]`. Kept in
    /// `f64`, as given: the step computes `1 − ρ` from it in `f64` and rounds once, as torch
    /// does with `alpha` (so `0.99` means 0.99, and `1 − ρ` is 0.01 rounded, not `1 − 0.99f32`).
    pub decay_rate: f64,
    /// Added to `√h` in the denominator (default 1e-7). Finite and `>= 0`.
    pub eps: f32,
    /// L2 weight decay (default 0): `g ← g + weight_decay·w`, after `maximize`. Finite and `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        RmsPropConfig {
            lr: 0.01,
            decay_rate: 0.9,
            eps: 1e-7,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

impl RmsPropConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::RmsPropConfig;
    /// assert!(RmsPropConfig::default().validate().is_ok());
    /// assert!(RmsPropConfig { decay_rate: 2.0, ..Default::default() }.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        check_unit(Self::NAME, "decay_rate", self.decay_rate, true)?;
        check_eps(Self::NAME, self.eps)?;
        check_weight_decay(Self::NAME, self.weight_decay)
    }
}

/// Per-step scalars of RMSProp: `ρ` and `1 − ρ`, each computed in f64 from the configuration's
/// `ρ` and rounded once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsPropStep {
    lr: f32,
    decay: f32,
    one_minus_decay: f32,
    eps: f32,
}

impl RmsPropStep {
    fn new(c: &RmsPropConfig, lr: f32) -> Self {
        RmsPropStep {
            lr,
            decay: c.decay_rate as f32,
            one_minus_decay: (1.0 - c.decay_rate) as f32,
            eps: c.eps,
        }
    }
}

impl Kernel<1> for RmsPropStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [h]: &mut [V; 1]) -> V {
        *h = V::splat(self.decay) * *h + V::splat(self.one_minus_decay) * (g * g);
        w - V::splat(self.lr) * g / (h.sqrt() + V::splat(self.eps))
    }
}

impl RuleImpl for RmsPropConfig {
    const NAME: &'static str = "rmsprop";
    const BUFFERS: &'static [StateBuffer] = &[StateBuffer::unsigned("h")];
    config_fields!(lr, decay_rate, eps, weight_decay, maximize);
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig::l2(self.lr, self.weight_decay, self.maximize);
        x.run(common, |h| RmsPropStep::new(self, h.lr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_formula() {
        let c = RmsPropConfig {
            decay_rate: 0.5,
            eps: 0.0,
            ..Default::default()
        };
        let k = RmsPropStep::new(&c, 1.0);
        let mut h = [4.0f32];
        let w = k.update(1.0f32, 2.0, &mut h);
        assert_eq!(h, [4.0]); // 0.5·4 + 0.5·4
        assert_eq!(w, 0.0); // 1 − 2/2
    }
}
