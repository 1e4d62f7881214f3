//! # fusedopt
//!
//! Fused, multi-threaded, deterministic optimizer steps over flat `f32` tensors.
//!
//! A trainer hands fusedopt its weights and gradients as slices; one call updates the weights and
//! the optimizer state in a single pass over memory, with SIMD kernels on every core of the
//! current rayon pool. The optimizers: [`Sgd`], [`Momentum`], [`Nag`], [`AdaGrad`],
//! [`RmsProp`], [`Adam`] (and AdamW), [`Adamax`], [`Lion`], [`RAdam`], [`NAdam`], [`AdEMAMix`],
//! [`ScheduleFreeAdamW`] and [`ScheduleFreeSgd`]. Each is one generic type,
//! [`Fused`], over its configuration (`Adam` is `Fused<AdamConfig>`), and all of them implement
//! the object-safe [`Optimizer`] trait.
//!
//! ```
//! use fusedopt::{Adam, AdamConfig, Optimizer};
//!
//! // Minimise f(w) = ½‖w − 3‖², whose gradient is w − 3.
//! let mut opt = Adam::new(AdamConfig { lr: 0.1, ..Default::default() });
//! let mut w = vec![0.0f32; 1000];
//! let mut g = vec![0.0f32; 1000];
//! for _ in 0..500 {
//!     for (g, w) in g.iter_mut().zip(&w) {
//!         *g = w - 3.0;
//!     }
//!     opt.step(&mut w, &g)?;
//! }
//! assert!(w.iter().all(|w| (w - 3.0).abs() < 1e-2));
//! # Ok::<(), fusedopt::StepError>(())
//! ```
//!
//! A whole model is one call: [`step_all`](OptimizerExt::step_all) takes the weights and the
//! gradients as two lists, [`Optimizer::step_many`] as `(weights, grads)` pairs. To choose the
//! optimizer at run time, parse an [`OptimizerConfig`]:
//!
//! ```
//! use fusedopt::{Optimizer, OptimizerConfig, OptimizerExt};
//!
//! let mut weights = vec![vec![0.5f32; 256], vec![0.0f32; 16]];
//! let grads = vec![vec![0.1f32; 256], vec![-0.1f32; 16]];
//! let config: OptimizerConfig = "adamw:lr=3e-4,weight_decay=0.1".parse()?;
//! let mut opt: Box<dyn Optimizer> = config.build();
//! for _ in 0..10 {
//!     opt.step_all(&mut weights, &grads)?;
//! }
//! assert_eq!((opt.name(), opt.steps()), ("adam", 10));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Trainers that hold their tensors their own way have [`OptimizerExt::step_partial`] (tensors without a
//! gradient this step are left alone and keep their own step count), [`Optimizer::step_feed`]
//! (tensors lent one at a time through a [`TensorFeed`], bitwise the results of `step_many`),
//! [`Optimizer::set_tensor_names`] (state files refuse a model whose tensors differ) and
//! [`Optimizer::set_threads`] (the optimizer's own pool). With the `candle` feature,
//! `fusedopt::candle` makes them candle optimizers.
//!
//! ## Update rules
//! Element-wise in f32; per-step scalars are computed in f64 and rounded once to f32.
//!
//! | optimizer | update | defaults |
//! |---|---|---|
//! | [`Sgd`] | `w ← w − lr·g` | lr 0.01 |
//! | [`Momentum`] | `v ← μ·v − lr·g; w ← w + v` | lr 0.01, μ 0.9 |
//! | [`Nag`] | `v ← μ·v − lr·g; w ← w + μ·v − lr·g` | lr 0.01, μ 0.9 |
//! | [`AdaGrad`] | `h ← h + g²; w ← w − lr_t·g/(√h + ε)`, `lr_t = lr/(1 + (t−1)·lr_decay)` | lr 0.01, ε 1e-7, lr_decay 0 |
//! | [`RmsProp`] | `h ← ρ·h + (1−ρ)·g²; w ← w − lr·g/(√h + ε)` | lr 0.01, ρ 0.9, ε 1e-7 |
//! | [`Adam`] | `m ← m + (1−β1)(g − m); v ← v + (1−β2)(g² − v); w ← w − lr_t·m/(√v + ε)`, `lr_t = lr·√(1−β2ᵗ)/(1−β1ᵗ)` | lr 0.001, β 0.9/0.999, ε 1e-7 |
//! | [`Adamax`] | `m ← m + (1−β1)(g − m); u ← max(β2·u, \|g\| + ε); w ← w − (lr/(1−β1ᵗ))·m/u` | lr 0.002, β 0.9/0.999, ε 1e-8 (torch's) |
//! | [`Lion`] | `c ← β1·m + (1−β1)·g; w ← w·(1 − lr·λ) − lr·sign(c); m ← β2·m + (1−β2)·g` | lr 1e-4, β 0.9/0.99 (the paper's) |
//! | [`RAdam`] | Adam rectified by `r_t` once `ρ_t > 5`, momentum SGD before (torch's) | lr 1e-3, β 0.9/0.999, ε 1e-8 |
//! | [`NAdam`] | Adam with Nesterov momentum and the schedule `μ_t = β1(1 − ½·0.96^(tψ))` (torch's) | lr 2e-3, β 0.9/0.999, ε 1e-8, ψ 4e-3 |
//! | [`AdEMAMix`] | `w ← w − lr·((m̂1 + α_t·m2)/(√ν̂ + ε) + λ·w)`, a fast and a slow EMA (the paper's) | lr 1e-3, β 0.9/0.999/0.9999, α 5, λ 0.01 |
//! | [`ScheduleFreeAdamW`] | steps at `y`, averages into `x` (Defazio et al. 2024); [`Optimizer::eval`] / [`Optimizer::train`] move the weights between them | lr 0.0025, β 0.9/0.999, ε 1e-8 |
//! | [`ScheduleFreeSgd`] | the same with the plain gradient | lr 1, momentum 0.9 |
//!
//! State (`v`, `h`, `m`) starts at zero and is allocated at the first step, in 64-byte aligned
//! buffers sized to the tensors.
//!
//! ## Trainer options
//! Every configuration has `weight_decay` (L2, `g ← g + wd·w`) and `maximize` (`g ← −g`, first);
//! [`AdamConfig`] adds AdamW's `decoupled_weight_decay`, `amsgrad` and PyTorch's ε placement
//! ([`EpsMode`]). [`Optimizer::set_lr`] with a [`schedule::Schedule`] changes the learning rate
//! between steps, and [`Optimizer::set_param_groups`] gives tensors their own learning-rate scale
//! and weight decay ([`ParamGroup`]). All of it is fused into the same single pass. With matching
//! settings the optimizers reproduce `torch.optim`'s SGD (momentum, nesterov), Adagrad, RMSprop,
//! Adam and AdamW; the README's parity section gives the mapping and the measured agreement.
//!
//! ## Gradient hygiene and checkpoints
//! [`Optimizer::set_grad_scale`] divides gradients by a loss scale as the kernels read them,
//! [`Optimizer::set_max_grad_norm`] clips by the global norm (one extra, deterministic read of the
//! gradients) and [`Optimizer::set_non_finite`] chooses what a NaN or infinite gradient does
//! ([`NonFinite`]); [`StepReport`] says whether a step was skipped and the gradient norm.
//! [`Optimizer::save_state`] and [`Optimizer::load_state`] write and read the state as an atomic,
//! checksummed safetensors file ([`StateError`]); resuming is bitwise exact.
//!
//! ## Settings
//! How an optimizer runs (not what it computes) is one value, [`Settings`]: kernel tier, chunk
//! length, loss scale, clipping, non-finite policy, own thread pool and state format. Build it
//! with its `with_*` methods and hand it to [`Optimizer::set_settings`], which validates every
//! field at once and changes nothing if one is out of range ([`StepError::InvalidSetting`]).
//! The per-setting methods ([`Optimizer::set_grad_scale`], ...) are one-line wrappers over it.
//!
//! ```
//! use fusedopt::{NonFinite, Optimizer, Settings, Sgd, SgdConfig};
//!
//! let mut opt = Sgd::new(SgdConfig::default());
//! let settings = Settings::default().with_max_grad_norm(Some(1.0)).with_non_finite(NonFinite::Skip);
//! opt.set_settings(settings)?;
//! assert_eq!(opt.settings(), &settings);
//! assert!(opt.set_settings(Settings::default().with_grad_scale(0.0)).is_err());
//! assert_eq!(opt.settings(), &settings); // a refused value leaves the settings as they were
//! # Ok::<(), fusedopt::StepError>(())
//! ```
//!
//! ## Execution
//! A step cuts its tensors into chunks of [`Optimizer::chunk_len`] elements
//! ([`DEFAULT_CHUNK_LEN`] by default) and runs them on the current rayon pool: wrap a step in
//! `pool.install(|| ..)` to choose the thread count. A step of a single chunk runs inline.
//! [`Optimizer::step_many`] updates a whole model's list of tensors in one dispatch.
//!
//! The kernels are selected once per process: AVX2 on x86-64 CPUs that have it, otherwise the
//! portable [`wide`] kernel, and the scalar reference kernel is always available
//! ([`Backend`], [`SimdLevel`], [`simd_level`]).
//!
//! ## Determinism
//! Every kernel performs the same correctly rounded IEEE-754 operations in the same order (no
//! fused multiply-add, no approximate reciprocal or square root), so the scalar, portable and
//! AVX2 kernels agree bitwise, and results are bitwise identical for any thread count and chunk
//! length.
//!
//! ## Errors
//! Bad input never panics and never half-applies: mismatched lengths, a missing gradient, a
//! changed layout or an out-of-range hyperparameter return a [`StepError`] that names the
//! problem, and leave weights and state untouched. A configuration string that does not parse
//! returns a [`ParseConfigError`].
//!
//! ## How the crate is built
//! The modules read bottom-up; each imports only from those before it:
//!
//! 1. `simd`: CPU detection (once, cached), the tiers and the one generic span loop. An AVX2
//!    kernel runs only with a zero-sized proof token that the detection hands out.
//! 2. `types`: errors, reports, parameter groups, settings.
//! 3. `plan`: tensor layouts, the plan of tasks, chunk-length constants.
//! 4. `tuning`: tuned chunk lengths ([`Tuning`]).
//! 5. `engine`: validation, state and per-tensor step counts, groups, gradient hygiene, thread
//!    dispatch, over a list of tensors or a [`TensorFeed`]: everything but the update formulas.
//! 6. `optim`: one file per update rule (configuration, per-step scalars, kernel), the sealed
//!    [`Rule`] trait, [`Fused`], and the registry: one line per rule, from which the modules,
//!    the exports, [`OptimizerConfig`] and [`OPTIMIZER_NAMES`] are generated.
//! 7. `checkpoint`: state files, from the engine's plain state and what the rule says of its
//!    buffers and fields.
//! 8. `optimizer`: the sealed [`Optimizer`] trait, implemented once for [`Fused`].
//! 9. `config`: [`OptimizerConfig`], typed field access ([`Value`]).
//! 10. [`raw`]: memory lent by address (the C and Python bindings), checked once here.
//! 11. `candle` (feature `candle`): the optimizers as `candle_nn::Optimizer`s.
//!
//! [`schedule`] stands alone.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

// The modules, bottom-up: each imports only from the ones before it.
mod simd;

mod types;

mod plan;

mod tuning;

mod engine;

mod optim;

mod checkpoint;

mod optimizer;

mod config;

pub mod raw;

#[cfg(feature = "candle")]
pub mod candle;

// Stands alone.
pub mod schedule;

pub use checkpoint::StateError;
pub use config::{OPTIMIZER_NAMES, OptimizerConfig, ParseConfigError, optimizer_by_name};
pub use engine::{FeedError, TensorFeed};
pub use half;
pub use optim::rules::*;
pub use optim::{Fused, Rule};
pub use optimizer::{Optimizer, OptimizerExt};
pub use plan::DEFAULT_CHUNK_LEN;
pub use simd::{SimdLevel, simd_level};
pub use tuning::{TUNING_ENV, Tuning, TuningError};
pub use types::{
    Backend, Dtype, Element, NonFinite, ParamGroup, Settings, StateFormat, StepError, StepReport,
    Value,
};

/// The traits a trainer calls: `use fusedopt::prelude::*;`.
///
/// ```
/// use fusedopt::prelude::*;
/// let mut opt = fusedopt::Sgd::new(fusedopt::SgdConfig { lr: 0.5, ..Default::default() });
/// let mut weights = [vec![1.0f32; 2]];
/// opt.step_all(&mut weights, &[vec![1.0f32; 2]])?;
/// assert_eq!((opt.steps(), &weights[0][..]), (1, &[0.5f32, 0.5][..]));
/// # Ok::<(), fusedopt::StepError>(())
/// ```
pub mod prelude {
    pub use crate::{Optimizer, OptimizerExt};
}

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
