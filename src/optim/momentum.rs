//! Classical momentum: `v ← μ·v − lr·g; w ← w + v`.

use crate::engine::{Base, Core, Params};
use crate::optimizer::{
    StepError, StepReport, check_lr, check_unit, check_weight_decay, sealed::Rule,
};
use crate::simd::{Kernel, Lane};

/// Hyperparameters of [`Momentum`].
///
/// ```
/// let c = fusedopt::MomentumConfig::default();
/// assert_eq!((c.lr, c.momentum), (0.01, 0.9));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MomentumConfig {
    /// Learning rate (default 0.01). Finite and `>= 0`.
    pub lr: f32,
    /// Momentum coefficient μ (default 0.9), in `[0, 1]`.
    pub momentum: f32,
    /// L2 weight decay (default 0): `g ← g + weight_decay·w`, after `maximize`. Finite and `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
}

impl Default for MomentumConfig {
    fn default() -> Self {
        MomentumConfig {
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

impl MomentumConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::MomentumConfig;
    /// assert!(MomentumConfig::default().validate().is_ok());
    /// let bad = MomentumConfig { momentum: 1.5, ..Default::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("momentum"));
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Momentum::NAME, self.lr)?;
        check_unit(Momentum::NAME, "momentum", self.momentum, true)?;
        check_weight_decay(Momentum::NAME, self.weight_decay)
    }
}

crate::checkpoint::config_fields!(MomentumConfig {
    lr,
    momentum,
    weight_decay,
    maximize
});

/// Gradient descent with classical momentum, in the velocity convention:
/// `v ← μ·v − lr·g; w ← w + v`, with `v` starting at zero.
///
/// At constant `lr` this is PyTorch's `SGD(momentum=μ)` (dampening 0), whose buffer is
/// `b = −v / lr`. Under a changing `lr` the two differ slightly: torch rescales the whole buffer
/// by the new `lr`, while `v` keeps each step's own.
///
/// ```
/// use fusedopt::{Momentum, MomentumConfig, Optimizer};
/// let mut opt = Momentum::new(MomentumConfig { lr: 0.5, momentum: 0.5, ..Default::default() });
/// let mut w = [0.0f32];
/// opt.step(&mut w, &[1.0]).unwrap(); // v = -0.5
/// opt.step(&mut w, &[1.0]).unwrap(); // v = -0.25 - 0.5
/// assert_eq!(w, [-1.25]);
/// ```
#[derive(Debug)]
pub struct Momentum {
    config: MomentumConfig,
    core: Core,
}

impl Momentum {
    /// Creates the optimizer. The configuration is checked at every step.
    ///
    /// ```
    /// use fusedopt::{Momentum, MomentumConfig, Optimizer};
    /// assert_eq!(Momentum::new(MomentumConfig::default()).layout(), None);
    /// ```
    pub fn new(config: MomentumConfig) -> Self {
        Momentum {
            config,
            core: Core::new(Self::NAME),
        }
    }

    /// The hyperparameters.
    ///
    /// ```
    /// use fusedopt::{Momentum, MomentumConfig};
    /// assert_eq!(Momentum::new(MomentumConfig::default()).config().momentum, 0.9);
    /// ```
    pub fn config(&self) -> &MomentumConfig {
        &self.config
    }

    /// The hyperparameters, to change between steps.
    ///
    /// ```
    /// use fusedopt::{Momentum, MomentumConfig};
    /// let mut opt = Momentum::new(MomentumConfig::default());
    /// opt.config_mut().lr = 0.1;
    /// assert_eq!(opt.config().lr, 0.1);
    /// ```
    pub fn config_mut(&mut self) -> &mut MomentumConfig {
        &mut self.config
    }
}

/// Per-step scalars of momentum.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MomentumStep {
    lr: f32,
    momentum: f32,
}

impl MomentumStep {
    pub(crate) fn new(c: &MomentumConfig, lr: f32) -> Self {
        MomentumStep {
            lr,
            momentum: c.momentum,
        }
    }
}

impl Kernel<1> for MomentumStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [v]: &mut [V; 1]) -> V {
        *v = V::splat(self.momentum) * *v - V::splat(self.lr) * g;
        w + *v
    }
}

impl Rule for Momentum {
    type Config = MomentumConfig;
    const BUFFER_NAMES: &'static [&'static str] = &["v"];
    const NAME: &'static str = "momentum";
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
        self.core.run(params, base, |h| MomentumStep::new(c, h.lr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_formula() {
        let c = MomentumConfig {
            momentum: 0.5,
            ..Default::default()
        };
        let k = MomentumStep::new(&c, 0.5);
        let mut v = [2.0f32];
        let w = k.update(1.0f32, 1.0, &mut v);
        assert_eq!(v, [0.5]);
        assert_eq!(w, 1.5);
    }
}
