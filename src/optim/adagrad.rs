//! AdaGrad: `h ← h + g²; w ← w − lr_t·g / (√h + ε)`, `lr_t = lr / (1 + (t−1)·lr_decay)`, `h`
//! starting at `initial_accumulator_value`.

use super::{
    Fused, StateBuffer, check, check_eps, check_lr, check_weight_decay, config_fields,
    sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// AdaGrad: `h ← h + g²; w ← w − lr_t·g / (√h + ε)`, with `h` starting at
/// [`initial_accumulator_value`](AdaGradConfig::initial_accumulator_value) (0 by default) and
/// `lr_t = lr / (1 + (t−1)·lr_decay)` at a tensor's step `t` (`lr` itself at the default
/// `lr_decay` 0), as `torch.optim.Adagrad`.
///
/// ```
/// use fusedopt::{AdaGrad, AdaGradConfig, Optimizer};
/// let mut opt = AdaGrad::new(AdaGradConfig { lr: 0.1, eps: 0.0, ..Default::default() });
/// let mut w = [1.0f32];
/// opt.step(&mut w, &[4.0]).unwrap(); // h = 16: w = 1 − 0.1·4/4
/// assert_eq!(w, [0.9]);
/// ```
pub type AdaGrad = Fused<AdaGradConfig>;

/// Hyperparameters of [`AdaGrad`].
///
/// ```
/// let c = fusedopt::AdaGradConfig::default();
/// assert_eq!((c.lr, c.eps), (0.01, 1e-7));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaGradConfig {
    /// Learning rate (default 0.01). Finite and `>= 0`.
    pub lr: f32,
    /// Added to `√h` in the denominator (default 1e-7). Finite and `>= 0`.
    pub eps: f32,
    /// Learning-rate decay (default 0), torch's `lr_decay`: step `t` uses
    /// `lr / (1 + (t−1)·lr_decay)`, computed in f64 and rounded once. Finite and `>= 0`.
    pub lr_decay: f64,
    /// L2 weight decay (default 0): `g ← g + weight_decay·w`, after `maximize`. Finite and `>= 0`.
    pub weight_decay: f32,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
    /// The value `h` starts from (default 0), torch's `initial_accumulator_value`: every element
    /// of the sum of squares, when the state is created. Finite and `>= 0`.
    pub initial_accumulator_value: f32,
}

impl Default for AdaGradConfig {
    fn default() -> Self {
        AdaGradConfig {
            lr: 0.01,
            eps: 1e-7,
            lr_decay: 0.0,
            weight_decay: 0.0,
            maximize: false,
            initial_accumulator_value: 0.0,
        }
    }
}

impl AdaGradConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::AdaGradConfig;
    /// assert!(AdaGradConfig::default().validate().is_ok());
    /// assert!(AdaGradConfig { eps: -1.0, ..Default::default() }.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        check_eps(Self::NAME, self.eps)?;
        let d = self.lr_decay;
        check(Self::NAME, "lr_decay", d as f32, d.is_finite() && d >= 0.0, "finite and >= 0")?;
        let h0 = self.initial_accumulator_value;
        let ok = h0.is_finite() && h0 >= 0.0;
        check(Self::NAME, "initial_accumulator_value", h0, ok, "finite and >= 0")?;
        check_weight_decay(Self::NAME, self.weight_decay)
    }
}

/// Per-step scalars of AdaGrad.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdaGradStep {
    lr: f32,
    eps: f32,
}

impl Kernel<1> for AdaGradStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [h]: &mut [V; 1]) -> V {
        *h = *h + g * g;
        w - V::splat(self.lr) * g / (h.sqrt() + V::splat(self.eps))
    }
}

impl RuleImpl for AdaGradConfig {
    const NAME: &'static str = "adagrad";
    const BUFFERS: &'static [StateBuffer] = &[StateBuffer::unsigned("h")];
    config_fields!(
        lr,
        eps,
        weight_decay,
        maximize,
        lr_decay,
        initial_accumulator_value
    );
    fn initial_value(&self, _b: usize) -> f32 {
        self.initial_accumulator_value
    }
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig::l2(self.lr, self.weight_decay, self.maximize);
        x.run(common, |h| AdaGradStep {
            // At lr_decay 0 exactly h.lr: the f64 quotient by 1 rounds back to it.
            lr: (f64::from(h.lr) / (1.0 + (h.t as f64 - 1.0) * self.lr_decay)) as f32,
            eps: self.eps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_formula() {
        let k = AdaGradStep { lr: 1.0, eps: 0.0 };
        let mut h = [9.0f32];
        let w = k.update(10.0f32, 4.0, &mut h);
        assert_eq!(h, [25.0]);
        assert_eq!(w, 10.0 - 4.0 / 5.0);
    }

    #[test]
    fn lr_decay_divides_the_step_size_by_the_step_count() {
        let c = AdaGradConfig {
            lr_decay: 0.5,
            ..Default::default()
        };
        // Step 3: lr / (1 + 2·0.5) = lr / 2.
        use crate::Optimizer;
        let mut opt = AdaGrad::new(c);
        let mut w = [1.0f32];
        for _ in 0..2 {
            opt.step(&mut w, &[0.0]).unwrap();
        }
        opt.step(&mut w, &[4.0]).unwrap();
        let lr_t = (f64::from(0.01f32) / 2.0) as f32;
        assert_eq!(w, [1.0 - lr_t * 4.0 / (16f32.sqrt() + 1e-7)]);
        assert!(AdaGradConfig { lr_decay: -1.0, ..c }.validate().is_err());
    }

    #[test]
    fn the_sum_starts_at_the_initial_accumulator_value() {
        use crate::{Optimizer, StateFormat};
        let c = AdaGradConfig {
            lr: 1.0,
            eps: 0.0,
            initial_accumulator_value: 9.0,
            ..Default::default()
        };
        let mut opt = AdaGrad::new(c);
        let mut w = [1.0f32, 2.0];
        opt.step(&mut w, &[4.0, 0.0]).unwrap(); // h = 9 + 16 = 25: w = 1 − 4/5
        assert_eq!(w, [1.0 - 4.0 / 5.0, 2.0]);
        assert_eq!(opt.tensor_state("h", 0), Some(&[25.0f32, 9.0][..]));
        // Created without a step, and in compact formats, the sum starts there too.
        for format in [StateFormat::F32, StateFormat::Bf16, StateFormat::Q8] {
            let mut opt = AdaGrad::new(c);
            opt.set_state_format(format).unwrap();
            opt.init_state(&[300]).unwrap();
            assert_eq!(opt.read_tensor_state("h", 0), Some(vec![9.0; 300]), "{format:?}");
        }
        let bad = AdaGradConfig {
            initial_accumulator_value: -1.0,
            ..c
        };
        assert!(AdaGrad::new(bad).init_state(&[3]).is_err());
    }

    #[test]
    fn zero_gradient_on_zero_state_is_a_no_op() {
        let c = AdaGradConfig::default();
        let k = AdaGradStep {
            lr: c.lr,
            eps: c.eps,
        };
        let mut h = [0.0f32];
        assert_eq!(k.update(3.0f32, 0.0, &mut h), 3.0);
    }
}
