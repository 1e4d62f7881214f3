//! Classical momentum and Nesterov's accelerated gradient, in the velocity convention:
//! `v ← μ·v − lr·g`, then `w ← w + v` (momentum) or `w ← w + μ·v − lr·g` (NAG). One
//! configuration type and one kernel serve both; `NESTEROV` tells them apart.

use super::{
    Fused, StateBuffer, check_lr, check_unit, check_weight_decay, config_fields, sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

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
pub type Momentum = Fused<MomentumConfig>;

/// Nesterov's accelerated gradient in the velocity convention:
/// `v ← μ·v − lr·g; w ← w + μ·v − lr·g` (using the updated `v`), with `v` starting at zero.
///
/// This is Nesterov's look-ahead step written with the same velocity as [`Momentum`]; at
/// constant `lr` it equals PyTorch's `SGD(momentum=μ, nesterov=True)`, whose buffer is
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
pub type Nag = Fused<NagConfig>;

/// Hyperparameters of [`Momentum`].
///
/// ```
/// let c = fusedopt::MomentumConfig::default();
/// assert_eq!((c.lr, c.momentum, c.weight_decay, c.maximize), (0.01, 0.9, 0.0, false));
/// ```
pub type MomentumConfig = VelocityConfig<false>;

/// Hyperparameters of [`Nag`].
///
/// ```
/// let c = fusedopt::NagConfig::default();
/// assert_eq!((c.lr, c.momentum), (0.01, 0.9));
/// ```
pub type NagConfig = VelocityConfig<true>;

/// Hyperparameters of the two velocity optimizers: [`MomentumConfig`] (`NESTEROV = false`) and
/// [`NagConfig`] (`NESTEROV = true`). Use those names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VelocityConfig<const NESTEROV: bool> {
    /// Learning rate (default 0.01). Finite and `>= 0`.
    pub lr: f32,
    /// Momentum coefficient μ (default 0.9), in `[0, 1]`.
    pub momentum: f32,
    /// L2 weight decay (default 0): `g ← g + weight_decay·w`, after `maximize`. Finite and `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
}

impl<const NESTEROV: bool> Default for VelocityConfig<NESTEROV> {
    fn default() -> Self {
        VelocityConfig {
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

impl<const NESTEROV: bool> VelocityConfig<NESTEROV> {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::{MomentumConfig, NagConfig};
    /// assert!(MomentumConfig::default().validate().is_ok());
    /// let bad = NagConfig { momentum: 1.5, ..Default::default() };
    /// let message = bad.validate().unwrap_err().to_string();
    /// assert_eq!(message, "nag: momentum = 1.5 is invalid, expected in [0, 1]");
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        check_unit(Self::NAME, "momentum", self.momentum, true)?;
        check_weight_decay(Self::NAME, self.weight_decay)
    }
}

/// Per-step scalars of momentum (`NESTEROV = false`) and NAG.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VelocityStep<const NESTEROV: bool> {
    lr: f32,
    momentum: f32,
}

impl<const NESTEROV: bool> Kernel<1> for VelocityStep<NESTEROV> {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [v]: &mut [V; 1]) -> V {
        let (mu, lr_g) = (V::splat(self.momentum), V::splat(self.lr) * g);
        *v = mu * *v - lr_g;
        if NESTEROV { w + mu * *v - lr_g } else { w + *v }
    }
}

impl<const NESTEROV: bool> RuleImpl for VelocityConfig<NESTEROV> {
    const NAME: &'static str = if NESTEROV { "nag" } else { "momentum" };
    const BUFFERS: &'static [StateBuffer] = &[StateBuffer::required("v")];
    config_fields!(lr, momentum, weight_decay, maximize);
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig::l2(self.lr, self.weight_decay, self.maximize);
        x.run(common, |h| VelocityStep::<NESTEROV> {
            lr: h.lr,
            momentum: self.momentum,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_their_formulas() {
        let (lr, momentum) = (0.5, 0.5);
        let mut v = [2.0f32];
        let w = VelocityStep::<false> { lr, momentum }.update(1.0f32, 1.0, &mut v);
        assert_eq!((v, w), ([0.5], 1.5)); // v = 0.5·2 − 0.5; w = 1 + v
        let mut v = [2.0f32];
        let w = VelocityStep::<true> { lr, momentum }.update(1.0f32, 1.0, &mut v);
        assert_eq!((v, w), ([0.5], 0.75)); // the same v; w = 1 + 0.5·0.5 − 0.5
    }

    #[test]
    fn the_two_rules_have_their_own_names() {
        assert_eq!(MomentumConfig::NAME, "momentum");
        assert_eq!(NagConfig::NAME, "nag");
    }
}
