//! Adam: `m ← m + (1−β1)(g − m); v ← v + (1−β2)(g² − v); w ← w − lr_t·m / (√v + ε)` with
//! `lr_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)`.

use crate::engine::{Base, Core, Params};
use crate::optimizer::{
    StepError, StepReport, check_eps, check_lr, check_unit, check_weight_decay, sealed::Rule,
};
use crate::simd::{Kernel, Lane};

/// Where Adam's `ε` goes, for [`AdamConfig::eps_mode`].
///
/// ```
/// assert_eq!(fusedopt::EpsMode::default(), fusedopt::EpsMode::Seed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EpsMode {
    /// `w ← w − lr_t·m / (√v + ε)` with `lr_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)`: `ε` is added to the
    /// uncorrected `√v` (the default).
    #[default]
    Seed,
    /// `w ← w − (lr/(1−β1ᵗ))·m / (√v/√(1−β2ᵗ) + ε)`: `ε` is added to the bias-corrected `√v̂`, as
    /// in `torch.optim.Adam` and `AdamW`.
    PyTorch,
}

impl crate::checkpoint::FieldValue for EpsMode {
    fn encode(&self) -> String {
        match self {
            EpsMode::Seed => "seed",
            EpsMode::PyTorch => "pytorch",
        }
        .to_string()
    }
    fn decode(s: &str) -> Option<Self> {
        match s {
            "seed" => Some(EpsMode::Seed),
            "pytorch" => Some(EpsMode::PyTorch),
            _ => None,
        }
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
    /// Decay β1 of the first moment (default 0.9), in `[0, 1)`.
    pub beta1: f32,
    /// Decay β2 of the second moment (default 0.999), in `[0, 1)`.
    pub beta2: f32,
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
    /// Where `ε` is added (default [`EpsMode::Seed`]).
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
            eps_mode: EpsMode::Seed,
        }
    }
}

impl AdamConfig {
    /// The configuration of `torch.optim.AdamW`'s defaults: lr 0.001, β 0.9/0.999, ε 1e-8 in
    /// [`EpsMode::PyTorch`], decoupled weight decay 0.01.
    ///
    /// ```
    /// let c = fusedopt::AdamConfig::adamw();
    /// assert!(c.decoupled_weight_decay && c.weight_decay == 0.01);
    /// ```
    pub fn adamw() -> Self {
        AdamConfig {
            eps: 1e-8,
            weight_decay: 0.01,
            decoupled_weight_decay: true,
            eps_mode: EpsMode::PyTorch,
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
        check_lr(Adam::NAME, self.lr)?;
        check_unit(Adam::NAME, "beta1", self.beta1, false)?;
        check_unit(Adam::NAME, "beta2", self.beta2, false)?;
        check_eps(Adam::NAME, self.eps)?;
        check_weight_decay(Adam::NAME, self.weight_decay)
    }
}

crate::checkpoint::config_fields!(AdamConfig {
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    maximize,
    decoupled_weight_decay,
    amsgrad,
    eps_mode
});

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

/// Per-step scalars of Adam at step `t`, computed in f64 and rounded once to f32. `TORCH`
/// selects [`EpsMode::PyTorch`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamStep<const TORCH: bool> {
    /// `lr_t` ([`EpsMode::Seed`]) or `lr/(1−β1ᵗ)` ([`EpsMode::PyTorch`]).
    step_size: f32,
    /// `√(1−β2ᵗ)` ([`EpsMode::PyTorch`] only).
    bc2_sqrt: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    /// AdamW's `1 − lr·wd`, applied when `decoupled`.
    w_decay: f32,
    decoupled: bool,
}

impl<const TORCH: bool> AdamStep<TORCH> {
    /// The scalars of step `t` for a parameter group with learning rate `lr` and weight decay
    /// `wd`.
    pub(crate) fn new(c: &AdamConfig, t: u64, lr: f32, wd: f32) -> Self {
        let t = t as f64;
        let (b1, b2, lr) = (f64::from(c.beta1), f64::from(c.beta2), f64::from(lr));
        let bc1 = 1.0 - b1.powf(t);
        let bc2_sqrt = (1.0 - b2.powf(t)).sqrt();
        AdamStep {
            step_size: if TORCH { lr / bc1 } else { lr * bc2_sqrt / bc1 } as f32,
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
        if TORCH {
            // torch: param.addcdiv_(exp_avg, v.sqrt() / bc2_sqrt + eps, value = -step_size)
            let denom = v.sqrt() / V::splat(self.bc2_sqrt) + V::splat(self.eps);
            w - V::splat(self.step_size) * (m / denom)
        } else {
            w - V::splat(self.step_size) * m / (v.sqrt() + V::splat(self.eps))
        }
    }
}

impl<const TORCH: bool> Kernel<2> for AdamStep<TORCH> {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [m, v]: &mut [V; 2]) -> V {
        self.moments(g, m, v);
        self.weight(w, *m, *v)
    }
}

/// AMSGrad: Adam with a third state buffer `v_max ← max(v_max, v)` in the denominator.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AmsGrad<const TORCH: bool>(AdamStep<TORCH>);

impl<const TORCH: bool> Kernel<3> for AmsGrad<TORCH> {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [m, v, v_max]: &mut [V; 3]) -> V {
        self.0.moments(g, m, v);
        // `Lane::max` returns its argument when that is NaN, so a NaN `v` reaches `v_max`.
        *v_max = v_max.max(*v);
        self.0.weight(w, *m, *v_max)
    }
}

impl Rule for Adam {
    type Config = AdamConfig;
    const BUFFER_NAMES: &'static [&'static str] = &["m", "v", "v_max"];
    const NAME: &'static str = "adam";
    fn state_buffers(&self) -> usize {
        if self.config.amsgrad { 3 } else { 2 }
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
        let c = &self.config;
        c.validate()?;
        let t = self.core.steps() + 1;
        let base = Base {
            lr: c.lr,
            weight_decay: c.weight_decay,
            maximize: c.maximize,
            l2: !c.decoupled_weight_decay,
        };
        let core = &mut self.core;
        match (c.amsgrad, c.eps_mode) {
            (false, EpsMode::Seed) => core.run(params, base, |h| {
                AdamStep::<false>::new(c, t, h.lr, h.weight_decay)
            }),
            (false, EpsMode::PyTorch) => core.run(params, base, |h| {
                AdamStep::<true>::new(c, t, h.lr, h.weight_decay)
            }),
            (true, EpsMode::Seed) => core.run(params, base, |h| {
                AmsGrad(AdamStep::<false>::new(c, t, h.lr, h.weight_decay))
            }),
            (true, EpsMode::PyTorch) => core.run(params, base, |h| {
                AmsGrad(AdamStep::<true>::new(c, t, h.lr, h.weight_decay))
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
        let expected = 0.001f64 * (1.0 - 0.999f32 as f64).sqrt() / (1.0 - 0.9f32 as f64);
        assert_eq!(k.step_size, expected as f32);
        assert_eq!(k.one_minus_beta2, (1.0 - 0.999f32 as f64) as f32);
        let k = AdamStep::<true>::new(&c, 1, c.lr, 0.0);
        assert_eq!(k.step_size, (0.001f64 / (1.0 - 0.9f32 as f64)) as f32);
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
