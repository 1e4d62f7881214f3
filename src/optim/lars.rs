//! LARS (You, Gitman and Ginsburg 2017, "Large Batch Training of Convolutional Networks",
//! Algorithm 1): SGD with momentum whose gradient is scaled per tensor by the trust ratio
//! `η·‖w‖/(‖g‖ + λ·‖w‖)`.

use super::{
    Fused, StateBuffer, check, check_eps, check_lr, check_unit, check_weight_decay,
    config_fields, sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// LARS, the layer-wise adaptive rate scaling of You et al. (2017), in the form of timm's
/// `Lars` (the learning rate outside the momentum, as `torch.optim.SGD` and apex's `LARC`
/// have it; at a constant learning rate this is the paper's Algorithm 1):
///
/// `r = η·‖w‖/(‖g‖ + λ·‖w‖ + ε);  d = r·(g + λ·w);  b ← μ·b + (1−δ)·d;  w ← w − lr·b`
/// (Nesterov: `w ← w − lr·(d + μ·b)`),
///
/// with the norms taken over each tensor, `r = 1` where either norm is 0, and `b = d` on a
/// tensor's first step. A tensor whose weight decay is 0 takes `r = 1` (plain SGD) unless
/// [`always_adapt`](LarsConfig::always_adapt); without momentum no state is kept. Each tensor
/// is read once to measure its norms, then updated in one pass.
///
/// ```
/// use fusedopt::{Lars, LarsConfig, Optimizer};
/// let config = LarsConfig { lr: 1.0, trust_coeff: 0.5, always_adapt: true, ..Default::default() };
/// let mut opt = Lars::new(config);
/// let mut w = [3.0f32, 4.0];
/// opt.step(&mut w, &[0.0, 2.0])?;
/// // r = 0.5·5/2 (ε aside): the gradient (0, 2) moves w by (0, 2.5).
/// assert_eq!(w[0], 3.0);
/// assert!((w[1] - 1.5).abs() < 1e-6);
/// # Ok::<(), fusedopt::StepError>(())
/// ```
pub type Lars = Fused<LarsConfig>;

/// Hyperparameters of [`Lars`]: timm's defaults (so, by default, no momentum and no weight
/// decay, which leaves every tensor unadapted: set them).
///
/// ```
/// let c = fusedopt::LarsConfig::default();
/// assert_eq!((c.lr, c.momentum, c.trust_coeff, c.eps), (1.0, 0.0, 0.001, 1e-8));
/// assert!(!c.nesterov && !c.trust_clip && !c.always_adapt);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LarsConfig {
    /// Learning rate (default 1). Finite and `>= 0`.
    pub lr: f32,
    /// Momentum μ (default 0), in `[0, 1]`. With 0 no state is kept.
    pub momentum: f32,
    /// Dampening δ (default 0), torch's: from a tensor's second step on, the scaled gradient
    /// enters the momentum as `(1 − δ)·d`. In `[0, 1]`; `f64`. Nesterov momentum requires 0.
    pub dampening: f64,
    /// Weight decay λ (default 0), in the ratio's denominator and added to the gradient.
    /// Finite and `>= 0`.
    pub weight_decay: f32,
    /// Nesterov momentum (default false).
    pub nesterov: bool,
    /// The trust coefficient η (default 0.001). Finite and `>= 0`.
    pub trust_coeff: f32,
    /// Added to the ratio's denominator (default 1e-8). Finite and `>= 0`.
    pub eps: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
    /// LARC's clipping (default false): `r ← min(r/lr, 1)`, so that a tensor's rate `lr·r`
    /// never exceeds `lr`.
    pub trust_clip: bool,
    /// Apply the trust ratio to tensors whose weight decay is 0 too (default false, as timm).
    pub always_adapt: bool,
}

impl Default for LarsConfig {
    fn default() -> Self {
        LarsConfig {
            lr: 1.0,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            trust_coeff: 0.001,
            eps: 1e-8,
            maximize: false,
            trust_clip: false,
            always_adapt: false,
        }
    }
}

impl LarsConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::LarsConfig;
    /// assert!(LarsConfig::default().validate().is_ok());
    /// let err = LarsConfig { nesterov: true, dampening: 0.5, ..Default::default() }
    ///     .validate()
    ///     .unwrap_err();
    /// assert!(err.to_string().contains("Nesterov"));
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        check_unit(Self::NAME, "momentum", self.momentum, true)?;
        check_unit(Self::NAME, "dampening", self.dampening, true)?;
        if self.nesterov && self.dampening != 0.0 {
            let d = self.dampening as f32;
            check(Self::NAME, "dampening", d, false, "0 (Nesterov momentum has no dampening)")?;
        }
        check_weight_decay(Self::NAME, self.weight_decay)?;
        let eta = self.trust_coeff;
        check(
            Self::NAME,
            "trust_coeff",
            eta,
            eta.is_finite() && eta >= 0.0,
            "finite and >= 0",
        )?;
        check_eps(Self::NAME, self.eps)
    }
}

/// The trust ratio `η·‖w‖/(‖g‖ + λ‖w‖ + ε)` of a tensor (1 where either norm is 0 or NaN), with
/// LARC's clipping `min(r/lr, 1)` when `clip`.
pub(crate) fn lars_ratio(c: &LarsConfig, w_norm: f64, g_norm: f64, lr: f32, wd: f32) -> f64 {
    let r = if w_norm > 0.0 && g_norm > 0.0 {
        f64::from(c.trust_coeff) * w_norm / (g_norm + w_norm * f64::from(wd) + f64::from(c.eps))
    } else {
        1.0
    };
    if c.trust_clip {
        (r / f64::from(lr)).min(1.0)
    } else {
        r
    }
}

/// Per-step scalars of LARS for one class of tensors; `ratio` is the tensor's once its norms
/// are known. `MOMENTUM`: a momentum buffer is kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LarsStep<const MOMENTUM: bool> {
    config: LarsConfig,
    lr: f32,
    wd: f32,
    ratio: f32,
    /// `1 − δ`, applied when `damp` (after a tensor's first step).
    g_scale: f32,
    damp: bool,
    adapt: bool,
}

impl<const MOMENTUM: bool> LarsStep<MOMENTUM> {
    /// The scalars of a tensor's step `t` in a group with learning rate `lr` and decay `wd`.
    fn new(c: &LarsConfig, t: u64, lr: f32, wd: f32) -> Self {
        LarsStep {
            config: *c,
            lr,
            wd,
            ratio: 1.0,
            g_scale: (1.0 - c.dampening) as f32,
            damp: c.dampening != 0.0 && t > 1,
            adapt: wd != 0.0 || c.always_adapt,
        }
    }

    /// The scaled gradient `d = r·(g + λ·w)` (`g` itself for a tensor not adapted).
    #[inline(always)]
    fn scaled<V: Lane>(&self, w: V, g: V) -> V {
        if !self.adapt {
            return g;
        }
        let g = if self.wd != 0.0 {
            g + V::splat(self.wd) * w
        } else {
            g
        };
        g * V::splat(self.ratio)
    }
}

impl Kernel<0> for LarsStep<false> {
    const TRUST: bool = true;

    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, _: &mut [V; 0]) -> V {
        w - V::splat(self.lr) * self.scaled(w, g)
    }

    fn measures(&self) -> bool {
        self.adapt
    }

    fn with_norms(&self, [w_norm, g_norm]: [f64; 2]) -> Self {
        let ratio = lars_ratio(&self.config, w_norm, g_norm, self.lr, self.wd) as f32;
        LarsStep { ratio, ..*self }
    }
}

impl Kernel<1> for LarsStep<true> {
    const TRUST: bool = true;

    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [b]: &mut [V; 1]) -> V {
        let d = self.scaled(w, g);
        let mu = V::splat(self.config.momentum);
        let entering = if self.damp {
            d * V::splat(self.g_scale)
        } else {
            d
        };
        *b = mu * *b + entering;
        let step = if self.config.nesterov { d + mu * *b } else { *b };
        w - V::splat(self.lr) * step
    }

    fn measures(&self) -> bool {
        self.adapt
    }

    fn with_norms(&self, [w_norm, g_norm]: [f64; 2]) -> Self {
        let ratio = lars_ratio(&self.config, w_norm, g_norm, self.lr, self.wd) as f32;
        LarsStep { ratio, ..*self }
    }
}

impl RuleImpl for LarsConfig {
    const NAME: &'static str = "lars";
    const BUFFERS: &'static [StateBuffer] = &[StateBuffer {
        name: "b",
        optional: true,
        signed: true,
    }];
    config_fields!(
        lr,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        trust_coeff,
        eps,
        maximize,
        trust_clip,
        always_adapt,
    );
    fn state_buffers(&self) -> usize {
        usize::from(self.momentum > 0.0)
    }
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            maximize: self.maximize,
            l2_decay: false,
        };
        let c = self;
        if self.momentum > 0.0 {
            x.run(common, |h| LarsStep::<true>::new(c, h.t, h.lr, h.weight_decay))
        } else {
            x.run(common, |h| LarsStep::<false>::new(c, h.t, h.lr, h.weight_decay))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_formula() {
        let c = LarsConfig {
            momentum: 0.5,
            weight_decay: 0.5,
            trust_coeff: 0.25,
            eps: 0.0,
            ..Default::default()
        };
        let k = LarsStep::<true>::new(&c, 1, 2.0, 0.5);
        // ‖w‖ = 4, ‖g‖ = 2: r = 0.25·4/(2 + 0.5·4) = 0.25.
        let k = k.with_norms([4.0, 2.0]);
        assert_eq!(k.ratio, 0.25);
        let mut b = [0.0f32];
        // d = 0.25·(1 + 0.5·2) = 0.5; b = d; w = 2 − 2·0.5.
        let w = k.update(2.0f32, 1.0, &mut b);
        assert_eq!((w, b), (1.0, [0.5]));
        let w = k.update(2.0f32, 1.0, &mut b); // b = 0.5·0.5 + 0.5
        assert_eq!((w, b), (2.0 - 2.0 * 0.75, [0.75]));
    }

    #[test]
    fn the_ratio_follows_larc_at_its_edges() {
        let c = LarsConfig {
            trust_coeff: 0.5,
            eps: 0.0,
            ..Default::default()
        };
        assert_eq!(lars_ratio(&c, 0.0, 1.0, 1.0, 0.0), 1.0);
        assert_eq!(lars_ratio(&c, 1.0, 0.0, 1.0, 0.0), 1.0);
        assert_eq!(lars_ratio(&c, 4.0, 1.0, 1.0, 0.0), 2.0);
        let clip = LarsConfig {
            trust_clip: true,
            ..c
        };
        // r/lr = 2/4 = 0.5; and min(2/1, 1) = 1.
        assert_eq!(lars_ratio(&clip, 4.0, 1.0, 4.0, 0.0), 0.5);
        assert_eq!(lars_ratio(&clip, 4.0, 1.0, 1.0, 0.0), 1.0);
    }

    #[test]
    fn tensors_without_decay_are_plain_sgd_unless_always_adapted() {
        let c = LarsConfig::default();
        let k = LarsStep::<false>::new(&c, 1, 0.5, 0.0);
        assert!(!k.measures());
        assert_eq!(k.update(1.0f32, 2.0, &mut []), 0.0);
        let always = LarsConfig {
            always_adapt: true,
            ..c
        };
        assert!(LarsStep::<false>::new(&always, 1, 0.5, 0.0).measures());
    }
}
