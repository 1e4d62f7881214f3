//! RMSProp: `h ← ρ·h + (1−ρ)·g²; w ← w − lr·g / (√h + ε)`, with torch's `centered` and
//! `momentum` options.

use super::{
    Fused, StateBuffer, check, check_eps, check_lr, check_unit, check_weight_decay,
    config_fields, sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// RMSProp: `h ← ρ·h + (1−ρ)·g²; w ← w − lr·g / (√h + ε)`, with `h` starting at zero.
///
/// As `torch.optim.RMSprop`'s options: [`centered`](RmsPropConfig::centered) keeps the mean
/// gradient `ḡ ← ḡ + (1−ρ)(g − ḡ)` and divides by `√(h − ḡ²) + ε` instead; with
/// [`momentum`](RmsPropConfig::momentum) `μ > 0` the step goes through a buffer,
/// `b ← μ·b + g/(√h + ε); w ← w − lr·b`. State: `h`, then `b` (kept with momentum or centered)
/// and `ḡ` (centered).
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
    /// Momentum μ (default 0), torch's `momentum`: above 0, `b ← μ·b + g/(√h + ε);
    /// w ← w − lr·b`, with `b` starting at zero. Finite and `>= 0`.
    pub momentum: f64,
    /// Centered RMSProp (default false), torch's `centered`: the denominator is
    /// `√(h − ḡ²) + ε`, with the running mean gradient `ḡ ← ḡ + (1−ρ)(g − ḡ)` starting at zero.
    pub centered: bool,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        RmsPropConfig {
            lr: 0.01,
            decay_rate: 0.9,
            eps: 1e-7,
            weight_decay: 0.0,
            maximize: false,
            momentum: 0.0,
            centered: false,
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
        let mu = self.momentum;
        check(Self::NAME, "momentum", mu as f32, mu.is_finite() && mu >= 0.0, "finite and >= 0")?;
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
    momentum: f32,
}

impl RmsPropStep {
    fn new(c: &RmsPropConfig, lr: f32) -> Self {
        RmsPropStep {
            lr,
            decay: c.decay_rate as f32,
            one_minus_decay: (1.0 - c.decay_rate) as f32,
            eps: c.eps,
            momentum: c.momentum as f32,
        }
    }

    /// Updates the mean square from the gradient.
    #[inline(always)]
    fn square<V: Lane>(&self, g: V, h: &mut V) {
        *h = V::splat(self.decay) * *h + V::splat(self.one_minus_decay) * (g * g);
    }

    /// The new weight from the gradient and the denominator `avg` (`√h + ε` or its centered
    /// form), through the momentum buffer `b` when there is one.
    #[inline(always)]
    fn weight<V: Lane>(&self, w: V, g: V, avg: V, b: Option<&mut V>) -> V {
        match b {
            // torch: buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
            Some(b) => {
                *b = V::splat(self.momentum) * *b + g / avg;
                w - V::splat(self.lr) * *b
            }
            None => w - V::splat(self.lr) * g / avg,
        }
    }
}

impl Kernel<1> for RmsPropStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [h]: &mut [V; 1]) -> V {
        self.square(g, h);
        self.weight(w, g, h.sqrt() + V::splat(self.eps), None)
    }
}

/// RMSProp with momentum: the buffer `b` second.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WithMomentum(RmsPropStep);

impl Kernel<2> for WithMomentum {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [h, b]: &mut [V; 2]) -> V {
        self.0.square(g, h);
        self.0.weight(w, g, h.sqrt() + V::splat(self.0.eps), Some(b))
    }
}

/// Centered RMSProp: the mean gradient `ḡ` third, the momentum buffer second (used when
/// `MOMENTUM`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Centered<const MOMENTUM: bool>(RmsPropStep);

impl<const MOMENTUM: bool> Kernel<3> for Centered<MOMENTUM> {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [h, b, mean]: &mut [V; 3]) -> V {
        let k = &self.0;
        k.square(g, h);
        // torch: grad_avg.lerp_(grad, 1 − α); avg = square_avg.addcmul(grad_avg, grad_avg, −1)
        *mean = *mean + V::splat(k.one_minus_decay) * (g - *mean);
        let avg = (*h - *mean * *mean).sqrt() + V::splat(k.eps);
        k.weight(w, g, avg, MOMENTUM.then_some(b))
    }
}

impl RuleImpl for RmsPropConfig {
    const NAME: &'static str = "rmsprop";
    const BUFFERS: &'static [StateBuffer] = &[
        StateBuffer::unsigned("h"),
        StateBuffer {
            name: "b",
            optional: true,
            signed: true,
        },
        StateBuffer {
            name: "g_avg",
            optional: true,
            signed: true,
        },
    ];
    config_fields!(
        lr,
        decay_rate,
        eps,
        weight_decay,
        maximize,
        momentum,
        centered
    );
    fn state_buffers(&self) -> usize {
        match (self.centered, self.momentum > 0.0) {
            (true, _) => 3,
            (false, true) => 2,
            (false, false) => 1,
        }
    }
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig::l2(self.lr, self.weight_decay, self.maximize);
        match (self.centered, self.momentum > 0.0) {
            (false, false) => x.run(common, |h| RmsPropStep::new(self, h.lr)),
            (false, true) => x.run(common, |h| WithMomentum(RmsPropStep::new(self, h.lr))),
            (true, false) => x.run(common, |h| Centered::<false>(RmsPropStep::new(self, h.lr))),
            (true, true) => x.run(common, |h| Centered::<true>(RmsPropStep::new(self, h.lr))),
        }
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

    #[test]
    fn centered_and_momentum_follow_torch() {
        let c = RmsPropConfig {
            decay_rate: 0.5,
            eps: 0.0,
            momentum: 0.5,
            ..Default::default()
        };
        let k = RmsPropStep::new(&c, 1.0);
        let mut s = [4.0f32, 2.0];
        // h = 4; b = 0.5·2 + 2/2 = 2; w = 1 − 2.
        let w = WithMomentum(k).update(1.0f32, 2.0, &mut s);
        assert_eq!((s, w), ([4.0, 2.0], -1.0));
        let mut s = [4.0f32, 2.0, 1.0];
        // h = 4; ḡ = 1 + 0.5·(2 − 1) = 1.5; avg = √(4 − 2.25); b = 1 + 2/avg.
        let w = Centered::<true>(k).update(1.0f32, 2.0, &mut s);
        let avg = (4.0f32 - 2.25).sqrt();
        assert_eq!(s, [4.0, 1.0 + 2.0 / avg, 1.5]);
        assert_eq!(w, 1.0 - (1.0 + 2.0 / avg));
        let mut s = [4.0f32, 2.0, 1.0];
        let w = Centered::<false>(k).update(1.0f32, 2.0, &mut s);
        assert_eq!((s[1], w), (2.0, 1.0 - 2.0 / avg)); // the buffer is not used
        assert!(RmsPropConfig { momentum: -1.0, ..c }.validate().is_err());
    }
}
