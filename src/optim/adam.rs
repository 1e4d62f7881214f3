//! Adam: `m ← m + (1−β1)(g − m); v ← v + (1−β2)(g² − v); w ← w − lr_t·m / (√v + ε)` with
//! `lr_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)`; AdamW, AMSGrad and PyTorch's placement of `ε` as options.

use super::{
    FieldValue, Fused, Preset, StateBuffer, check_eps, check_lr, check_unit, check_weight_decay,
    config_fields, sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport, Value};

/// Adam, with the bias correction folded into the step size:
///
/// `t ← t+1; lr_t = lr·√(1−β2ᵗ)/(1−β1ᵗ); m ← m + (1−β1)(g − m); v ← v + (1−β2)(g² − v);
/// w ← w − lr_t·m / (√v + ε)`, with `m` and `v` starting at zero.
///
/// By default `ε` is added to `√v`, not to a bias-corrected `√v̂` ([`EpsMode`]). AdamW, AMSGrad,
/// weight decay and `maximize` are options of [`AdamConfig`].
///
/// ```
/// use fusedopt::{Adam, AdamConfig, Optimizer};
/// let mut opt = Adam::new(AdamConfig { lr: 0.1, ..Default::default() });
/// let mut w = [1.0f32, 1.0];
/// opt.step(&mut w, &[3.0, -0.5]).unwrap();
/// // The first step moves every weight by about lr against its gradient's sign.
/// assert!((w[0] - 0.9).abs() < 1e-5 && (w[1] - 1.1).abs() < 1e-5);
/// ```
pub type Adam = Fused<AdamConfig>;

/// Where Adam's `ε` goes, for [`AdamConfig::eps_mode`].
///
/// ```
/// use fusedopt::EpsMode;
/// assert_eq!(EpsMode::default(), EpsMode::SqrtV);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EpsMode {
    /// `ε` is added to the uncorrected `√v`: `w ← w − lr_t·m / (√v + ε)` with
    /// `lr_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)` (the default, the update rule of the numpy reference).
    /// `seed` or `sqrt_v` in configuration strings.
    #[default]
    SqrtV,
    /// `ε` is added to the bias-corrected `√v̂ = √v/√(1−β2ᵗ)`:
    /// `w ← w − (lr/(1−β1ᵗ))·m / (√v̂ + ε)`, as in `torch.optim.Adam` and `AdamW`. `pytorch` or
    /// `sqrt_v_hat` in configuration strings.
    SqrtVHat,
}

#[allow(non_upper_case_globals)]
impl EpsMode {
    /// The former name of [`EpsMode::SqrtV`].
    ///
    /// ```
    /// # #![allow(deprecated)]
    /// assert_eq!(fusedopt::EpsMode::Seed, fusedopt::EpsMode::SqrtV);
    /// ```
    #[deprecated(note = "renamed to `EpsMode::SqrtV`, which says where ε goes")]
    pub const Seed: EpsMode = EpsMode::SqrtV;

    /// The former name of [`EpsMode::SqrtVHat`].
    ///
    /// ```
    /// # #![allow(deprecated)]
    /// assert_eq!(fusedopt::EpsMode::PyTorch, fusedopt::EpsMode::SqrtVHat);
    /// ```
    #[deprecated(note = "renamed to `EpsMode::SqrtVHat`, which says where ε goes")]
    pub const PyTorch: EpsMode = EpsMode::SqrtVHat;
}

/// State files write the names of the first release (`seed`, `pytorch`); both spellings read.
impl FieldValue for EpsMode {
    fn encode(&self) -> String {
        match self {
            EpsMode::SqrtV => "seed",
            EpsMode::SqrtVHat => "pytorch",
        }
        .to_string()
    }
    fn parse(&mut self, text: &str) -> Result<(), &'static str> {
        *self = match text.trim() {
            "seed" | "sqrt_v" => EpsMode::SqrtV,
            "pytorch" | "sqrt_v_hat" => EpsMode::SqrtVHat,
            _ => return Err("sqrt_v (or seed) or sqrt_v_hat (or pytorch)"),
        };
        Ok(())
    }
    fn value(&self) -> Value {
        Value::Choice(
            match self {
                EpsMode::SqrtV => "sqrt_v",
                EpsMode::SqrtVHat => "sqrt_v_hat",
            }
            .to_string(),
        )
    }
}

/// Hyperparameters of [`Adam`].
///
/// ```
/// let c = fusedopt::AdamConfig::default();
/// assert_eq!((c.lr, c.beta1, c.beta2, c.eps), (0.001, 0.9, 0.999, 1e-7));
/// assert!(!c.amsgrad && !c.decoupled_weight_decay && c.weight_decay == 0.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate (default 0.001). Finite and `>= 0`.
    pub lr: f32,
    /// Decay β1 of the first moment (default 0.9), in `[0, 1)`. Kept in `f64`, as given: the
    /// step computes `1 − β1` and `β1ᵗ` from it in `f64` and rounds them once, as torch does,
    /// so `0.9` means 0.9 (not the `f32` nearest to it).
    pub beta1: f64,
    /// Decay β2 of the second moment (default 0.999), in `[0, 1)`; `f64`, as `beta1`.
    pub beta2: f64,
    /// Added to the denominator (default 1e-7; where, see [`eps_mode`](Self::eps_mode)). Finite
    /// and `>= 0`.
    pub eps: f32,
    /// Weight decay (default 0): an L2 term `g ← g + weight_decay·w` after `maximize`, or, with
    /// [`decoupled_weight_decay`](Self::decoupled_weight_decay), AdamW's decay. Finite and `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
    /// AdamW (default false): `w ← w·(1 − lr·weight_decay)` before the Adam update, instead of the
    /// L2 term.
    pub decoupled_weight_decay: bool,
    /// AMSGrad (default false): keep `v_max ← max(v_max, v)` in a third state buffer and use it in
    /// the denominator. Turned on after some steps, `v_max` starts from zero.
    pub amsgrad: bool,
    /// Where `ε` is added (default [`EpsMode::SqrtV`]).
    pub eps_mode: EpsMode,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 0.001,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-7,
            weight_decay: 0.0,
            maximize: false,
            decoupled_weight_decay: false,
            amsgrad: false,
            eps_mode: EpsMode::SqrtV,
        }
    }
}

impl AdamConfig {
    /// The configuration of `torch.optim.AdamW`'s defaults: lr 0.001, β 0.9/0.999, ε 1e-8 in
    /// [`EpsMode::SqrtVHat`], decoupled weight decay 0.01.
    ///
    /// ```
    /// let c = fusedopt::AdamConfig::adamw();
    /// assert!(c.decoupled_weight_decay && c.weight_decay == 0.01);
    /// assert_eq!(c.eps_mode, fusedopt::EpsMode::SqrtVHat);
    /// ```
    pub fn adamw() -> Self {
        AdamConfig {
            eps: 1e-8,
            weight_decay: 0.01,
            decoupled_weight_decay: true,
            eps_mode: EpsMode::SqrtVHat,
            ..Default::default()
        }
    }

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
        check_lr(Self::NAME, self.lr)?;
        check_unit(Self::NAME, "beta1", self.beta1, false)?;
        check_unit(Self::NAME, "beta2", self.beta2, false)?;
        check_eps(Self::NAME, self.eps)?;
        check_weight_decay(Self::NAME, self.weight_decay)
    }
}

/// Per-step scalars of Adam at step `t`, computed in f64 and rounded once to f32. `HAT`
/// selects [`EpsMode::SqrtVHat`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamStep<const HAT: bool> {
    /// `lr_t` ([`EpsMode::SqrtV`]) or `lr/(1−β1ᵗ)` ([`EpsMode::SqrtVHat`]).
    step_size: f32,
    /// `√(1−β2ᵗ)` ([`EpsMode::SqrtVHat`] only).
    bc2_sqrt: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    /// AdamW's `1 − lr·wd`, applied when `decoupled`.
    w_decay: f32,
    decoupled: bool,
}

impl<const HAT: bool> AdamStep<HAT> {
    /// The scalars of step `t` for a parameter group with learning rate `lr` and weight decay
    /// `wd`.
    pub(crate) fn new(c: &AdamConfig, t: u64, lr: f32, wd: f32) -> Self {
        let t = t as f64;
        let (b1, b2, lr) = (c.beta1, c.beta2, f64::from(lr));
        let bc1 = 1.0 - b1.powf(t);
        let bc2_sqrt = (1.0 - b2.powf(t)).sqrt();
        AdamStep {
            step_size: if HAT { lr / bc1 } else { lr * bc2_sqrt / bc1 } as f32,
            bc2_sqrt: bc2_sqrt as f32,
            one_minus_beta1: (1.0 - b1) as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: c.eps,
            w_decay: (1.0 - lr * f64::from(wd)) as f32,
            decoupled: c.decoupled_weight_decay && wd != 0.0,
        }
    }

    /// Updates the moments from the gradient.
    #[inline(always)]
    fn moments<V: Lane>(&self, g: V, m: &mut V, v: &mut V) {
        *m = *m + V::splat(self.one_minus_beta1) * (g - *m);
        *v = *v + V::splat(self.one_minus_beta2) * (g * g - *v);
    }

    /// The new weight from the first moment and the second moment the denominator uses.
    #[inline(always)]
    fn weight<V: Lane>(&self, w: V, m: V, v: V) -> V {
        let w = if self.decoupled {
            w * V::splat(self.w_decay)
        } else {
            w
        };
        if HAT {
            // torch: param.addcdiv_(exp_avg, v.sqrt() / bc2_sqrt + eps, value = -step_size)
            let denom = v.sqrt() / V::splat(self.bc2_sqrt) + V::splat(self.eps);
            w - V::splat(self.step_size) * (m / denom)
        } else {
            w - V::splat(self.step_size) * m / (v.sqrt() + V::splat(self.eps))
        }
    }
}

impl<const HAT: bool> Kernel<2> for AdamStep<HAT> {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [m, v]: &mut [V; 2]) -> V {
        self.moments(g, m, v);
        self.weight(w, *m, *v)
    }
}

/// AMSGrad: Adam with a third state buffer `v_max ← max(v_max, v)` in the denominator.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AmsGrad<const HAT: bool>(AdamStep<HAT>);

impl<const HAT: bool> Kernel<3> for AmsGrad<HAT> {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [m, v, v_max]: &mut [V; 3]) -> V {
        self.0.moments(g, m, v);
        // `Lane::max` returns its argument when that is NaN, so a NaN `v` reaches `v_max`.
        *v_max = v_max.max(*v);
        self.0.weight(w, *m, *v_max)
    }
}

impl RuleImpl for AdamConfig {
    const NAME: &'static str = "adam";
    const PRESETS: &'static [Preset<Self>] = &[("adamw", AdamConfig::adamw)];
    const BUFFERS: &'static [StateBuffer] = &[
        StateBuffer::signed("m"),
        StateBuffer::unsigned("v"),
        StateBuffer {
            name: "v_max",
            optional: true,
            signed: false,
        },
    ];
    config_fields!(
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        maximize,
        decoupled_weight_decay,
        amsgrad,
        eps_mode,
    );
    fn state_buffers(&self) -> usize {
        if self.amsgrad { 3 } else { 2 }
    }
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            maximize: self.maximize,
            l2_decay: !self.decoupled_weight_decay,
        };
        let c = self;
        match (c.amsgrad, c.eps_mode) {
            (false, EpsMode::SqrtV) => x.run(common, |h| {
                AdamStep::<false>::new(c, h.t, h.lr, h.weight_decay)
            }),
            (false, EpsMode::SqrtVHat) => x.run(common, |h| {
                AdamStep::<true>::new(c, h.t, h.lr, h.weight_decay)
            }),
            (true, EpsMode::SqrtV) => x.run(common, |h| {
                AmsGrad(AdamStep::<false>::new(c, h.t, h.lr, h.weight_decay))
            }),
            (true, EpsMode::SqrtVHat) => x.run(common, |h| {
                AmsGrad(AdamStep::<true>::new(c, h.t, h.lr, h.weight_decay))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalars(step_size: f32, bc2_sqrt: f32) -> AdamStep<false> {
        AdamStep {
            step_size,
            bc2_sqrt,
            one_minus_beta1: 0.5,
            one_minus_beta2: 0.25,
            eps: 0.0,
            w_decay: 1.0,
            decoupled: false,
        }
    }

    #[test]
    fn step_scalars_are_computed_in_f64() {
        let c = AdamConfig::default();
        let k = AdamStep::<false>::new(&c, 1, c.lr, 0.0);
        // lr is an f32 (0.001 rounded); β1 and β2 are the f64s 0.9 and 0.999.
        let lr = f64::from(0.001f32);
        let expected = lr * (1.0 - 0.999f64).sqrt() / (1.0 - 0.9f64);
        assert_eq!(k.step_size, expected as f32);
        // torch's 1 − β2: from the f64 0.999, rounded once (not 1 − 0.999f32).
        assert_eq!(k.one_minus_beta2, (1.0 - 0.999f64) as f32);
        assert_ne!(k.one_minus_beta2, (1.0 - f64::from(0.999f32)) as f32);
        let k = AdamStep::<true>::new(&c, 1, c.lr, 0.0);
        assert_eq!(k.step_size, (lr / (1.0 - 0.9f64)) as f32);
        assert!(!k.decoupled);
    }

    #[test]
    fn kernel_matches_formula() {
        let k = scalars(0.5, 1.0);
        let mut s = [1.0f32, 4.0];
        let w = k.update(2.0f32, 3.0, &mut s);
        assert_eq!(s, [2.0, 5.25]); // m = 1 + 0.5·2; v = 4 + 0.25·(9 − 4)
        assert_eq!(w, 2.0 - 0.5 * 2.0 / 5.25f32.sqrt());
    }

    #[test]
    fn pytorch_eps_divides_by_the_bias_correction() {
        let k = AdamStep::<true> {
            eps: 0.125,
            ..AdamStep::<true>::new(&AdamConfig::default(), 1, 0.5, 0.0)
        };
        let k = AdamStep::<true> {
            step_size: 0.5,
            bc2_sqrt: 0.25,
            one_minus_beta1: 0.5,
            one_minus_beta2: 0.25,
            ..k
        };
        let mut s = [1.0f32, 4.0];
        let w = k.update(2.0f32, 3.0, &mut s);
        assert_eq!(w, 2.0 - 0.5 * (2.0 / (5.25f32.sqrt() / 0.25 + 0.125)));
    }

    #[test]
    fn amsgrad_uses_the_running_maximum() {
        let k = AmsGrad(scalars(0.5, 1.0));
        let mut s = [0.0f32, 16.0, 16.0];
        // v decays to 16 + 0.25·(1 − 16), below v_max: the denominator keeps √16.
        let w = k.update(0.0f32, 1.0, &mut s);
        assert_eq!(s[1], 16.0 + 0.25 * (1.0 - 16.0));
        assert_eq!(s[2], 16.0);
        assert_eq!(w, -0.5 * 0.5 / 4.0);
        let mut s = [0.0f32, f32::NAN, 1.0];
        k.update(0.0f32, 1.0, &mut s);
        assert!(s[2].is_nan(), "a NaN second moment must reach v_max");
    }

    #[test]
    fn decoupled_decay_scales_the_weight_first() {
        let c = AdamConfig {
            weight_decay: 0.5,
            decoupled_weight_decay: true,
            ..Default::default()
        };
        let k = AdamStep::<false>::new(&c, 1, 0.1, 0.5);
        assert!(k.decoupled);
        assert_eq!(k.w_decay, 0.95);
        let mut s = [0.0f32; 2];
        let w = k.update(2.0f32, 0.0, &mut s);
        assert_eq!(w, 2.0 * 0.95);
    }
}
