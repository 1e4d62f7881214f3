//! AdaGrad: `h ← h + g²; w ← w − lr·g / (√h + ε)`.

use crate::engine::{Base, Core, Params};
use crate::optimizer::{
    StepError, StepReport, check_eps, check_lr, check_weight_decay, sealed::Rule,
};
use crate::simd::{Kernel, Lane};

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
        check_lr(AdaGrad::NAME, self.lr)?;
        check_eps(AdaGrad::NAME, self.eps)?;
        check_weight_decay(AdaGrad::NAME, self.weight_decay)
    }
}

crate::checkpoint::config_fields!(AdaGradConfig {
    lr,
    eps,
    weight_decay,
    maximize
});

/// AdaGrad: `h ← h + g²; w ← w − lr·g / (√h + ε)`, with `h` starting at zero.
///
/// ```
/// use fusedopt::{AdaGrad, AdaGradConfig, Optimizer};
/// let mut opt = AdaGrad::new(AdaGradConfig { lr: 0.1, eps: 0.0, ..Default::default() });
/// let mut w = [1.0f32];
/// opt.step(&mut w, &[4.0]).unwrap(); // h = 16: w = 1 − 0.1·4/4
/// assert_eq!(w, [0.9]);
/// ```
#[derive(Debug)]
pub struct AdaGrad {
    config: AdaGradConfig,
    core: Core,
}

impl AdaGrad {
    /// Creates the optimizer. The configuration is checked at every step.
    ///
    /// ```
    /// use fusedopt::{AdaGrad, AdaGradConfig, Optimizer};
    /// assert_eq!(AdaGrad::new(AdaGradConfig::default()).name(), "adagrad");
    /// ```
    pub fn new(config: AdaGradConfig) -> Self {
        AdaGrad {
            config,
            core: Core::new(Self::NAME),
        }
    }

    /// The hyperparameters.
    ///
    /// ```
    /// use fusedopt::{AdaGrad, AdaGradConfig};
    /// assert_eq!(AdaGrad::new(AdaGradConfig::default()).config().eps, 1e-7);
    /// ```
    pub fn config(&self) -> &AdaGradConfig {
        &self.config
    }

    /// The hyperparameters, to change between steps.
    ///
    /// ```
    /// use fusedopt::{AdaGrad, AdaGradConfig};
    /// let mut opt = AdaGrad::new(AdaGradConfig::default());
    /// opt.config_mut().lr = 0.5;
    /// assert_eq!(opt.config().lr, 0.5);
    /// ```
    pub fn config_mut(&mut self) -> &mut AdaGradConfig {
        &mut self.config
    }
}

/// Per-step scalars of AdaGrad.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdaGradStep {
    lr: f32,
    eps: f32,
}

impl AdaGradStep {
    pub(crate) fn new(c: &AdaGradConfig, lr: f32) -> Self {
        AdaGradStep { lr, eps: c.eps }
    }
}

impl Kernel<1> for AdaGradStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [h]: &mut [V; 1]) -> V {
        *h = *h + g * g;
        w - V::splat(self.lr) * g / (h.sqrt() + V::splat(self.eps))
    }
}

impl Rule for AdaGrad {
    type Config = AdaGradConfig;
    const BUFFER_NAMES: &'static [&'static str] = &["h"];
    const NAME: &'static str = "adagrad";
    fn state_buffers(&self) -> usize {
        1
    }
    fn core(&self) -> &Core {
        &self.core
    }
    fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
    fn rule_config(&self) -> &Self::Config {
        &self.config
    }
    fn rule_config_mut(&mut self) -> &mut Self::Config {
        &mut self.config
    }
    fn apply(&mut self, params: &mut Params<'_, '_>) -> Result<StepReport, StepError> {
        self.config.validate()?;
        let c = &self.config;
        let base = Base::l2(c.lr, c.weight_decay, c.maximize);
        self.core.run(params, base, |h| AdaGradStep::new(c, h.lr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_formula() {
        let k = AdaGradStep::new(
            &AdaGradConfig {
                eps: 0.0,
                ..Default::default()
            },
            1.0,
        );
        let mut h = [9.0f32];
        let w = k.update(10.0f32, 4.0, &mut h);
        assert_eq!(h, [25.0]);
        assert_eq!(w, 10.0 - 4.0 / 5.0);
    }

    #[test]
    fn zero_gradient_on_zero_state_is_a_no_op() {
        let c = AdaGradConfig::default();
        let k = AdaGradStep::new(&c, c.lr);
        let mut h = [0.0f32];
        assert_eq!(k.update(3.0f32, 0.0, &mut h), 3.0);
    }
}
