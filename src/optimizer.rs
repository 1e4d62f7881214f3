//! The [`Optimizer`] trait shared by all six optimizers, and its settings, report and errors.

use crate::checkpoint::{self, ConfigFields, StateError};
use crate::engine::{Core, Params};
use crate::simd::SimdLevel;
use core::fmt;
use std::path::Path;

/// Which kernels a step runs.
///
/// Every choice computes bitwise identical results; they differ only in speed. The default is
/// [`Backend::Simd`].
///
/// ```
/// use fusedopt::{Adam, AdamConfig, Backend, Optimizer};
/// let mut opt = Adam::new(AdamConfig::default());
/// assert_eq!(opt.backend(), Backend::Simd);
/// opt.set_backend(Backend::Scalar);
/// assert_eq!(opt.backend(), Backend::Scalar);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// The plain scalar reference kernel, one element at a time.
    Scalar,
    /// The fastest SIMD tier of the running CPU ([`SimdLevel::detect`]).
    #[default]
    Simd,
    /// A specific tier, for testing and benchmarking. A tier the CPU lacks falls back to the best
    /// available tier below it (see [`Backend::level`]).
    Level(SimdLevel),
}

/// What a successful step did.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct StepReport {
    /// The optimizer's step count after this step (1 after the first step; unchanged by a skipped
    /// step).
    pub step: u64,
    /// The step found a NaN or an infinity in a gradient under [`NonFinite::Skip`] and modified
    /// nothing.
    pub skipped: bool,
    /// The global L2 norm of the unscaled gradients of the call, before clipping: present whenever
    /// clipping ([`Optimizer::set_max_grad_norm`]) or checking ([`Optimizer::set_non_finite`]) ran.
    pub grad_norm: Option<f32>,
}

/// What a step does with a NaN or an infinity in a gradient ([`Optimizer::set_non_finite`]).
///
/// ```
/// assert_eq!(fusedopt::NonFinite::default(), fusedopt::NonFinite::Propagate);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NonFinite {
    /// No check: IEEE arithmetic carries NaN and infinities into weights and state (the default,
    /// and the fastest).
    #[default]
    Propagate,
    /// Modify nothing and do not count the step; the report says `skipped` (for dynamic loss
    /// scaling, where an overflowed step is dropped).
    Skip,
    /// Refuse the step with [`StepError::NonFiniteGrad`]; nothing is modified.
    Error,
}

/// Per-tensor overrides of an optimizer's hyperparameters, for
/// [`Optimizer::set_param_groups`]: PyTorch's parameter groups, one entry per tensor.
///
/// ```
/// use fusedopt::ParamGroup;
/// assert_eq!(ParamGroup::default(), ParamGroup { lr_scale: 1.0, weight_decay: None });
/// assert_eq!(ParamGroup::NO_WEIGHT_DECAY.weight_decay, Some(0.0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamGroup {
    /// Multiplies the configuration's `lr` for this tensor (default 1). Finite and `>= 0`. Follows
    /// [`Optimizer::set_lr`], so a schedule drives every group.
    pub lr_scale: f32,
    /// Replaces the configuration's `weight_decay` for this tensor; `None` (the default) keeps it.
    /// Finite and `>= 0`.
    pub weight_decay: Option<f32>,
}

impl ParamGroup {
    /// No override: the configuration's values.
    pub const DEFAULT: ParamGroup = ParamGroup {
        lr_scale: 1.0,
        weight_decay: None,
    };

    /// The configuration's learning rate, without weight decay: the usual choice for biases and
    /// normalisation weights.
    pub const NO_WEIGHT_DECAY: ParamGroup = ParamGroup {
        lr_scale: 1.0,
        weight_decay: Some(0.0),
    };
}

impl Default for ParamGroup {
    fn default() -> Self {
        ParamGroup::DEFAULT
    }
}

/// Why a step was refused. A refused step modifies neither the weights nor the optimizer state.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StepError {
    /// A tensor's weights and gradients have different lengths.
    LengthMismatch {
        /// Position of the tensor in the call (0 for [`Optimizer::step`]).
        tensor: usize,
        /// Number of weights.
        weights: usize,
        /// Number of gradients.
        grads: usize,
    },
    /// The call passed another number of tensors than the optimizer state was created for.
    TensorCount {
        /// Number of tensors in the optimizer's layout.
        expected: usize,
        /// Number of tensors in this call.
        found: usize,
    },
    /// A tensor's length differs from the one the optimizer state was created for.
    TensorLen {
        /// Position of the tensor in the call (0 for [`Optimizer::step`]).
        tensor: usize,
        /// Length in the optimizer's layout.
        expected: usize,
        /// Length in this call.
        found: usize,
    },
    /// A hyperparameter is out of its valid range.
    InvalidConfig {
        /// The optimizer, for example `"adam"`.
        optimizer: &'static str,
        /// The configuration field, for example `"beta1"`.
        field: &'static str,
        /// Its value.
        value: f32,
        /// The valid range, for example `"in [0, 1)"`.
        expected: &'static str,
    },
    /// A per-tensor override of [`Optimizer::set_param_groups`] is out of range.
    InvalidGroup {
        /// Position of the tensor whose override is invalid.
        tensor: usize,
        /// The field, `"lr_scale"` or `"weight_decay"`.
        field: &'static str,
        /// Its value.
        value: f32,
        /// The valid range.
        expected: &'static str,
    },
    /// The parameter groups set by [`Optimizer::set_param_groups`] cover another number of tensors
    /// than the step (or the optimizer's layout) has.
    GroupCount {
        /// Number of per-tensor groups set.
        groups: usize,
        /// Number of tensors.
        tensors: usize,
    },
    /// A gradient holds a NaN or an infinity, under [`NonFinite::Error`].
    NonFiniteGrad {
        /// Position of the first tensor with a non-finite gradient.
        tensor: usize,
    },
    /// The optimizer state could not be allocated.
    OutOfMemory {
        /// Number of `f32` elements of the buffer that failed.
        elements: usize,
    },
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepError::LengthMismatch {
                tensor,
                weights,
                grads,
            } => write!(
                f,
                "tensor {tensor}: weights have {weights} elements but grads have {grads}"
            ),
            StepError::TensorCount { expected, found } => write!(
                f,
                "optimizer state holds {expected} tensors but this step passed {found}"
            ),
            StepError::TensorLen {
                tensor,
                expected,
                found,
            } => write!(
                f,
                "tensor {tensor}: optimizer state holds {expected} elements but this step passed {found}"
            ),
            StepError::InvalidConfig {
                optimizer,
                field,
                value,
                expected,
            } => {
                write!(
                    f,
                    "{optimizer}: {field} = {value} is invalid, expected {expected}"
                )
            }
            StepError::InvalidGroup {
                tensor,
                field,
                value,
                expected,
            } => write!(
                f,
                "parameter group of tensor {tensor}: {field} = {value} is invalid, expected {expected}"
            ),
            StepError::GroupCount { groups, tensors } => write!(
                f,
                "parameter groups were set for {groups} tensors but there are {tensors}"
            ),
            StepError::NonFiniteGrad { tensor } => write!(
                f,
                "tensor {tensor}: the gradients hold a NaN or an infinity; nothing was modified"
            ),
            StepError::OutOfMemory { elements } => {
                write!(
                    f,
                    "could not allocate optimizer state of {elements} f32 elements"
                )
            }
        }
    }
}

impl std::error::Error for StepError {}

/// An optimizer: updates weights in place from their gradients, keeping its own state.
///
/// Implemented by [`Sgd`](crate::Sgd), [`Momentum`](crate::Momentum), [`Nag`](crate::Nag),
/// [`AdaGrad`](crate::AdaGrad), [`RmsProp`](crate::RmsProp) and [`Adam`](crate::Adam). The trait is
/// object safe:
///
/// ```
/// use fusedopt::{Adam, AdamConfig, Optimizer, Sgd, SgdConfig};
/// let mut opts: Vec<Box<dyn Optimizer>> = vec![
///     Box::new(Sgd::new(SgdConfig::default())),
///     Box::new(Adam::new(AdamConfig::default())),
/// ];
/// for opt in &mut opts {
///     let mut w = vec![1.0f32; 4];
///     opt.step(&mut w, &[1.0; 4]).unwrap();
///     assert!(w.iter().all(|&x| x < 1.0), "{} did not descend", opt.name());
/// }
/// ```
///
/// # Threads and determinism
/// A step cuts its tensors into chunks of [`chunk_len`](Optimizer::chunk_len) elements and runs
/// them on the current rayon pool, so `pool.install(|| opt.step(..))` picks the thread count. The
/// result is bitwise identical for any thread count, chunk length and [`Backend`].
pub trait Optimizer: Send {
    /// A short lower-case name, for example `"adam"`.
    ///
    /// ```
    /// use fusedopt::{Nag, NagConfig, Optimizer};
    /// assert_eq!(Nag::new(NagConfig::default()).name(), "nag");
    /// ```
    fn name(&self) -> &'static str;

    /// Applies one update to `weights` from `grads`.
    ///
    /// The first step of a stateful optimizer allocates its state (zeros) sized to `weights`; later
    /// steps must pass the same length. [`Sgd`](crate::Sgd) has no state and accepts any length.
    /// Empty tensors are fine. NaN and infinite gradients follow IEEE arithmetic.
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig};
    /// let mut opt = Sgd::new(SgdConfig { lr: 0.5, ..Default::default() });
    /// let mut w = [1.0f32, 2.0];
    /// let report = opt.step(&mut w, &[2.0, -2.0]).unwrap();
    /// assert_eq!(w, [0.0, 3.0]);
    /// assert_eq!(report.step, 1);
    /// ```
    ///
    /// # Errors
    /// [`StepError::LengthMismatch`] if `grads.len() != weights.len()`; [`StepError::TensorLen`]
    /// or [`StepError::TensorCount`] if the optimizer state was created for another layout;
    /// [`StepError::InvalidConfig`] for an out-of-range hyperparameter, loss scale or clipping
    /// norm; [`StepError::InvalidGroup`] or [`StepError::GroupCount`] for parameter groups that do
    /// not fit; [`StepError::NonFiniteGrad`] for a NaN or infinite gradient under
    /// [`NonFinite::Error`]; [`StepError::OutOfMemory`] if the first step cannot allocate the
    /// state. On error neither the weights nor the optimizer state are modified. A step skipped
    /// under [`NonFinite::Skip`] is `Ok` with [`StepReport::skipped`] set.
    fn step(&mut self, weights: &mut [f32], grads: &[f32]) -> Result<StepReport, StepError> {
        self.step_many(&mut [(weights, grads)])
    }

    /// Applies one update to every `(weights, grads)` pair of a model, in one parallel dispatch.
    ///
    /// State is kept per position in the list; the first call fixes the layout (the number of
    /// tensors and each one's length). The result is bitwise identical to calling
    /// [`step`](Optimizer::step) on each tensor with its own optimizer of the same configuration.
    ///
    /// ```
    /// use fusedopt::{Momentum, MomentumConfig, Optimizer};
    /// let mut opt = Momentum::new(MomentumConfig::default());
    /// let (mut w1, mut w2) = (vec![1.0f32; 3], vec![1.0f32; 5]);
    /// let (g1, g2) = (vec![1.0f32; 3], vec![-1.0f32; 5]);
    /// opt.step_many(&mut [(&mut w1, &g1), (&mut w2, &g2)]).unwrap();
    /// assert_eq!(opt.layout(), Some(&[3, 5][..]));
    /// assert!(w1[0] < 1.0 && w2[0] > 1.0);
    /// // Another layout is refused and nothing changes.
    /// assert!(opt.step_many(&mut [(&mut w1, &g1)]).is_err());
    /// ```
    ///
    /// # Errors
    /// As [`step`](Optimizer::step), checked for every pair before anything is written: on error no
    /// tensor of the call and no optimizer state is modified.
    fn step_many(&mut self, params: &mut [(&mut [f32], &[f32])]) -> Result<StepReport, StepError>;

    /// Chooses the kernels of later steps. All backends give bitwise identical results.
    ///
    /// ```
    /// use fusedopt::{Backend, Optimizer, RmsProp, RmsPropConfig, SimdLevel};
    /// let mut opt = RmsProp::new(RmsPropConfig::default());
    /// opt.set_backend(Backend::Level(SimdLevel::Portable));
    /// assert_eq!(opt.backend().level(), SimdLevel::Portable);
    /// ```
    fn set_backend(&mut self, backend: Backend);

    /// The backend set by [`set_backend`](Optimizer::set_backend) ([`Backend::Simd`] by default).
    ///
    /// ```
    /// use fusedopt::{Backend, Optimizer, Sgd, SgdConfig};
    /// assert_eq!(Sgd::new(SgdConfig::default()).backend(), Backend::Simd);
    /// ```
    fn backend(&self) -> Backend;

    /// Sets how many elements one task of a step covers (the unit of work handed to a thread).
    ///
    /// `0` restores the default: the installed [`Tuning`](crate::Tuning)'s value for this
    /// optimizer if there is one, else [`DEFAULT_CHUNK_LEN`](crate::DEFAULT_CHUNK_LEN). Other
    /// values are rounded up to a multiple of 16 elements. Results do not depend on it.
    ///
    /// ```
    /// use fusedopt::{AdaGrad, AdaGradConfig, Optimizer};
    /// let mut opt = AdaGrad::new(AdaGradConfig::default());
    /// opt.set_chunk_len(1000);
    /// assert_eq!(opt.chunk_len(), 1008);
    /// opt.set_chunk_len(0); // the default again (DEFAULT_CHUNK_LEN unless a Tuning says otherwise)
    /// assert_eq!(opt.chunk_len() % 16, 0);
    /// ```
    fn set_chunk_len(&mut self, len: usize);

    /// The effective chunk length, in elements.
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig, Tuning};
    /// let default = Tuning::installed().chunk_len_for("sgd").unwrap_or(fusedopt::DEFAULT_CHUNK_LEN);
    /// assert_eq!(Sgd::new(SgdConfig::default()).chunk_len(), default);
    /// ```
    fn chunk_len(&self) -> usize;

    /// How many steps have been applied (refused steps do not count).
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// let mut w = [0.0f32; 2];
    /// opt.step(&mut w, &[1.0, 1.0]).unwrap();
    /// assert!(opt.step(&mut w, &[1.0]).is_err());
    /// assert_eq!(opt.steps(), 1);
    /// ```
    fn steps(&self) -> u64;

    /// The tensor lengths the optimizer state was created for, or `None` before the first step.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// assert_eq!(opt.layout(), None);
    /// opt.step(&mut [0.0; 3], &[1.0; 3]).unwrap();
    /// assert_eq!(opt.layout(), Some(&[3][..]));
    /// ```
    fn layout(&self) -> Option<&[usize]>;

    /// How many state buffers the optimizer keeps per parameter: 0 for SGD, 1 for Momentum, NAG,
    /// AdaGrad and RMSProp, 2 for Adam (3 with `amsgrad`). A step moves
    /// [`roofline::bytes_per_param`](crate::roofline::bytes_per_param) of that many bytes per
    /// parameter.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer, Sgd, SgdConfig};
    /// assert_eq!(Sgd::new(SgdConfig::default()).state_buffers(), 0);
    /// assert_eq!(Adam::new(AdamConfig::default()).state_buffers(), 2);
    /// ```
    fn state_buffers(&self) -> usize;

    /// The learning rate of the next step (the configuration's `lr`).
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// assert_eq!(Adam::new(AdamConfig::default()).lr(), 0.001);
    /// ```
    fn lr(&self) -> f32;

    /// Sets the learning rate, effective from the next step; state and step count are kept (for
    /// schedules, see [`schedule`](crate::schedule)). An invalid value (negative, NaN, infinite)
    /// is refused by the next step with [`StepError::InvalidConfig`].
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig};
    /// let mut opt = Sgd::new(SgdConfig::default());
    /// opt.set_lr(0.5);
    /// let mut w = [1.0f32];
    /// opt.step(&mut w, &[1.0]).unwrap();
    /// assert_eq!((opt.lr(), w[0]), (0.5, 0.5));
    /// ```
    fn set_lr(&mut self, lr: f32);

    /// Sets per-tensor hyperparameter overrides for [`step_many`](Optimizer::step_many): entry
    /// `i` applies to the call's tensor `i`. An empty slice removes them. Overrides are settings:
    /// [`reset`](Optimizer::reset) keeps them.
    ///
    /// The usual AdamW recipe, no weight decay on biases and normalisation weights:
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer, ParamGroup};
    /// let mut opt = Adam::new(AdamConfig {
    ///     lr: 0.1,
    ///     weight_decay: 0.5,
    ///     decoupled_weight_decay: true,
    ///     ..Default::default()
    /// });
    /// opt.set_param_groups(&[ParamGroup::DEFAULT, ParamGroup::NO_WEIGHT_DECAY])?;
    /// let (mut weight, mut bias) = ([1.0f32], [1.0f32]);
    /// opt.step_many(&mut [(&mut weight, &[0.0]), (&mut bias, &[0.0])])?;
    /// assert_eq!(weight, [0.95]); // decayed: w·(1 − lr·wd)
    /// assert_eq!(bias, [1.0]); // not decayed
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidGroup`] for an out-of-range value; [`StepError::GroupCount`] if the
    /// optimizer already holds state for another number of tensors. Steps whose tensor count
    /// differs from the number of groups are refused with [`StepError::GroupCount`]. On error
    /// the previous groups stay in place.
    fn set_param_groups(&mut self, groups: &[ParamGroup]) -> Result<(), StepError>;

    /// The per-tensor overrides set by [`set_param_groups`](Optimizer::set_param_groups); empty
    /// when none are set.
    ///
    /// ```
    /// use fusedopt::{Optimizer, ParamGroup, Sgd, SgdConfig};
    /// let mut opt = Sgd::new(SgdConfig::default());
    /// assert!(opt.param_groups().is_empty());
    /// opt.set_param_groups(&[ParamGroup { lr_scale: 0.1, ..Default::default() }]).unwrap();
    /// assert_eq!(opt.param_groups()[0].lr_scale, 0.1);
    /// ```
    fn param_groups(&self) -> &[ParamGroup];

    /// Sets the loss scale of later steps (default 1): the kernels divide every gradient by it as
    /// they read it, so a mixed-precision trainer passes its scaled gradients unchanged. A
    /// power-of-two scale (what dynamic loss scalers use) is applied as an exact multiplication by
    /// its reciprocal, which gives the same bits as the division. Must be finite and `> 0`; the
    /// next step refuses another value with [`StepError::InvalidConfig`].
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig};
    /// let mut opt = Sgd::new(SgdConfig { lr: 1.0, ..Default::default() });
    /// opt.set_grad_scale(1024.0);
    /// let mut w = [1.0f32];
    /// opt.step(&mut w, &[512.0])?; // the true gradient is 0.5
    /// assert_eq!(w, [0.5]);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    fn set_grad_scale(&mut self, scale: f32);

    /// The loss scale set by [`set_grad_scale`](Optimizer::set_grad_scale) (1 by default).
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// assert_eq!(Adam::new(AdamConfig::default()).grad_scale(), 1.0);
    /// ```
    fn grad_scale(&self) -> f32;

    /// Clips later steps by global norm (`None`, the default, does not clip): the L2 norm of all
    /// gradients of the call (`step` or `step_many`), taken on unscaled gradients, gives the
    /// coefficient `min(1, max / (norm + 1e-6))` of `torch.nn.utils.clip_grad_norm_`, applied
    /// inside the update kernel. The norm costs one extra read of the gradients; its sum runs in
    /// a fixed order, so its bits do not depend on threads or chunk length. `max` must be finite
    /// and `>= 0`; the next step refuses another value with [`StepError::InvalidConfig`].
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig};
    /// let mut opt = Sgd::new(SgdConfig { lr: 1.0, ..Default::default() });
    /// opt.set_max_grad_norm(Some(1.0));
    /// let mut w = [0.0f32; 2];
    /// let report = opt.step(&mut w, &[3.0, 4.0])?; // norm 5: scaled to norm 1
    /// assert_eq!(report.grad_norm, Some(5.0));
    /// assert!((w[0] + 0.6).abs() < 1e-6 && (w[1] + 0.8).abs() < 1e-6);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    fn set_max_grad_norm(&mut self, max: Option<f32>);

    /// The clipping norm set by [`set_max_grad_norm`](Optimizer::set_max_grad_norm).
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// assert_eq!(Adam::new(AdamConfig::default()).max_grad_norm(), None);
    /// ```
    fn max_grad_norm(&self) -> Option<f32>;

    /// Chooses what later steps do with a NaN or an infinity in a gradient ([`NonFinite`]). The
    /// check shares the norm pass of clipping.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, NonFinite, Optimizer, StepError};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// let mut w = [1.0f32, 2.0];
    /// opt.set_non_finite(NonFinite::Skip);
    /// let report = opt.step(&mut w, &[f32::NAN, 1.0])?;
    /// assert!(report.skipped && report.step == 0 && w == [1.0, 2.0]);
    /// opt.set_non_finite(NonFinite::Error);
    /// let err = opt.step(&mut w, &[1.0, f32::INFINITY]).unwrap_err();
    /// assert_eq!(err, StepError::NonFiniteGrad { tensor: 0 });
    /// assert_eq!((opt.steps(), w), (0, [1.0, 2.0]));
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    fn set_non_finite(&mut self, policy: NonFinite);

    /// The policy set by [`set_non_finite`](Optimizer::set_non_finite).
    ///
    /// ```
    /// use fusedopt::{NonFinite, Optimizer, Sgd, SgdConfig};
    /// assert_eq!(Sgd::new(SgdConfig::default()).non_finite(), NonFinite::Propagate);
    /// ```
    fn non_finite(&self) -> NonFinite;

    /// Saves the optimizer state to `path`: the state buffers, step count, layout, parameter
    /// groups and hyperparameters, as a safetensors file with a checksum. The write is atomic: a
    /// temporary file in the same directory is written, synced and renamed over `path`, and the
    /// directory is synced.
    ///
    /// # Format
    /// One `F32` tensor per state buffer and model tensor, named `<buffer>.<tensor>` (`v` for
    /// Momentum and NAG, `h` for AdaGrad and RMSProp, `m`, `v` and `v_max` for Adam; SGD has
    /// none), and string metadata: `format` (`fusedopt-state`), `format_version` (`1`),
    /// `optimizer`, `steps`, `layout` (tensor lengths, comma-separated; `-` before the first
    /// step), `buffers`, `groups` (per tensor `lr_scale/weight_decay`, `-` for no override,
    /// comma-separated), `config.<field>` for every hyperparameter, and `checksum`: the CRC-32,
    /// as 8 hex digits, of every other metadata entry as `key=value\n` in key order, then of each
    /// tensor's name, a newline and its little-endian bytes, in buffer then tensor order.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let path = std::env::temp_dir().join(format!("fusedopt-doc-save-{}.safetensors", std::process::id()));
    /// let mut opt = Adam::new(AdamConfig::default());
    /// let mut w = [1.0f32; 3];
    /// opt.step(&mut w, &[0.5; 3])?;
    /// opt.save_state(&path)?;
    ///
    /// let mut resumed = Adam::new(AdamConfig::default());
    /// resumed.load_state(&path)?;
    /// assert_eq!((resumed.steps(), resumed.layout()), (1, Some(&[3][..])));
    /// # std::fs::remove_file(&path).unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`StateError::Io`] if the file cannot be written, synced or renamed; any previous file at
    /// `path` is then left intact.
    fn save_state(&self, path: &Path) -> Result<(), StateError>;

    /// Replaces the optimizer state with the one saved at `path` by
    /// [`save_state`](Optimizer::save_state): state buffers, step count, layout, parameter
    /// groups and hyperparameters (as `torch.optim`'s `load_state_dict` does). Settings that are
    /// not state (backend, chunk length, loss scale, clipping, non-finite policy) are kept.
    /// Continuing after a load gives bitwise the results of the uninterrupted run.
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig, StateError};
    /// let path = std::env::temp_dir().join(format!("fusedopt-doc-load-{}.safetensors", std::process::id()));
    /// Sgd::new(SgdConfig::default()).save_state(&path)?;
    /// let mut adam = fusedopt::Adam::new(Default::default());
    /// let err = adam.load_state(&path).unwrap_err();
    /// assert!(matches!(err, StateError::Optimizer { .. }), "{err}");
    /// assert!(err.to_string().contains("sgd"));
    /// # std::fs::remove_file(&path).unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// Everything is checked before anything changes; on error the optimizer is untouched.
    /// [`StateError::Io`] if the file cannot be read; [`StateError::Format`] for a file that is
    /// not a fusedopt state file; [`StateError::Checksum`] for a truncated or altered one;
    /// [`StateError::Version`], [`StateError::Optimizer`] for another format version or
    /// optimizer kind; [`StateError::Layout`] if the optimizer already holds state for another
    /// layout; [`StateError::Config`] for out-of-range hyperparameters;
    /// [`StateError::OutOfMemory`].
    fn load_state(&mut self, path: &Path) -> Result<(), StateError>;

    /// Forgets all state and the step count, as if newly built; settings are kept.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// opt.step(&mut [0.0; 3], &[1.0; 3]).unwrap();
    /// opt.reset();
    /// assert_eq!((opt.steps(), opt.layout()), (0, None));
    /// opt.step(&mut [0.0; 5], &[1.0; 5]).unwrap(); // a new layout is fine now
    /// ```
    fn reset(&mut self);
}

pub(crate) mod sealed {
    use super::*;

    /// What an optimizer file provides; the engine and the blanket [`Optimizer`] impl do the rest.
    pub trait Rule: Send {
        /// The configuration type.
        type Config: crate::checkpoint::ConfigFields;
        /// The names of the state buffers in a state file, in the engine's order.
        const BUFFER_NAMES: &'static [&'static str];
        /// See [`Optimizer::name`].
        const NAME: &'static str;
        /// The configuration.
        fn rule_config(&self) -> &Self::Config;
        /// The configuration, to replace.
        fn rule_config_mut(&mut self) -> &mut Self::Config;
        /// See [`Optimizer::state_buffers`].
        fn state_buffers(&self) -> usize;
        fn core(&self) -> &Core;
        fn core_mut(&mut self) -> &mut Core;
        /// Checks the configuration, builds this step's kernel and runs it through the engine.
        fn apply(&mut self, params: &mut Params<'_, '_>) -> Result<StepReport, StepError>;
    }
}

impl<T: sealed::Rule> Optimizer for T {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn step_many(&mut self, params: &mut [(&mut [f32], &[f32])]) -> Result<StepReport, StepError> {
        self.apply(params)
    }
    fn set_backend(&mut self, backend: Backend) {
        self.core_mut().set_backend(backend)
    }
    fn backend(&self) -> Backend {
        self.core().backend()
    }
    fn set_chunk_len(&mut self, len: usize) {
        self.core_mut().set_chunk_len(len)
    }
    fn chunk_len(&self) -> usize {
        self.core().chunk_len()
    }
    fn steps(&self) -> u64 {
        self.core().steps()
    }
    fn layout(&self) -> Option<&[usize]> {
        self.core().layout()
    }
    fn state_buffers(&self) -> usize {
        sealed::Rule::state_buffers(self)
    }
    fn lr(&self) -> f32 {
        self.rule_config().lr()
    }
    fn set_lr(&mut self, lr: f32) {
        *self.rule_config_mut().lr_mut() = lr;
    }
    fn set_param_groups(&mut self, groups: &[ParamGroup]) -> Result<(), StepError> {
        self.core_mut().set_param_groups(groups)
    }
    fn param_groups(&self) -> &[ParamGroup] {
        self.core().param_groups()
    }
    fn set_grad_scale(&mut self, scale: f32) {
        self.core_mut().set_grad_scale(scale)
    }
    fn grad_scale(&self) -> f32 {
        self.core().grad_scale()
    }
    fn set_max_grad_norm(&mut self, max: Option<f32>) {
        self.core_mut().set_max_grad_norm(max)
    }
    fn max_grad_norm(&self) -> Option<f32> {
        self.core().max_grad_norm()
    }
    fn set_non_finite(&mut self, policy: NonFinite) {
        self.core_mut().set_non_finite(policy)
    }
    fn non_finite(&self) -> NonFinite {
        self.core().non_finite()
    }
    fn save_state(&self, path: &Path) -> Result<(), StateError> {
        let fields = self.rule_config().fields();
        checkpoint::save(path, T::NAME, T::BUFFER_NAMES, &fields, self.core())
    }
    fn load_state(&mut self, path: &Path) -> Result<(), StateError> {
        let current = self.core().layout();
        let loaded = checkpoint::load(path, T::NAME, T::BUFFER_NAMES, current)?;
        let config = checkpoint::check_config::<T::Config>(path, &loaded)?;
        // Everything is checked: apply.
        *self.rule_config_mut() = config;
        let checkpoint::Loaded {
            steps,
            layout,
            groups,
            state,
            ..
        } = loaded;
        self.core_mut().restore(layout, state, steps, &groups);
        Ok(())
    }
    fn reset(&mut self) {
        self.core_mut().reset()
    }
}

/// Range checks shared by the configurations.
pub(crate) fn check(
    optimizer: &'static str,
    field: &'static str,
    value: f32,
    ok: bool,
    expected: &'static str,
) -> Result<(), StepError> {
    if ok {
        Ok(())
    } else {
        Err(StepError::InvalidConfig {
            optimizer,
            field,
            value,
            expected,
        })
    }
}

/// `lr` must be finite and non-negative.
pub(crate) fn check_lr(optimizer: &'static str, lr: f32) -> Result<(), StepError> {
    check(
        optimizer,
        "lr",
        lr,
        lr.is_finite() && lr >= 0.0,
        "finite and >= 0",
    )
}

/// `weight_decay` must be finite and non-negative.
pub(crate) fn check_weight_decay(optimizer: &'static str, wd: f32) -> Result<(), StepError> {
    check(
        optimizer,
        "weight_decay",
        wd,
        wd.is_finite() && wd >= 0.0,
        "finite and >= 0",
    )
}

/// `eps` must be finite and non-negative.
pub(crate) fn check_eps(optimizer: &'static str, eps: f32) -> Result<(), StepError> {
    check(
        optimizer,
        "eps",
        eps,
        eps.is_finite() && eps >= 0.0,
        "finite and >= 0",
    )
}

/// A decay or momentum coefficient must lie in `[0, 1]`, or `[0, 1)` where `closed` is false.
pub(crate) fn check_unit(
    optimizer: &'static str,
    field: &'static str,
    value: f32,
    closed: bool,
) -> Result<(), StepError> {
    let ok = value >= 0.0 && if closed { value <= 1.0 } else { value < 1.0 };
    check(
        optimizer,
        field,
        value,
        ok,
        if closed { "in [0, 1]" } else { "in [0, 1)" },
    )
}
