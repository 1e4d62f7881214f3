//! Adam: `m ← m + (1−β1)(g − m); v ← v + (1−β2)(g² − v); w ← w − lr_t·m / (√v + ε)` with
//! `lr_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)`.

use crate::engine::{Core, Params};
use crate::optimizer::{StepError, StepReport, check_eps, check_lr, check_unit, sealed::Rule};
use crate::simd::{Kernel, Lane};

/// Hyperparameters of [`Adam`].
///
/// ```
/// let c = fusedopt::AdamConfig::default();
/// assert_eq!((c.lr, c.beta1, c.beta2, c.eps), (0.001, 0.9, 0.999, 1e-7));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate (default 0.001). Finite and `>= 0`.
    pub lr: f32,
    /// Decay β1 of the first moment (default 0.9), in `[0, 1)`.
    pub beta1: f32,
    /// Decay β2 of the second moment (default 0.999), in `[0, 1)`.
    pub beta2: f32,
    /// Added to `√v` in the denominator (default 1e-7). Finite and `>= 0`.
    pub eps: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 0.001,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-7,
        }
    }
}

impl AdamConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::AdamConfig;
    /// assert!(AdamConfig::default().validate().is_ok());
    /// let err = AdamConfig { beta1: 1.0, ..Default::default() }.validate().unwrap_err();
    /// assert_eq!(err.to_string(), "adam: beta1 = 1 is invalid, expected in [0, 1)");
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Adam::NAME, self.lr)?;
        check_unit(Adam::NAME, "beta1", self.beta1, false)?;
        check_unit(Adam::NAME, "beta2", self.beta2, false)?;
        check_eps(Adam::NAME, self.eps)
    }
}

/// Adam, with the bias correction folded into the step size:
///
/// `t ← t+1; lr_t = lr·√(1−β2ᵗ)/(1−β1ᵗ); m ← m + (1−β1)(g − m); v ← v + (1−β2)(g² − v);
/// w ← w − lr_t·m / (√v + ε)`, with `m` and `v` starting at zero.
///
/// `ε` is added to `√v`, not to a bias-corrected `√v̂`.
///
/// ```
/// use fusedopt::{Adam, AdamConfig, Optimizer};
/// let mut opt = Adam::new(AdamConfig { lr: 0.1, ..Default::default() });
/// let mut w = [1.0f32, 1.0];
/// opt.step(&mut w, &[3.0, -0.5]).unwrap();
/// // The first step moves every weight by about lr against its gradient's sign.
/// assert!((w[0] - 0.9).abs() < 1e-5 && (w[1] - 1.1).abs() < 1e-5);
/// ```
#[derive(Debug)]
pub struct Adam {
    config: AdamConfig,
    core: Core,
}

impl Adam {
    /// Creates the optimizer. The configuration is checked at every step.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// assert_eq!(Adam::new(AdamConfig::default()).name(), "adam");
    /// ```
    pub fn new(config: AdamConfig) -> Self {
        Adam {
            config,
            core: Core::new(Self::NAME),
        }
    }

    /// The hyperparameters.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig};
    /// assert_eq!(Adam::new(AdamConfig::default()).config().beta2, 0.999);
    /// ```
    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// The hyperparameters, to change between steps.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// opt.config_mut().lr = 3e-4;
    /// assert_eq!(opt.config().lr, 3e-4);
    /// ```
    pub fn config_mut(&mut self) -> &mut AdamConfig {
        &mut self.config
    }
}

/// Per-step scalars of Adam at step `t`, computed in f64 and rounded once to f32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamStep {
    lr_t: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
}

impl AdamStep {
    pub(crate) fn new(c: &AdamConfig, t: u64) -> Self {
        let t = t as f64;
        let (b1, b2) = (f64::from(c.beta1), f64::from(c.beta2));
        let lr_t = f64::from(c.lr) * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t));
        AdamStep {
            lr_t: lr_t as f32,
            one_minus_beta1: (1.0 - b1) as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: c.eps,
        }
    }
}

impl Kernel<2> for AdamStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [m, v]: &mut [V; 2]) -> V {
        *m = *m + V::splat(self.one_minus_beta1) * (g - *m);
        *v = *v + V::splat(self.one_minus_beta2) * (g * g - *v);
        w - V::splat(self.lr_t) * *m / (v.sqrt() + V::splat(self.eps))
    }
}

impl Rule for Adam {
    const NAME: &'static str = "adam";
    const STATE_BUFFERS: usize = 2;
    fn core(&self) -> &Core {
        &self.core
    }
    fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
    fn config_lr(&self) -> f32 {
        self.config.lr
    }
    fn config_lr_mut(&mut self) -> &mut f32 {
        &mut self.config.lr
    }
    fn apply(&mut self, params: &mut Params<'_, '_>) -> Result<StepReport, StepError> {
        self.config.validate()?;
        let kernel = AdamStep::new(&self.config, self.core.steps() + 1);
        self.core.run(&kernel, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_scalars_are_computed_in_f64() {
        let k = AdamStep::new(&AdamConfig::default(), 1);
        let expected = 0.001f64 * (1.0 - 0.999f32 as f64).sqrt() / (1.0 - 0.9f32 as f64);
        assert_eq!(k.lr_t, expected as f32);
        assert_eq!(k.one_minus_beta2, (1.0 - 0.999f32 as f64) as f32);
    }

    #[test]
    fn kernel_matches_formula() {
        let k = AdamStep {
            lr_t: 0.5,
            one_minus_beta1: 0.5,
            one_minus_beta2: 0.25,
            eps: 0.0,
        };
        let mut s = [1.0f32, 4.0];
        let w = k.update(2.0f32, 3.0, &mut s);
        assert_eq!(s, [2.0, 5.25]); // m = 1 + 0.5·2; v = 4 + 0.25·(9 − 4)
        assert_eq!(w, 2.0 - 0.5 * 2.0 / 5.25f32.sqrt());
    }
}
