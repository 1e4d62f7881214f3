//! Plain stochastic gradient descent: `w ← w − lr·g`.

use crate::engine::{Base, Core, Params};
use crate::optimizer::{StepError, StepReport, check_lr, check_weight_decay, sealed::Rule};
use crate::simd::{Kernel, Lane};

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
        check_lr(Sgd::NAME, self.lr)?;
        check_weight_decay(Sgd::NAME, self.weight_decay)
    }
}

crate::checkpoint::config_fields!(SgdConfig {
    lr,
    weight_decay,
    maximize
});

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
#[derive(Debug)]
pub struct Sgd {
    config: SgdConfig,
    core: Core,
}

impl Sgd {
    /// Creates the optimizer. The configuration is checked at every step.
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig};
    /// assert_eq!(Sgd::new(SgdConfig::default()).steps(), 0);
    /// ```
    pub fn new(config: SgdConfig) -> Self {
        Sgd {
            config,
            core: Core::new(Self::NAME),
        }
    }

    /// The hyperparameters.
    ///
    /// ```
    /// use fusedopt::{Sgd, SgdConfig};
    /// assert_eq!(Sgd::new(SgdConfig::default()).config().lr, 0.01);
    /// ```
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// The hyperparameters, to change between steps.
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig};
    /// let mut opt = Sgd::new(SgdConfig::default());
    /// opt.config_mut().lr = 1.0;
    /// let mut w = [1.0f32];
    /// opt.step(&mut w, &[1.0]).unwrap();
    /// assert_eq!(w, [0.0]);
    /// ```
    pub fn config_mut(&mut self) -> &mut SgdConfig {
        &mut self.config
    }
}

/// Per-step scalars of SGD.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SgdStep {
    lr: f32,
}

impl SgdStep {
    pub(crate) fn new(lr: f32) -> Self {
        SgdStep { lr }
    }
}

impl Kernel<0> for SgdStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, _: &mut [V; 0]) -> V {
        w - V::splat(self.lr) * g
    }
}

impl Rule for Sgd {
    type Config = SgdConfig;
    const BUFFER_NAMES: &'static [&'static str] = &[];
    const NAME: &'static str = "sgd";
    fn state_buffers(&self) -> usize {
        0
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
        self.core.run(params, base, |h| SgdStep::new(h.lr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Optimizer;

    #[test]
    fn kernel_matches_formula() {
        let k = SgdStep::new(0.25);
        assert_eq!(k.update(1.0f32, 2.0, &mut []), 0.5);
    }

    #[test]
    fn any_length_any_time() {
        let mut opt = Sgd::new(SgdConfig::default());
        opt.step(&mut [0.0; 3], &[1.0; 3]).unwrap();
        opt.step(&mut [0.0; 7], &[1.0; 7]).unwrap();
        assert_eq!(opt.steps(), 2);
    }
}
