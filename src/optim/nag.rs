//! Nesterov accelerated gradient: `v ← μ·v − lr·g; w ← w + μ·v − lr·g`.

use crate::engine::{Base, Core, Params};
use crate::optimizer::{
    StepError, StepReport, check_lr, check_unit, check_weight_decay, sealed::Rule,
};
use crate::simd::{Kernel, Lane};

/// Hyperparameters of [`Nag`].
///
/// ```
/// let c = fusedopt::NagConfig::default();
/// assert_eq!((c.lr, c.momentum), (0.01, 0.9));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NagConfig {
    /// Learning rate (default 0.01). Finite and `>= 0`.
    pub lr: f32,
    /// Momentum coefficient μ (default 0.9), in `[0, 1]`.
    pub momentum: f32,
    /// L2 weight decay (default 0): `g ← g + weight_decay·w`, after `maximize`. Finite and `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
}

impl Default for NagConfig {
    fn default() -> Self {
        NagConfig {
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

impl NagConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::NagConfig;
    /// assert!(NagConfig::default().validate().is_ok());
    /// assert!(NagConfig { lr: -1.0, ..Default::default() }.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Nag::NAME, self.lr)?;
        check_unit(Nag::NAME, "momentum", self.momentum, true)?;
        check_weight_decay(Nag::NAME, self.weight_decay)
    }
}

crate::checkpoint::config_fields!(NagConfig {
    lr,
    momentum,
    weight_decay,
    maximize
});

/// Nesterov's accelerated gradient in the velocity convention:
/// `v ← μ·v − lr·g; w ← w + μ·v − lr·g` (using the updated `v`), with `v` starting at zero.
///
/// This is Nesterov's look-ahead step written with the same velocity as [`Momentum`](crate::Momentum);
/// at constant `lr` it equals PyTorch's `SGD(momentum=μ, nesterov=True)`, whose buffer is
/// `b = −v / lr`. Under a changing `lr` the two differ slightly: torch rescales the whole buffer
/// by the new `lr`, while `v` keeps each step's own.
///
/// ```
/// use fusedopt::{Nag, NagConfig, Optimizer};
/// let mut opt = Nag::new(NagConfig { lr: 0.5, momentum: 0.5, ..Default::default() });
/// let mut w = [0.0f32];
/// opt.step(&mut w, &[1.0]).unwrap(); // v = -0.5; w = 0 + 0.5·(-0.5) - 0.5
/// assert_eq!(w, [-0.75]);
/// ```
#[derive(Debug)]
pub struct Nag {
    config: NagConfig,
    core: Core,
}

impl Nag {
    /// Creates the optimizer. The configuration is checked at every step.
    ///
    /// ```
    /// use fusedopt::{Nag, NagConfig, Optimizer};
    /// assert_eq!(Nag::new(NagConfig::default()).steps(), 0);
    /// ```
    pub fn new(config: NagConfig) -> Self {
        Nag {
            config,
            core: Core::new(Self::NAME),
        }
    }

    /// The hyperparameters.
    ///
    /// ```
    /// use fusedopt::{Nag, NagConfig};
    /// assert_eq!(Nag::new(NagConfig::default()).config().lr, 0.01);
    /// ```
    pub fn config(&self) -> &NagConfig {
        &self.config
    }

    /// The hyperparameters, to change between steps.
    ///
    /// ```
    /// use fusedopt::{Nag, NagConfig};
    /// let mut opt = Nag::new(NagConfig::default());
    /// opt.config_mut().momentum = 0.99;
    /// assert_eq!(opt.config().momentum, 0.99);
    /// ```
    pub fn config_mut(&mut self) -> &mut NagConfig {
        &mut self.config
    }
}

/// Per-step scalars of NAG.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NagStep {
    lr: f32,
    momentum: f32,
}

impl NagStep {
    pub(crate) fn new(c: &NagConfig, lr: f32) -> Self {
        NagStep {
            lr,
            momentum: c.momentum,
        }
    }
}

impl Kernel<1> for NagStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [v]: &mut [V; 1]) -> V {
        let (mu, lr_g) = (V::splat(self.momentum), V::splat(self.lr) * g);
        *v = mu * *v - lr_g;
        w + mu * *v - lr_g
    }
}

impl Rule for Nag {
    type Config = NagConfig;
    const BUFFER_NAMES: &'static [&'static str] = &["v"];
    const NAME: &'static str = "nag";
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
        self.core.run(params, base, |h| NagStep::new(c, h.lr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_formula() {
        let c = NagConfig {
            momentum: 0.5,
            ..Default::default()
        };
        let k = NagStep::new(&c, 0.5);
        let mut v = [2.0f32];
        let w = k.update(1.0f32, 1.0, &mut v);
        assert_eq!(v, [0.5]); // 0.5·2 − 0.5
        assert_eq!(w, 0.75); // 1 + 0.5·0.5 − 0.5
    }
}
