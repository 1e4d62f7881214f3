//! LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
//! minutes", ICLR, Algorithm 2): Adam's direction `u = m̂/(√v̂ + ε) + λ·w`, scaled per tensor by
//! the trust ratio `‖w‖/‖u‖`: `w ← w − lr·(‖w‖/‖u‖)·u`.

use super::{
    Fused, StateBuffer, check_eps, check_lr, check_unit, check_weight_decay, config_fields,
    sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// LAMB, the layer-wise adaptive Adam of You et al. (2020), with the conventions of timm's
/// `Lamb` and apex's `FusedLAMB`:
///
/// `m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
/// u = m·c1 / (√v·c2 + ε) + λ·w;  r = ‖w‖/‖u‖;  w ← w − lr·r·u`,
///
/// with the bias corrections `c1 = 1/(1−β1ᵗ)` and `c2 = 1/√(1−β2ᵗ)` (so `m·c1 = m̂` and
/// `√v·c2 = √v̂`), `m`, `v` starting at zero, the norms taken over each tensor, and `r = 1` where either
/// norm is 0. A tensor whose weight decay is 0 (biases and norms, in the usual parameter groups)
/// takes `r = 1` unless [`always_adapt`](LambConfig::always_adapt). With `f32` state, a first
/// pass updates the moments and measures the norms, a second updates the weights from the
/// moments (the gradients are read once); with compact state, a read-only pass measures and
/// the update is one pass.
///
/// ```
/// use fusedopt::{Lamb, LambConfig, Optimizer};
/// let mut opt = Lamb::new(LambConfig { lr: 0.1, weight_decay: 0.0, always_adapt: true, ..Default::default() });
/// let mut w = [3.0f32, 4.0];
/// opt.step(&mut w, &[1.0, 1.0])?;
/// // u = (1, 1) (up to ε): ‖w‖/‖u‖ = 5/√2, so each weight moves by lr·5/√2.
/// let moved = 0.1 * 5.0 / 2f32.sqrt();
/// assert!((w[0] - (3.0 - moved)).abs() < 1e-4 && (w[1] - (4.0 - moved)).abs() < 1e-4);
/// # Ok::<(), fusedopt::StepError>(())
/// ```
pub type Lamb = Fused<LambConfig>;

/// Hyperparameters of [`Lamb`]: timm's defaults.
///
/// ```
/// let c = fusedopt::LambConfig::default();
/// assert_eq!((c.lr, c.beta1, c.beta2, c.eps, c.weight_decay), (1e-3, 0.9, 0.999, 1e-6, 0.01));
/// assert!(c.bias_correction && !c.trust_clip && !c.always_adapt);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LambConfig {
    /// Learning rate (default 0.001). Finite and `>= 0`.
    pub lr: f32,
    /// Decay β1 of the first moment (default 0.9), in `[0, 1)`. Kept in `f64`, as given; `1 − β1`
    /// and `β1ᵗ` are computed from it and rounded once.
    pub beta1: f64,
    /// Decay β2 of the second moment (default 0.999), in `[0, 1)`; `f64`, as `beta1`.
    pub beta2: f64,
    /// Added to the bias-corrected `√v̂` (default 1e-6). Finite and `>= 0`.
    pub eps: f32,
    /// Weight decay λ (default 0.01), added to the update direction: `u ← u + λ·w`. Finite and
    /// `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
    /// Divide the moments by `1 − βᵗ` (default true).
    pub bias_correction: bool,
    /// Clamp the trust ratio to at most 1 (default false; timm's `trust_clip`).
    pub trust_clip: bool,
    /// Apply the trust ratio to tensors whose weight decay is 0 too (default false: they take
    /// the plain direction, as timm's and apex's LAMB do).
    pub always_adapt: bool,
}

impl Default for LambConfig {
    fn default() -> Self {
        LambConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.01,
            maximize: false,
            bias_correction: true,
            trust_clip: false,
            always_adapt: false,
        }
    }
}

impl LambConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::LambConfig;
    /// assert!(LambConfig::default().validate().is_ok());
    /// let err = LambConfig { beta2: 1.0, ..Default::default() }.validate().unwrap_err();
    /// assert_eq!(err.to_string(), "lamb: beta2 = 1 is invalid, expected in [0, 1)");
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        check_unit(Self::NAME, "beta1", self.beta1, false)?;
        check_unit(Self::NAME, "beta2", self.beta2, false)?;
        check_eps(Self::NAME, self.eps)?;
        check_weight_decay(Self::NAME, self.weight_decay)
    }
}

/// The trust ratio `‖w‖/‖u‖` of a tensor, 1 where either norm is 0 (or NaN), clamped to 1 when
/// `clip`.
pub(crate) fn lamb_ratio(w_norm: f64, u_norm: f64, clip: bool) -> f64 {
    let r = if w_norm > 0.0 && u_norm > 0.0 {
        w_norm / u_norm
    } else {
        1.0
    };
    if clip { r.min(1.0) } else { r }
}

/// Per-step scalars of LAMB for one class of tensors, computed in f64 and rounded once to f32;
/// `step` is `lr·r` once the tensor's norms are known.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LambStep {
    lr: f32,
    step: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// `1/(1 − β1ᵗ)` (1 without bias correction).
    bc1_inv: f32,
    /// `1/√(1 − β2ᵗ)` (1 without bias correction).
    bc2_sqrt_inv: f32,
    eps: f32,
    wd: f32,
    adapt: bool,
    clip: bool,
}

impl LambStep {
    /// The scalars of step `t` for a parameter group with learning rate `lr` and weight decay
    /// `wd`.
    pub(crate) fn new(c: &LambConfig, t: u64, lr: f32, wd: f32) -> Self {
        let t = t as f64;
        let (bc1, bc2) = if c.bias_correction {
            (1.0 - c.beta1.powf(t), 1.0 - c.beta2.powf(t))
        } else {
            (1.0, 1.0)
        };
        LambStep {
            lr,
            step: lr,
            beta1: c.beta1 as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            bc1_inv: (1.0 / bc1) as f32,
            bc2_sqrt_inv: (1.0 / bc2.sqrt()) as f32,
            eps: c.eps,
            wd,
            adapt: wd != 0.0 || c.always_adapt,
            clip: c.trust_clip,
        }
    }

    /// The new moments from the gradient.
    #[inline(always)]
    fn moments<V: Lane>(&self, g: V, m: V, v: V) -> (V, V) {
        let m = V::splat(self.beta1) * m + V::splat(self.one_minus_beta1) * g;
        let v = V::splat(self.beta2) * v + V::splat(self.one_minus_beta2) * (g * g);
        (m, v)
    }

    /// The direction `u` the new moments `m`, `v` give at weight `w`.
    #[inline(always)]
    fn direction<V: Lane>(&self, w: V, m: V, v: V) -> V {
        // The bias corrections as multiplications by their reciprocals (computed in f64, rounded
        // once): one division per element, as Adam's.
        let denom = v.sqrt() * V::splat(self.bc2_sqrt_inv) + V::splat(self.eps);
        let u = (m * V::splat(self.bc1_inv)) / denom;
        if self.wd != 0.0 {
            u + V::splat(self.wd) * w
        } else {
            u
        }
    }
}

impl Kernel<2> for LambStep {
    const TRUST: bool = true;
    const SPLIT: bool = true;

    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [m, v]: &mut [V; 2]) -> V {
        (*m, *v) = self.moments(g, *m, *v);
        w - V::splat(self.step) * self.direction(w, *m, *v)
    }

    fn measures(&self) -> bool {
        self.adapt
    }

    #[inline(always)]
    fn measure<V: Lane>(&self, w: V, g: V, &[m, v]: &[V; 2]) -> [V; 2] {
        let (m, v) = self.moments(g, m, v);
        [w, self.direction(w, m, v)]
    }

    fn with_norms(&self, [w_norm, u_norm]: [f64; 2]) -> Self {
        let r = lamb_ratio(w_norm, u_norm, self.clip);
        LambStep {
            step: (f64::from(self.lr) * r) as f32,
            ..*self
        }
    }

    #[inline(always)]
    fn measure_update<V: Lane>(&self, w: V, g: V, [m, v]: &mut [V; 2]) -> [V; 2] {
        (*m, *v) = self.moments(g, *m, *v);
        [w, self.direction(w, *m, *v)]
    }

    #[inline(always)]
    fn apply<V: Lane>(&self, w: V, &[m, v]: &[V; 2]) -> V {
        w - V::splat(self.step) * self.direction(w, m, v)
    }
}

impl RuleImpl for LambConfig {
    const NAME: &'static str = "lamb";
    const BUFFERS: &'static [StateBuffer] =
        &[StateBuffer::signed("m"), StateBuffer::unsigned("v")];
    config_fields!(
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        maximize,
        bias_correction,
        trust_clip,
        always_adapt,
    );
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            maximize: self.maximize,
            l2_decay: false,
        };
        x.run(common, |h| LambStep::new(self, h.t, h.lr, h.weight_decay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_formula() {
        let c = LambConfig {
            beta1: 0.5,
            beta2: 0.75,
            eps: 0.0,
            weight_decay: 0.5,
            ..Default::default()
        };
        let k = LambStep::new(&c, 1, 0.25, 0.5);
        let mut s = [0.0f32, 0.0];
        let [_, u] = k.measure(2.0f32, 4.0, &s);
        // m = 2, v = 4; m̂ = 4, √v̂ = 4: u = 1 + 0.5·2.
        assert_eq!(u, 2.0);
        // Norms ‖w‖ = 6, ‖u‖ = 3: r = 2, so the step is 0.25·2·u.
        let k = k.with_norms([6.0, 3.0]);
        let w = k.update(2.0f32, 4.0, &mut s);
        assert_eq!((w, s), (2.0 - 0.5 * 2.0, [2.0, 4.0]));
    }

    #[test]
    fn the_split_step_is_the_update_bit_for_bit() {
        let k = LambStep::new(&LambConfig::default(), 3, 0.01, 0.01).with_norms([2.0, 0.7]);
        for (w, g, m, v) in [(0.3f32, -1.7f32, 0.2f32, 0.9f32), (-2.0, 1e-3, -0.5, 1e-6)] {
            let mut whole = [m, v];
            let updated = k.update(w, g, &mut whole);
            let mut split = [m, v];
            let [_, u] = k.measure_update(w, g, &mut split);
            assert_eq!(u, k.measure(w, g, &[m, v])[1]);
            assert_eq!(split, whole);
            assert_eq!(k.apply(w, &split).to_bits(), updated.to_bits());
        }
    }

    #[test]
    fn the_ratio_is_one_where_a_norm_is_zero_and_clips_to_one() {
        assert_eq!(lamb_ratio(0.0, 2.0, false), 1.0);
        assert_eq!(lamb_ratio(2.0, 0.0, false), 1.0);
        assert_eq!(lamb_ratio(2.0, f64::NAN, false), 1.0);
        assert_eq!(lamb_ratio(6.0, 2.0, false), 3.0);
        assert_eq!(lamb_ratio(6.0, 2.0, true), 1.0);
        assert_eq!(lamb_ratio(1.0, 4.0, true), 0.25);
    }

    #[test]
    fn tensors_without_decay_adapt_only_when_asked() {
        let c = LambConfig::default();
        assert!(!LambStep::new(&c, 1, 1e-3, 0.0).measures());
        assert!(LambStep::new(&c, 1, 1e-3, 0.01).measures());
        let always = LambConfig {
            always_adapt: true,
            ..c
        };
        assert!(LambStep::new(&always, 1, 1e-3, 0.0).measures());
    }
}
