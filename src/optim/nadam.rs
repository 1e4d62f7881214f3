//! NAdam (Dozat 2016, "Incorporating Nesterov Momentum into Adam"), as `torch.optim.NAdam`:
//! Adam with a Nesterov look-ahead and the momentum schedule `μ_t = β1·(1 − ½·0.96^(t·ψ))`.

use super::{
    Fused, StateBuffer, check, check_eps, check_lr, check_unit, check_weight_decay,
    config_fields, sealed::RuleImpl,
};
use crate::engine::{CommonConfig, StepRunner};
use crate::simd::{Kernel, Lane};
use crate::types::{StepError, StepReport};

/// NAdam, Adam with Nesterov momentum, as `torch.optim.NAdam`:
///
/// `μ_t = β1·(1 − ½·0.96^(t·ψ));  Π_t = μ_1·…·μ_t;  m ← m + (1−β1)(g − m);
/// v ← β2·v + (1−β2)·g²;  d = √(v/(1−β2ᵗ)) + ε;
/// w ← w − lr·(1−μ_t)/(1−Π_t) · g/d − lr·μ_{t+1}/(1−Π_t·μ_{t+1}) · m/d`,
///
/// with `ψ` the momentum decay, `m` and `v` starting at zero, and every scalar computed in f64
/// from each tensor's own step `t` (`Π_t`, torch's `mu_product`, is a function of `t` and needs
/// no state of its own). Weight decay is an L2 term, or decoupled (`w ← w·(1 − lr·λ)` first, the
/// NAdamW of torch's `decoupled_weight_decay`). Two state buffers, one pass.
///
/// ```
/// use fusedopt::{NAdam, NAdamConfig, Optimizer};
/// let mut opt = NAdam::new(NAdamConfig { lr: 0.1, ..Default::default() });
/// let mut w = [1.0f32, 1.0];
/// opt.step(&mut w, &[3.0, -0.5])?;
/// // The first step moves every weight against its gradient's sign by lr·(1 + 0.1·μ₂/(1 − μ₁μ₂))
/// // = 1.0565·lr (μ₁ ≈ μ₂ ≈ 0.45).
/// assert!((w[0] - 0.89435).abs() < 1e-5 && (w[1] - 1.10565).abs() < 1e-5);
/// # Ok::<(), fusedopt::StepError>(())
/// ```
pub type NAdam = Fused<NAdamConfig>;

/// Hyperparameters of [`NAdam`]: `torch.optim.NAdam`'s defaults.
///
/// ```
/// let c = fusedopt::NAdamConfig::default();
/// assert_eq!((c.lr, c.beta1, c.beta2, c.eps, c.momentum_decay), (2e-3, 0.9, 0.999, 1e-8, 4e-3));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NAdamConfig {
    /// Learning rate (default 2e-3). Finite and `>= 0`.
    pub lr: f32,
    /// Decay β1 of the first moment (default 0.9), in `[0, 1)`. Kept in `f64`, as given.
    pub beta1: f64,
    /// Decay β2 of the second moment (default 0.999), in `[0, 1)`; `f64`, as `beta1`.
    pub beta2: f64,
    /// Added to the bias-corrected `√v̂` (default 1e-8). Finite and `>= 0`.
    pub eps: f32,
    /// Weight decay (default 0): an L2 term `g ← g + weight_decay·w` after `maximize`, or
    /// decoupled. Finite and `>= 0`.
    pub weight_decay: f32,
    /// The momentum schedule's decay ψ (default 4e-3), torch's `momentum_decay`. Finite and
    /// `>= 0`.
    pub momentum_decay: f64,
    /// Ascend instead of descend (default false): `g ← −g` before anything else.
    pub maximize: bool,
    /// Decoupled weight decay (default false), torch's `decoupled_weight_decay`:
    /// `w ← w·(1 − lr·weight_decay)` before the update, instead of the L2 term.
    pub decoupled_weight_decay: bool,
}

impl Default for NAdamConfig {
    fn default() -> Self {
        NAdamConfig {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum_decay: 4e-3,
            maximize: false,
            decoupled_weight_decay: false,
        }
    }
}

impl NAdamConfig {
    /// Checks every hyperparameter's range.
    ///
    /// ```
    /// use fusedopt::NAdamConfig;
    /// assert!(NAdamConfig::default().validate().is_ok());
    /// assert!(NAdamConfig { momentum_decay: -1.0, ..Default::default() }.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        check_lr(Self::NAME, self.lr)?;
        check_unit(Self::NAME, "beta1", self.beta1, false)?;
        check_unit(Self::NAME, "beta2", self.beta2, false)?;
        check_eps(Self::NAME, self.eps)?;
        check_weight_decay(Self::NAME, self.weight_decay)?;
        let d = self.momentum_decay;
        let ok = d.is_finite() && d >= 0.0;
        check(Self::NAME, "momentum_decay", d as f32, ok, "finite and >= 0")
    }

    /// The momentum coefficient `μ_t = β1·(1 − ½·0.96^(t·ψ))` of step `t`.
    ///
    /// ```
    /// let c = fusedopt::NAdamConfig::default();
    /// assert_eq!(c.mu(1), 0.9 * (1.0 - 0.5 * 0.96f64.powf(0.004)));
    /// ```
    pub fn mu(&self, t: u64) -> f64 {
        self.beta1 * (1.0 - 0.5 * 0.96f64.powf(t as f64 * self.momentum_decay))
    }

    /// The product `Π_t = μ_1·…·μ_t` of the momentum coefficients of steps 1 to `t` (1 at step
    /// 0), torch's `mu_product`, in a number of operations independent of `t`: with
    /// `q = 0.96^ψ`, `ln Π_t = t·ln β1 + Σᵢ ln(1 − ½qⁱ)`, and the sum is
    /// `−Σₖ (½)ᵏ/k · qᵏ(1 − q^(kt))/(1 − qᵏ)`, whose terms fall as `2⁻ᵏ`.
    ///
    /// ```
    /// let c = fusedopt::NAdamConfig::default();
    /// let direct: f64 = (1..=1000).map(|t| c.mu(t)).product();
    /// assert!((c.mu_product(1000) / direct - 1.0).abs() < 1e-12);
    /// assert_eq!(c.mu_product(0), 1.0);
    /// ```
    pub fn mu_product(&self, t: u64) -> f64 {
        if t == 0 {
            return 1.0;
        }
        let tf = t as f64;
        let ln_q = self.momentum_decay * 0.96f64.ln();
        let sum = if ln_q == 0.0 {
            // q = 1: every factor is ½.
            tf * 0.5f64.ln()
        } else {
            let mut sum = 0.0;
            let mut half_k = 1.0;
            for k in 1..=64 {
                let k = f64::from(k);
                half_k *= 0.5;
                // qᵏ(1 − q^(kt))/(1 − qᵏ), with expm1 for q close to 1.
                let geometric = (k * ln_q).exp() * (k * tf * ln_q).exp_m1() / (k * ln_q).exp_m1();
                sum -= half_k / k * geometric;
            }
            sum
        };
        if self.beta1 == 0.0 {
            return 0.0;
        }
        (tf * self.beta1.ln() + sum).exp()
    }
}

/// Per-step scalars of NAdam at step `t`, computed in f64 and rounded once to f32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NAdamStep {
    /// `lr·(1−μ_t)/(1−Π_t)`, the gradient's coefficient.
    grad_size: f32,
    /// `lr·μ_{t+1}/(1−Π_t·μ_{t+1})`, the first moment's.
    moment_size: f32,
    /// `1 − β2ᵗ`.
    bc2: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    /// `1 − lr·wd`, applied when `decoupled`.
    w_decay: f32,
    decoupled: bool,
}

impl NAdamStep {
    /// The scalars of step `t` for a parameter group with learning rate `lr` and weight decay
    /// `wd`.
    pub(crate) fn new(c: &NAdamConfig, t: u64, lr: f32, wd: f32) -> Self {
        let lr = f64::from(lr);
        let (mu, mu_next) = (c.mu(t), c.mu(t + 1));
        let product = c.mu_product(t);
        NAdamStep {
            grad_size: (lr * (1.0 - mu) / (1.0 - product)) as f32,
            moment_size: (lr * mu_next / (1.0 - product * mu_next)) as f32,
            bc2: (1.0 - c.beta2.powf(t as f64)) as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            eps: c.eps,
            w_decay: (1.0 - lr * f64::from(wd)) as f32,
            decoupled: c.decoupled_weight_decay && wd != 0.0,
        }
    }
}

impl Kernel<2> for NAdamStep {
    #[inline(always)]
    fn update<V: Lane>(&self, w: V, g: V, [m, v]: &mut [V; 2]) -> V {
        *m = *m + V::splat(self.one_minus_beta1) * (g - *m);
        *v = V::splat(self.beta2) * *v + V::splat(self.one_minus_beta2) * (g * g);
        let w = if self.decoupled {
            w * V::splat(self.w_decay)
        } else {
            w
        };
        // torch: denom = (v / bc2).sqrt() + eps; two addcdiv, the gradient's first.
        let denom = (*v / V::splat(self.bc2)).sqrt() + V::splat(self.eps);
        let w = w - V::splat(self.grad_size) * (g / denom);
        w - V::splat(self.moment_size) * (*m / denom)
    }
}

impl RuleImpl for NAdamConfig {
    const NAME: &'static str = "nadam";
    const BUFFERS: &'static [StateBuffer] = &[StateBuffer::signed("m"), StateBuffer::unsigned("v")];
    config_fields!(
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        momentum_decay,
        maximize,
        decoupled_weight_decay
    );
    fn step<X: StepRunner>(&self, x: X) -> Result<StepReport, StepError> {
        let common = CommonConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            maximize: self.maximize,
            l2_decay: !self.decoupled_weight_decay,
        };
        x.run(common, |h| NAdamStep::new(self, h.t, h.lr, h.weight_decay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mu_product_matches_the_running_product() {
        for psi in [0.0, 1e-4, 4e-3, 0.1, 2.0] {
            for beta1 in [0.0, 0.5, 0.9, 0.99] {
                let c = NAdamConfig {
                    beta1,
                    momentum_decay: psi,
                    ..Default::default()
                };
                let mut direct = 1.0f64;
                for t in 1..=3000u64 {
                    direct *= c.mu(t);
                    if direct != 0.0 && direct < 1e-290 {
                        break; // subnormal: the running product loses its digits
                    }
                    let fast = c.mu_product(t);
                    let ok = if direct == 0.0 {
                        fast == 0.0
                    } else {
                        (fast / direct - 1.0).abs() < 1e-11
                    };
                    assert!(ok, "ψ {psi} β1 {beta1} t {t}: {fast} vs {direct}");
                }
            }
        }
    }

    #[test]
    fn kernel_matches_formula() {
        let k = NAdamStep {
            grad_size: 0.5,
            moment_size: 0.25,
            bc2: 0.5,
            one_minus_beta1: 0.5,
            beta2: 0.5,
            one_minus_beta2: 0.5,
            eps: 0.0,
            w_decay: 1.0,
            decoupled: false,
        };
        let mut s = [1.0f32, 0.5];
        // m = 2; v = 0.25 + 0.5·9 = 4.75; d = √9.5.
        let w = k.update(2.0f32, 3.0, &mut s);
        assert_eq!(s, [2.0, 4.75]);
        let d = 9.5f32.sqrt();
        assert_eq!(w, 2.0 - 0.5 * (3.0 / d) - 0.25 * (2.0 / d));
    }

    #[test]
    fn step_scalars_follow_torch() {
        let c = NAdamConfig::default();
        let k = NAdamStep::new(&c, 1, 2e-3, 0.0);
        let lr = f64::from(2e-3f32);
        let (mu1, mu2) = (c.mu(1), c.mu(2));
        assert_eq!(k.grad_size, (lr * (1.0 - mu1) / (1.0 - mu1)) as f32);
        assert_eq!(k.moment_size, (lr * mu2 / (1.0 - mu1 * mu2)) as f32);
        assert!(!k.decoupled);
    }
}
