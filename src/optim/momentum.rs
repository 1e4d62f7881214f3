//! Classical momentum and Nesterov's accelerated gradient, in the velocity convention:
//! `v ← μ·v − lr·g`, then `w ← w + v` (momentum) or `w ← w + μ·v − lr·g` (NAG), or in PyTorch's
//! buffer convention ([`MomentumForm::Buffer`]). One configuration type and one kernel serve
//! both optimizers; `NESTEROV` tells them apart.

use super::{
    FieldValue, Fused, StateBuffer, check, check_lr, check_unit, check_weight_decay,
    config_fields, sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// Gradient descent with classical momentum, in the velocity convention:
/// `v ← μ·v − lr·g; w ← w + v`, with `v` starting at zero.
///
/// At constant `lr` this is PyTorch's `SGD(momentum=μ)` (dampening 0), whose buffer is
/// `b = −v / lr`. Under a changing `lr` the two differ: torch applies the new `lr` to the whole
/// buffer, while `v` keeps each step's own. [`MomentumForm::Buffer`] is torch's form.
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
/// `b = −v / lr`. Under a changing `lr` the two differ: torch applies the new `lr` to the whole
/// buffer, while `v` keeps each step's own. [`MomentumForm::Buffer`] is torch's form.
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
/// assert_eq!(c.form, fusedopt::MomentumForm::Velocity);
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
    /// Where the learning rate is applied (default [`MomentumForm::Velocity`]).
    pub form: MomentumForm,
    /// Dampening `d` (default 0), torch's: from a tensor's second step on, the gradient enters
    /// the momentum as `(1 − d)·g` (its first step takes `g` whole, as torch's first buffer is
    /// the gradient). In `[0, 1]`; `f64`, with `1 − d` computed from it and rounded once. NAG
    /// requires 0, as `torch.optim.SGD(nesterov=True)` does.
    pub dampening: f64,
}

/// Where [`Momentum`] and [`Nag`] apply the learning rate. The two forms agree while `lr` is
/// constant (up to rounding: the buffer is `b = −v / lr`) and differ when it changes.
///
/// ```
/// use fusedopt::{Momentum, MomentumConfig, MomentumForm, Optimizer};
/// let config = MomentumConfig { lr: 0.5, momentum: 0.5, form: MomentumForm::Buffer, ..Default::default() };
/// let mut opt = Momentum::new(config);
/// let mut w = [0.0f32];
/// opt.step(&mut w, &[1.0])?; // b = 1; w = 0 − 0.5·1
/// opt.set_lr(0.25);
/// opt.step(&mut w, &[1.0])?; // b = 0.5·1 + 1; w = −0.5 − 0.25·1.5
/// assert_eq!(w, [-0.875]);
/// # Ok::<(), fusedopt::StepError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MomentumForm {
    /// The velocity keeps each step's learning rate: `v ← μ·v − lr·g; w ← w + v`
    /// (NAG: `w ← w + μ·v − lr·g`). The reference formulas; state files call it `velocity`.
    #[default]
    Velocity,
    /// PyTorch's `SGD` (dampening 0): the buffer sums raw gradients and the current learning
    /// rate applies to all of it, `b ← μ·b + g; w ← w − lr·b` (nesterov: `w ← w − lr·(g + μ·b)`).
    /// State files call it `buffer`; the state buffer holds `b`.
    Buffer,
}

impl FieldValue for MomentumForm {
    fn encode(&self) -> String {
        match self {
            MomentumForm::Velocity => "velocity",
            MomentumForm::Buffer => "buffer",
        }
        .to_string()
    }
    fn parse(&mut self, text: &str) -> Result<(), &'static str> {
        *self = match text.trim() {
            "velocity" => MomentumForm::Velocity,
            "buffer" => MomentumForm::Buffer,
            _ => return Err("velocity or buffer"),
        };
        Ok(())
    }
}

impl<const NESTEROV: bool> Default for VelocityConfig<NESTEROV> {
    fn default() -> Self {
        VelocityConfig {
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 0.0,
            maximize: false,
            form: MomentumForm::Velocity,
            dampening: 0.0,
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
        check_unit(Self::NAME, "dampening", self.dampening, true)?;
        if NESTEROV && self.dampening != 0.0 {
            let d = self.dampening as f32;
            check(Self::NAME, "dampening", d, false, "0 (Nesterov momentum has no dampening)")?;
        }
        check_weight_decay(Self::NAME, self.weight_decay)
    }
}

/// Per-step scalars of momentum (`NESTEROV = false`) and NAG, in the velocity form
/// (`BUFFER = false`) or the buffer form.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VelocityStep<const NESTEROV: bool, const BUFFER: bool> {
    lr: f32,
    momentum: f32,
    /// `1 − d`, applied to the gradient when `damp` (dampening, after a tensor's first step).
    g_scale: f32,
    damp: bool,
}

impl<const NESTEROV: bool, const BUFFER: bool> VelocityStep<NESTEROV, BUFFER> {
    /// The scalars of a tensor's step `t` with learning rate `lr`.
    fn new(c: &VelocityConfig<NESTEROV>, t: u64, lr: f32) -> Self {
        VelocityStep {
            lr,
            momentum: c.momentum,
            g_scale: (1.0 - c.dampening) as f32,
            damp: c.dampening != 0.0 && t > 1,
        }
    }
}

impl<const NESTEROV: bool, const BUFFER: bool> Kernel<1> for VelocityStep<NESTEROV, BUFFER> {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [v]: &mut [V; 1]) -> V {
        let (mu, lr) = (V::splat(self.momentum), V::splat(self.lr));
        let g = if self.damp {
            g * V::splat(self.g_scale)
        } else {
            g
        };
        if BUFFER {
            *v = mu * *v + g;
            let step = if NESTEROV { g + mu * *v } else { *v };
            w - lr * step
        } else {
            let lr_g = lr * g;
            *v = mu * *v - lr_g;
            if NESTEROV { w + mu * *v - lr_g } else { w + *v }
        }
    }
}

impl<const NESTEROV: bool> RuleImpl for VelocityConfig<NESTEROV> {
    const NAME: &'static str = if NESTEROV { "nag" } else { "momentum" };
    const BUFFERS: &'static [StateBuffer] = &[StateBuffer::signed("v")];
    config_fields!(lr, momentum, weight_decay, maximize, form, dampening);
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig::l2(self.lr, self.weight_decay, self.maximize);
        match self.form {
            MomentumForm::Velocity => x.run(common, |h| {
                VelocityStep::<NESTEROV, false>::new(self, h.t, h.lr)
            }),
            MomentumForm::Buffer => {
                x.run(common, |h| VelocityStep::<NESTEROV, true>::new(self, h.t, h.lr))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn undamped<const N: bool, const B: bool>(lr: f32, momentum: f32) -> VelocityStep<N, B> {
        VelocityStep {
            lr,
            momentum,
            g_scale: 1.0,
            damp: false,
        }
    }

    #[test]
    fn kernels_match_their_formulas() {
        let (lr, momentum) = (0.5, 0.5);
        let mut v = [2.0f32];
        let w = undamped::<false, false>(lr, momentum).update(1.0f32, 1.0, &mut v);
        assert_eq!((v, w), ([0.5], 1.5)); // v = 0.5·2 − 0.5; w = 1 + v
        let mut v = [2.0f32];
        let w = undamped::<true, false>(lr, momentum).update(1.0f32, 1.0, &mut v);
        assert_eq!((v, w), ([0.5], 0.75)); // the same v; w = 1 + 0.5·0.5 − 0.5
        let mut b = [2.0f32];
        let w = undamped::<false, true>(lr, momentum).update(1.0f32, 1.0, &mut b);
        assert_eq!((b, w), ([2.0], 0.0)); // b = 0.5·2 + 1; w = 1 − 0.5·b
        let mut b = [2.0f32];
        let w = undamped::<true, true>(lr, momentum).update(1.0f32, 1.0, &mut b);
        assert_eq!((b, w), ([2.0], 0.0)); // the same b; w = 1 − 0.5·(1 + 0.5·2)
    }

    #[test]
    fn dampening_scales_the_gradient_after_the_first_step() {
        let c = MomentumConfig {
            momentum: 0.5,
            dampening: 0.75,
            form: MomentumForm::Buffer,
            ..Default::default()
        };
        let first = VelocityStep::<false, true>::new(&c, 1, 1.0);
        let mut b = [0.0f32];
        first.update(0.0f32, 2.0, &mut b);
        assert_eq!(b, [2.0]); // torch's first buffer is the gradient itself
        let later = VelocityStep::<false, true>::new(&c, 2, 1.0);
        later.update(0.0f32, 2.0, &mut b);
        assert_eq!(b, [0.5 * 2.0 + 0.25 * 2.0]);
        let nag = NagConfig {
            dampening: 0.1,
            ..Default::default()
        };
        assert!(nag.validate().unwrap_err().to_string().contains("Nesterov"));
    }

    #[test]
    fn the_two_rules_have_their_own_names() {
        assert_eq!(MomentumConfig::NAME, "momentum");
        assert_eq!(NagConfig::NAME, "nag");
    }
}
