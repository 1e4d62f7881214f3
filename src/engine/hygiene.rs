//! Gradient hygiene: the loss scale, global-norm clipping and the non-finite check, worked out
//! before a step's update pass. The norm is one read-only pass over the gradients in fixed slices
//! ([`NORM_SLICE`](crate::plan::NORM_SLICE)) whose sums are added in order, so it does not depend
//! on threads, chunk length, or whether the gradients came in one list or one at a time.

use super::par::Par;
use super::tensors::GradView;
use crate::plan::NormPlan;
use crate::simd::{self, Half, Tier};
use crate::types::{Dtype, NonFinite, Settings, StepError};

/// The kernels' half-precision format for a half-precision [`Dtype`].
pub(crate) fn half_of(dtype: Dtype) -> Half {
    match dtype {
        Dtype::F16 => Half::F16,
        _ => Half::Bf16,
    }
}
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Whether a step under `settings` needs the gradient norm.
pub(crate) fn needs_norm(settings: &Settings) -> bool {
    settings.max_grad_norm.is_some() || settings.non_finite != NonFinite::Propagate
}

/// The norm pass's slices and their sums, kept between steps. A sum is stored as the bits of an
/// f64 in an atomic, so that tensors lent from several threads can write theirs.
#[derive(Debug, Default)]
pub(crate) struct NormPass {
    plan: NormPlan,
    sums: Vec<AtomicU64>,
}

impl NormPass {
    /// Prepares the slices of tensors of lengths `lens`; every sum starts at zero.
    pub(crate) fn fit(&mut self, lens: impl ExactSizeIterator<Item = usize> + Clone) {
        self.plan.fit(lens);
        self.sums.clear();
        self.sums
            .resize_with(self.plan.slices().len(), || AtomicU64::new(0));
    }

    /// Sums the squares of every tensor's gradients in `grads` (`None`: no gradient, which adds
    /// nothing), spread over `par` when there is more than `chunk_len` to read.
    pub(crate) fn sum_all<'g>(
        &mut self,
        tier: Tier,
        par: Par<'_>,
        chunk_len: usize,
        grads: impl Fn(usize) -> Option<GradView<'g>> + Sync,
    ) {
        let slices = self.plan.slices();
        // One contiguous run of slices per thread: a read stream that jumps between distant
        // slices restarts its prefetch lead each time.
        let per_thread = slices.len().div_ceil(par.threads()).max(1);
        let inline = self.plan.elements() <= chunk_len;
        par.for_each_mut(&mut self.sums, per_thread, inline, |i, sum| {
            let (t, start, len) = slices[i];
            let s = grads(t).map_or(0.0, |g| match g {
                GradView::F32(g) => simd::sum_squares(tier, &g[start..start + len]),
                GradView::Half(kind, g) => {
                    simd::sum_squares_half(half_of(kind), &g[start..start + len])
                }
            });
            *sum.get_mut() = s.to_bits();
        });
    }

    /// Sums the squares of tensor `t`'s gradients `g` alone (tensors may be summed from several
    /// threads at once).
    pub(crate) fn sum_tensor(
        &self,
        tier: Tier,
        par: Par<'_>,
        chunk_len: usize,
        t: usize,
        g: &[f32],
    ) {
        let range = self.plan.tensor_slices(t);
        let slices = &self.plan.slices()[range.clone()];
        let sums = &self.sums[range];
        let store = |i: usize| {
            let (_, start, len) = slices[i];
            let s = simd::sum_squares(tier, &g[start..start + len]);
            sums[i].store(s.to_bits(), Ordering::Relaxed);
        };
        if g.len() <= chunk_len {
            (0..slices.len()).for_each(store);
        } else {
            par.for_each(slices.len(), store);
        }
    }

    /// The sum of slice `i`.
    fn sum(&self, i: usize) -> f64 {
        f64::from_bits(self.sums[i].load(Ordering::Relaxed))
    }

    /// Adds the sums in order and works out how the update pass reads gradients under
    /// `settings`: `±(g / scale)·clip`, and bitwise `±g / scale` without clipping. `summed`
    /// says whether the sums were taken ([`needs_norm`]).
    ///
    /// # Errors
    /// [`StepError::NonFiniteGrad`] under [`NonFinite::Error`].
    pub(crate) fn decide(
        &self,
        settings: &Settings,
        maximize: bool,
        summed: bool,
    ) -> Result<GradCheck, StepError> {
        let scale = settings.grad_scale;
        let mut clip = 1.0f32;
        let mut grad_norm = None;
        if summed {
            let total = (0..self.sums.len()).fold(0.0, |acc, i| acc + self.sum(i));
            // The norm of the unscaled gradients: ‖g‖ / scale.
            let norm = (total.sqrt() / f64::from(scale)) as f32;
            grad_norm = Some(norm);
            if !total.is_finite() {
                let first = (0..self.sums.len()).find(|&i| !self.sum(i).is_finite());
                let tensor = first.map_or(0, |s| self.plan.slices()[s].0);
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
}
