//! Plain stochastic gradient descent: `w ← w − lr·g`.

use super::{Fused, StateBuffer, check_lr, check_weight_decay, config_fields, sealed::RuleImpl};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// Stochastic gradient descent: `w ← w − lr·g`. No state, so any tensor length is accepted at any
/// step.
///
/// ```
/// use fusedopt::{Optimizer, Sgd, SgdConfig};
/// let mut opt = Sgd::new(SgdConfig { lr: 0.1, ..Default::default() });
/// let mut w = [1.0f32, -1.0];
/// opt.step(&mut w, &[1.0, -1.0]).unwrap();
/// assert_eq!(w, [0.9, -0.9]);
/// ```
pub type Sgd = Fused<SgdConfig>;

/// Hyperparameters of [`Sgd`].
///
/// ```
/// let mut c = fusedopt::SgdConfig::default();
/// assert_eq!(c.lr, 0.01);
/// c.lr = 0.1;
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate (default 0.01). Finite and `>= 0`.
    pub lr: f32,
    /// L2 weight decay (default 0): `g ← g + weight_decay·w`, after `maximize`. Finite and `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 0.01,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

impl SgdConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::SgdConfig;
    /// assert!(SgdConfig::default().validate().is_ok());
    /// assert!(SgdConfig { lr: f32::NAN, ..Default::default() }.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        check_weight_decay(Self::NAME, self.weight_decay)
    }
}

/// Per-step scalars of SGD.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SgdStep {
    lr: f32,
}

impl Kernel<0> for SgdStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, _: &mut [V; 0]) -> V {
        w - V::splat(self.lr) * g
    }
}

impl RuleImpl for SgdConfig {
    const NAME: &'static str = "sgd";
    const BUFFERS: &'static [StateBuffer] = &[];
    config_fields!(lr, weight_decay, maximize);
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig::l2(self.lr, self.weight_decay, self.maximize);
        x.run(common, |h| SgdStep { lr: h.lr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_formula() {
        let k = SgdStep { lr: 0.25 };
        assert_eq!(k.update(1.0f32, 2.0, &mut []), 0.5);
    }
}
