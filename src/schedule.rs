//! Learning-rate schedules: pure functions of the step number, to drive
//! [`Optimizer::set_lr`](crate::Optimizer::set_lr).
//!
//! Steps count from 0 (the first step). Every schedule is computed in f64 and rounded once.
//!
//! ```
//! use fusedopt::schedule::Schedule;
//! use fusedopt::{Adam, AdamConfig, Optimizer};
//!
//! let schedule = Schedule::WarmupCosine { base: 1e-3, min: 1e-5, warmup: 10, total: 100 };
//! let mut opt = Adam::new(AdamConfig::default());
//! let mut w = vec![0.0f32; 16];
//! for step in 0..100 {
//!     opt.set_lr(schedule.lr_at(step));
//!     opt.step(&mut w, &[1.0; 16])?;
//! }
//! assert!((opt.lr() - 1e-5).abs() < 1e-6);
//! # Ok::<(), fusedopt::StepError>(())
//! ```

use std::f64::consts::PI;

/// A learning rate as a function of the step number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Always `lr`.
    Constant {
        /// The learning rate.
        lr: f32,
    },
    /// `base · gammaᵏ` with `k = ⌊step / step_size⌋` (PyTorch's `StepLR`). A `step_size` of 0
    /// is treated as 1.
    StepDecay {
        /// Learning rate of the first `step_size` steps.
        base: f32,
        /// Steps between decays.
        step_size: u64,
        /// Factor per decay.
        gamma: f32,
    },
    /// `base · gamma^step` (PyTorch's `ExponentialLR`).
    Exponential {
        /// Learning rate of step 0.
        base: f32,
        /// Factor per step.
        gamma: f32,
    },
    /// Cosine annealing from `base` to `min` over `total` steps, then `min` (PyTorch's
    /// `CosineAnnealingLR` with `T_max = total`, up to `total`):
    /// `min + (base − min)·(1 + cos(π·step/total))/2`.
    Cosine {
        /// Learning rate of step 0.
        base: f32,
        /// Learning rate from step `total` on.
        min: f32,
        /// Length of the annealing.
        total: u64,
    },
    /// Linear warm-up `base·(step + 1)/warmup` for the first `warmup` steps, then cosine
    /// annealing from `base` to `min` until step `total`, then `min`.
    WarmupCosine {
        /// Peak learning rate, reached at step `warmup − 1`.
        base: f32,
        /// Final learning rate.
        min: f32,
        /// Warm-up steps.
        warmup: u64,
        /// Total steps (warm-up included).
        total: u64,
    },
    /// The one-cycle policy with cosine phases (PyTorch's `OneCycleLR`, `anneal_strategy='cos'`,
    /// two phases): from `max_lr / div_factor` up to `max_lr` over the first
    /// `pct_start·total − 1` steps, then down to `max_lr / (div_factor·final_div_factor)` at step
    /// `total − 1`, and that value afterwards.
    OneCycle {
        /// Peak learning rate.
        max_lr: f32,
        /// Total steps.
        total: u64,
        /// Fraction of the steps spent rising (PyTorch's default 0.3).
        pct_start: f32,
        /// `max_lr / initial lr` (PyTorch's default 25).
        div_factor: f32,
        /// `initial lr / final lr` (PyTorch's default 1e4).
        final_div_factor: f32,
    },
}

/// Cosine interpolation from `start` (at `pct = 0`) to `end` (at `pct = 1`).
fn cos_anneal(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((PI * pct.clamp(0.0, 1.0)).cos() + 1.0)
}

impl Schedule {
    /// The learning rate of step `step` (counting from 0).
    ///
    /// ```
    /// use fusedopt::schedule::Schedule;
    /// let s = Schedule::StepDecay { base: 0.1, step_size: 10, gamma: 0.5 };
    /// assert_eq!((s.lr_at(0), s.lr_at(9), s.lr_at(10), s.lr_at(25)), (0.1, 0.1, 0.05, 0.025));
    /// ```
    pub fn lr_at(&self, step: u64) -> f32 {
        let t = step as f64;
        let lr = match *self {
            Schedule::Constant { lr } => f64::from(lr),
            Schedule::StepDecay {
                base,
                step_size,
                gamma,
            } => f64::from(base) * f64::from(gamma).powf((step / step_size.max(1)) as f64),
            Schedule::Exponential { base, gamma } => f64::from(base) * f64::from(gamma).powf(t),
            Schedule::Cosine { base, min, total } => cos_anneal(
                f64::from(base),
                f64::from(min),
                if total == 0 { 1.0 } else { t / total as f64 },
            ),
            Schedule::WarmupCosine {
                base,
                min,
                warmup,
                total,
            } => {
                if step < warmup {
                    f64::from(base) * (t + 1.0) / warmup as f64
                } else {
                    let span = total.saturating_sub(warmup);
                    let pct = if span == 0 {
                        1.0
                    } else {
                        (step - warmup) as f64 / span as f64
                    };
                    cos_anneal(f64::from(base), f64::from(min), pct)
                }
            }
            Schedule::OneCycle {
                max_lr,
                total,
                pct_start,
                div_factor,
                final_div_factor,
            } => {
                let max = f64::from(max_lr);
                let initial = max / f64::from(div_factor);
                let last = initial / f64::from(final_div_factor);
                let up_end = f64::from(pct_start) * total as f64 - 1.0;
                let down_end = total as f64 - 1.0;
                if t <= up_end {
                    cos_anneal(initial, max, if up_end <= 0.0 { 1.0 } else { t / up_end })
                } else {
                    let span = down_end - up_end;
                    cos_anneal(
                        max,
                        last,
                        if span <= 0.0 {
                            1.0
                        } else {
                            (t - up_end) / span
                        },
                    )
                }
            }
        };
        lr as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f64) -> bool {
        (f64::from(a) - b).abs() <= 1e-6 * b.abs().max(1e-12)
    }

    #[test]
    fn constant_and_exponential() {
        assert_eq!(Schedule::Constant { lr: 0.3 }.lr_at(12345), 0.3);
        let e = Schedule::Exponential {
            base: 0.1,
            gamma: 0.9,
        };
        for t in [0u64, 1, 7, 100] {
            assert!(close(
                e.lr_at(t),
                0.1f32 as f64 * (0.9f32 as f64).powi(t as i32)
            ));
        }
    }

    #[test]
    fn step_decay_holds_between_decays() {
        let s = Schedule::StepDecay {
            base: 1.0,
            step_size: 3,
            gamma: 0.1,
        };
        let lrs: Vec<f32> = (0..7).map(|t| s.lr_at(t)).collect();
        assert_eq!(&lrs[..3], &[1.0; 3]);
        assert!(close(lrs[3], 0.1f32 as f64) && close(lrs[6], (0.1f32 as f64).powi(2)));
        assert_eq!(
            Schedule::StepDecay {
                base: 1.0,
                step_size: 0,
                gamma: 0.5
            }
            .lr_at(2),
            0.25
        );
    }

    #[test]
    fn cosine_matches_closed_form() {
        let s = Schedule::Cosine {
            base: 0.1,
            min: 0.001,
            total: 50,
        };
        for t in 0..=60u64 {
            let pct = (t.min(50) as f64) / 50.0;
            let expected = 0.001f32 as f64
                + (0.1f32 as f64 - 0.001f32 as f64) * (1.0 + (PI * pct).cos()) / 2.0;
            assert!(close(s.lr_at(t), expected), "step {t}");
        }
        assert!(close(s.lr_at(25), (0.1f32 as f64 + 0.001f32 as f64) / 2.0));
    }

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::WarmupCosine {
            base: 1.0,
            min: 0.0,
            warmup: 4,
            total: 14,
        };
        assert_eq!((s.lr_at(0), s.lr_at(1), s.lr_at(3)), (0.25, 0.5, 1.0));
        assert_eq!(s.lr_at(4), 1.0);
        assert!(close(s.lr_at(9), 0.5));
        assert_eq!((s.lr_at(14), s.lr_at(100)), (0.0, 0.0));
    }

    #[test]
    fn one_cycle_matches_pytorch_shape() {
        // OneCycleLR(max_lr=1, total_steps=100): starts at 1/25, peaks at step 29, ends at 1/25e4.
        let s = Schedule::OneCycle {
            max_lr: 1.0,
            total: 100,
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
        };
        assert!(close(s.lr_at(0), 0.04));
        assert!(close(s.lr_at(29), 1.0));
        assert!(close(s.lr_at(99), 0.04 / 1e4));
        // The rise is a half cosine over 29 steps: halfway (0.52) between steps 14 and 15.
        assert!(f64::from(s.lr_at(14)) < 0.52 && f64::from(s.lr_at(15)) > 0.52);
        assert!((0..29).all(|t| s.lr_at(t) < s.lr_at(t + 1)));
        assert!((29..99).all(|t| s.lr_at(t) > s.lr_at(t + 1)));
    }
}
