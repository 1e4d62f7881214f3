//! AdaGrad: `h ← h + g²; w ← w − lr·g / (√h + ε)`.

use super::{
    Fused, StateBuffer, check_eps, check_lr, check_weight_decay, config_fields, sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// AdaGrad: `h ← h + g²; w ← w − lr·g / (√h + ε)`, with `h` starting at zero.
///
/// ```
/// use fusedopt::{AdaGrad, AdaGradConfig, Optimizer};
/// let mut opt = AdaGrad::new(AdaGradConfig { lr: 0.1, eps: 0.0, ..Default::default() });
/// let mut w = [1.0f32];
/// opt.step(&mut w, &[4.0]).unwrap(); // h = 16: w = 1 − 0.1·4/4
/// assert_eq!(w, [0.9]);
/// ```
pub type AdaGrad = Fused<AdaGradConfig>;

/// Hyperparameters of [`AdaGrad`].
///
/// ```
/// let c = fusedopt::AdaGradConfig::default();
/// assert_eq!((c.lr, c.eps), (0.01, 1e-7));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaGradConfig {
    /// Learning rate (default 0.01). Finite and `>= 0`.
    pub lr: f32,
    /// Added to `√h` in the denominator (default 1e-7). Finite and `>= 0`.
    pub eps: f32,
    /// L2 weight decay (default 0): `g ← g + weight_decay·w`, after `maximize`. Finite and `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
}

impl Default for AdaGradConfig {
    fn default() -> Self {
        AdaGradConfig {
            lr: 0.01,
            eps: 1e-7,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

impl AdaGradConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::AdaGradConfig;
    /// assert!(AdaGradConfig::default().validate().is_ok());
    /// assert!(AdaGradConfig { eps: -1.0, ..Default::default() }.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        check_eps(Self::NAME, self.eps)?;
        check_weight_decay(Self::NAME, self.weight_decay)
    }
}

/// Per-step scalars of AdaGrad.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdaGradStep {
    lr: f32,
    eps: f32,
}

impl Kernel<1> for AdaGradStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [h]: &mut [V; 1]) -> V {
        *h = *h + g * g;
        w - V::splat(self.lr) * g / (h.sqrt() + V::splat(self.eps))
    }
}

impl RuleImpl for AdaGradConfig {
    const NAME: &'static str = "adagrad";
    const BUFFERS: &'static [StateBuffer] = &[StateBuffer::unsigned("h")];
    config_fields!(lr, eps, weight_decay, maximize);
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig::l2(self.lr, self.weight_decay, self.maximize);
        x.run(common, |h| AdaGradStep {
            lr: h.lr,
            eps: self.eps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_formula() {
        let k = AdaGradStep { lr: 1.0, eps: 0.0 };
        let mut h = [9.0f32];
        let w = k.update(10.0f32, 4.0, &mut h);
        assert_eq!(h, [25.0]);
        assert_eq!(w, 10.0 - 4.0 / 5.0);
    }

    #[test]
    fn zero_gradient_on_zero_state_is_a_no_op() {
        let c = AdaGradConfig::default();
        let k = AdaGradStep {
            lr: c.lr,
            eps: c.eps,
        };
        let mut h = [0.0f32];
        assert_eq!(k.update(3.0f32, 0.0, &mut h), 3.0);
    }
}
