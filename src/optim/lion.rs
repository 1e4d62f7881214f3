//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2):
//! `c ← β1·m + (1−β1)·g; w ← w·(1 − lr·λ) − lr·sign(c); m ← β2·m + (1−β2)·g`.

use super::{
    Fused, StateBuffer, check_lr, check_unit, check_weight_decay, config_fields, sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// Lion, the sign-momentum optimizer of Chen et al. (2023), with decoupled weight decay as in
/// the paper (and in DeepSpeed, bitsandbytes and `lion-pytorch`):
///
/// `c ← β1·m + (1−β1)·g;  w ← w·(1 − lr·λ) − lr·sign(c);  m ← β2·m + (1−β2)·g`,
///
/// with `m` starting at zero and `sign(0) = 0`. Every update has the size `lr` in every
/// coordinate, so Lion wants a learning rate 3–10× smaller than AdamW's and a weight decay as
/// many times larger. One state buffer (`m`), one pass.
///
/// ```
/// use fusedopt::{Lion, LionConfig, Optimizer};
/// let mut opt = Lion::new(LionConfig { lr: 0.1, ..Default::default() });
/// let mut w = [1.0f32, 1.0, 1.0];
/// opt.step(&mut w, &[3.0, -0.5, 0.0])?;
/// assert_eq!(w, [0.9, 1.1, 1.0]); // lr against the gradient's sign; none at 0
/// # Ok::<(), fusedopt::StepError>(())
/// ```
pub type Lion = Fused<LionConfig>;

/// Hyperparameters of [`Lion`]: the paper's defaults.
///
/// ```
/// let c = fusedopt::LionConfig::default();
/// assert_eq!((c.lr, c.beta1, c.beta2, c.weight_decay), (1e-4, 0.9, 0.99, 0.0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LionConfig {
    /// Learning rate (default 1e-4). Finite and `>= 0`.
    pub lr: f32,
    /// Interpolation β1 of the update direction (default 0.9), in `[0, 1]`. Kept in `f64`, as
    /// given; `1 − β1` is computed from it and rounded once.
    pub beta1: f64,
    /// Decay β2 of the momentum (default 0.99), in `[0, 1]`; `f64`, as `beta1`.
    pub beta2: f64,
    /// Decoupled weight decay λ (default 0): `w ← w·(1 − lr·λ)` before the update. Finite and
    /// `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
}

impl Default for LionConfig {
    fn default() -> Self {
        LionConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

impl LionConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::LionConfig;
    /// assert!(LionConfig::default().validate().is_ok());
    /// let err = LionConfig { beta2: 1.5, ..Default::default() }.validate().unwrap_err();
    /// assert_eq!(err.to_string(), "lion: beta2 = 1.5 is invalid, expected in [0, 1]");
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        check_unit(Self::NAME, "beta1", self.beta1, true)?;
        check_unit(Self::NAME, "beta2", self.beta2, true)?;
        check_weight_decay(Self::NAME, self.weight_decay)
    }
}

/// Per-step scalars of Lion, computed in f64 and rounded once to f32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LionStep {
    lr: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// `1 − lr·λ`, applied when `decay`.
    w_decay: f32,
    decay: bool,
}

impl LionStep {
    /// The scalars for a parameter group with learning rate `lr` and weight decay `wd`.
    pub(crate) fn new(c: &LionConfig, lr: f32, wd: f32) -> Self {
        LionStep {
            lr,
            beta1: c.beta1 as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            w_decay: (1.0 - f64::from(lr) * f64::from(wd)) as f32,
            decay: wd != 0.0,
        }
    }
}

impl Kernel<1> for LionStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [m]: &mut [V; 1]) -> V {
        let c = V::splat(self.beta1) * *m + V::splat(self.one_minus_beta1) * g;
        *m = V::splat(self.beta2) * *m + V::splat(self.one_minus_beta2) * g;
        let w = if self.decay {
            w * V::splat(self.w_decay)
        } else {
            w
        };
        w - V::splat(self.lr) * c.sign()
    }
}

impl RuleImpl for LionConfig {
    const NAME: &'static str = "lion";
    const BUFFERS: &'static [StateBuffer] = &[StateBuffer::signed("m")];
    config_fields!(lr, beta1, beta2, weight_decay, maximize);
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            maximize: self.maximize,
            l2_decay: false,
        };
        x.run(common, |h| LionStep::new(self, h.lr, h.weight_decay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_formula() {
        let c = LionConfig {
            beta1: 0.5,
            beta2: 0.75,
            weight_decay: 0.5,
            ..Default::default()
        };
        let k = LionStep::new(&c, 0.25, 0.5);
        let mut m = [-1.0f32];
        // c = 0.5·(−1) + 0.5·3 = 1 > 0; m = 0.75·(−1) + 0.25·3 = 0; w = 2·(1 − 0.125) − 0.25.
        let w = k.update(2.0f32, 3.0, &mut m);
        assert_eq!((w, m[0]), (2.0 * 0.875 - 0.25, 0.0));
        let mut m = [1.0f32];
        let w = k.update(0.0f32, -1.0, &mut m); // c = 0: no move
        assert_eq!(w, 0.0);
        let w = k.update(1.0f32, f32::NAN, &mut [0.0]);
        assert!(w.is_nan(), "a NaN gradient must reach the weight");
    }

    #[test]
    fn complements_come_from_the_f64_betas() {
        let k = LionStep::new(&LionConfig::default(), 1e-4, 0.0);
        assert_eq!(k.one_minus_beta2, (1.0 - 0.99f64) as f32);
        assert_ne!(k.one_minus_beta2, (1.0 - f64::from(0.99f32)) as f32);
        assert!(!k.decay);
    }
}
