//! Gradient hygiene: the loss scale, global-norm clipping and the non-finite check, worked out
//! before a step's update pass. The norm is one read-only pass over the gradients in fixed slices
//! ([`NORM_SLICE`](crate::plan::NORM_SLICE)) whose sums are added in order, so it does not depend
//! on threads or chunk length.

use super::tensors::TensorList;
use crate::plan::NormPlan;
use crate::simd::{self, Tier};
use crate::types::{NonFinite, Settings, StepError};
use rayon::prelude::*;

/// How the update pass reads every gradient: `(g / div)·factor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GradScale {
    /// Divides every gradient (a loss scale that is not a power of two); `1` divides nothing.
    pub div: f32,
    /// Multiplies every gradient (maximize, a power-of-two loss scale, clipping).
    pub factor: f32,
}

/// The outcome of a step's gradient check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum GradCheck {
    /// Apply the step, reading gradients through `scale`.
    Apply {
        scale: GradScale,
        /// The gradient norm, where clipping or checking computed it.
        grad_norm: Option<f32>,
    },
    /// Skip the step: a gradient is NaN or infinite under [`NonFinite::Skip`].
    Skip { grad_norm: f32 },
}

/// The norm pass's slices and their sums, kept between steps.
#[derive(Debug, Default)]
pub(crate) struct NormPass {
    plan: NormPlan,
    sums: Vec<f64>,
}

impl NormPass {
    /// Checks the hygiene `settings`, runs the norm pass (on `tier`) where clipping or checking
    /// needs it, and works out how the update pass reads gradients: `±(g / scale)·clip`, and
    /// bitwise `±g / scale` without clipping.
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] (naming `optimizer`) for a loss scale or clipping norm out of
    /// range; [`StepError::NonFiniteGrad`] under [`NonFinite::Error`].
    pub(crate) fn check(
        &mut self,
        settings: &Settings,
        optimizer: &'static str,
        tensors: &TensorList<'_>,
        maximize: bool,
        tier: Tier,
        chunk_len: usize,
    ) -> Result<GradCheck, StepError> {
        let scale = settings.grad_scale;
        let invalid = |field, value, expected| StepError::InvalidConfig {
            optimizer,
            field,
            value,
            expected,
        };
        if !(scale.is_finite() && scale > 0.0) {
            return Err(invalid("grad_scale", scale, "finite and > 0"));
        }
        if let Some(max) = settings.max_grad_norm
            && !(max.is_finite() && max >= 0.0)
        {
            return Err(invalid("max_grad_norm", max, "finite and >= 0"));
        }
        let mut clip = 1.0f32;
        let mut grad_norm = None;
        if settings.max_grad_norm.is_some() || settings.non_finite != NonFinite::Propagate {
            let (sum, bad_tensor) = self.sum_squares(tier, tensors, chunk_len);
            // The norm of the unscaled gradients: ‖g‖ / scale.
            let norm = (sum.sqrt() / f64::from(scale)) as f32;
            grad_norm = Some(norm);
            if let Some(tensor) = bad_tensor {
                match settings.non_finite {
                    NonFinite::Propagate => {}
                    NonFinite::Skip => return Ok(GradCheck::Skip { grad_norm: norm }),
                    NonFinite::Error => return Err(StepError::NonFiniteGrad { tensor }),
                }
            }
            if let Some(max) = settings.max_grad_norm {
                // torch.nn.utils.clip_grad_norm_: min(1, max / (norm + 1e-6)); NaN stays NaN.
                let coef = f64::from(max) / (f64::from(norm) + 1e-6);
                clip = if coef.is_nan() {
                    f32::NAN
                } else {
                    coef.min(1.0) as f32
                };
            }
        }
        let sign = if maximize { -1.0f32 } else { 1.0 };
        // A power-of-two scale divides exactly as a multiplication by its (exact) reciprocal does,
        // and folds into `factor`; any other scale is a true division.
        let pow2 = scale.is_normal() && scale.to_bits() & 0x007f_ffff == 0;
        let scale = if pow2 {
            GradScale {
                div: 1.0,
                factor: sign * clip * (1.0 / scale),
            }
        } else {
            GradScale {
                div: scale,
                factor: sign * clip,
            }
        };
        Ok(GradCheck::Apply { scale, grad_norm })
    }

    /// The sum of squares of every gradient of the step in f64, in a fixed order, and the first
    /// tensor holding a NaN or an infinity.
    fn sum_squares(
        &mut self,
        tier: Tier,
        tensors: &TensorList<'_>,
        chunk_len: usize,
    ) -> (f64, Option<usize>) {
        self.plan.fit(tensors.lens());
        let slices = self.plan.slices();
        self.sums.resize(slices.len(), 0.0);
        let sum_slice = |(sum, &(t, start, len)): (&mut f64, &(usize, usize, usize))| {
            *sum = simd::sum_squares(tier, &tensors.grads(t)[start..start + len]);
        };
        if self.plan.elements() <= chunk_len || rayon::current_num_threads() == 1 {
            self.sums.iter_mut().zip(slices).for_each(sum_slice);
        } else {
            // One contiguous run of slices per thread: a read stream that jumps between distant
            // slices restarts its prefetch lead each time.
            let threads = rayon::current_num_threads();
            let per_task = slices.len().div_ceil(threads).max(1);
            self.sums
                .par_iter_mut()
                .zip(slices.par_iter())
                .with_min_len(per_task)
                .for_each(sum_slice);
        }
        let total = self.sums.iter().fold(0.0, |acc, &s| acc + s);
        let bad = if total.is_finite() {
            None
        } else {
            let first = self.sums.iter().position(|s| !s.is_finite());
            first.map(|b| slices[b].0)
        };
        (total, bad)
    }
}
