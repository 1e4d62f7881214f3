//! Plain values shared by every layer: errors, step reports, parameter groups and settings.
//! Imports only [`crate::simd`].

use crate::simd::{SimdLevel, Tier};
use core::fmt;

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
    /// clipping ([`set_max_grad_norm`](crate::Optimizer::set_max_grad_norm)) or checking
    /// ([`set_non_finite`](crate::Optimizer::set_non_finite)) ran.
    pub grad_norm: Option<f32>,
}

/// What a step does with a NaN or an infinity in a gradient
/// ([`Optimizer::set_non_finite`](crate::Optimizer::set_non_finite)).
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
/// [`Optimizer::set_param_groups`](crate::Optimizer::set_param_groups): PyTorch's parameter
/// groups, one entry per tensor.
///
/// ```
/// use fusedopt::ParamGroup;
/// assert_eq!(ParamGroup::default(), ParamGroup { lr_scale: 1.0, weight_decay: None });
/// assert_eq!(ParamGroup::NO_WEIGHT_DECAY.weight_decay, Some(0.0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamGroup {
    /// Multiplies the configuration's `lr` for this tensor (default 1). Finite and `>= 0`. Follows
    /// [`Optimizer::set_lr`](crate::Optimizer::set_lr), so a schedule drives every group.
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

/// The floating-point format of a tensor's weights or gradients.
///
/// `f32` is the native format. Gradients may be bfloat16 or IEEE half precision (read exactly
/// as `f32`). Half-precision weights are *master-weight* training: the optimizer keeps an `f32`
/// copy as part of its state, updates it, and writes it back rounded to nearest-even.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Dtype {
    /// IEEE single precision.
    #[default]
    F32,
    /// bfloat16 ([`half::bf16`]).
    Bf16,
    /// IEEE half precision ([`half::f16`]).
    F16,
}

impl Dtype {
    /// Its name: `"f32"`, `"bf16"` or `"f16"`.
    ///
    /// ```
    /// assert_eq!(fusedopt::Dtype::Bf16.name(), "bf16");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

impl Dtype {
    /// The size of an element, in bytes.
    ///
    /// ```
    /// assert_eq!((fusedopt::Dtype::F32.size(), fusedopt::Dtype::Bf16.size()), (4, 2));
    /// ```
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }
}

/// Reads `f32`, `bf16` and `f16`, and numpy's and torch's names `float32`, `bfloat16` and
/// `float16`.
///
/// ```
/// use fusedopt::Dtype;
/// assert_eq!("bfloat16".parse::<Dtype>(), Ok(Dtype::Bf16));
/// assert!("float64".parse::<Dtype>().unwrap_err().contains("float64"));
/// ```
impl core::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim() {
            "f32" | "float32" => Dtype::F32,
            "bf16" | "bfloat16" => Dtype::Bf16,
            "f16" | "float16" => Dtype::F16,
            other => {
                return Err(format!(
                    "dtype {other:?}: fusedopt steps float32, bfloat16 or float16 memory"
                ));
            }
        })
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub(crate) mod sealed {
    /// Keeps [`Element`](super::Element) implemented by this crate alone.
    pub trait Element {}
    impl Element for f32 {}
    impl Element for half::bf16 {}
    impl Element for half::f16 {}
}

/// An element type of weights and gradients: `f32`, [`half::bf16`] or [`half::f16`]. Sealed.
///
/// ```
/// use fusedopt::{Dtype, Element};
/// assert_eq!(<half::bf16 as Element>::DTYPE, Dtype::Bf16);
/// ```
pub trait Element: sealed::Element + Copy + Send + Sync + 'static {
    /// Its format.
    const DTYPE: Dtype;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
}
impl Element for half::bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
}
impl Element for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
}

/// How an optimizer stores its state buffers (momentum, moments, sums of squares). Chosen before
/// the first step ([`set_state_format`](crate::Optimizer::set_state_format)); the arithmetic is
/// `f32` in every format, only the stored values differ.
///
/// | format | bytes per state element | rounding |
/// |---|---|---|
/// | [`F32`](StateFormat::F32) | 4 | none |
/// | [`Bf16`](StateFormat::Bf16) | 2 | stochastic, driven by a hash of (step, buffer, element) |
/// | [`Q8`](StateFormat::Q8) | 1 + 4/256 | to the nearest code of a block-wise 8-bit map |
///
/// Results stay bitwise identical across tiers, thread counts and chunk lengths in every
/// format.
///
/// ```
/// use fusedopt::StateFormat;
/// assert_eq!("q8".parse::<StateFormat>(), Ok(StateFormat::Q8));
/// assert_eq!(StateFormat::Bf16.to_string(), "bf16");
/// assert_eq!(StateFormat::default(), StateFormat::F32);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum StateFormat {
    /// Single precision, as the parameters.
    #[default]
    F32,
    /// bfloat16 (8 significant bits) with stochastic rounding: round-to-nearest would freeze
    /// slowly changing state such as Adam's second moment.
    Bf16,
    /// 8-bit block-wise quantization (Dettmers et al., 2022): blocks of 256 elements, each with
    /// an `f32` absmax scale; a signed non-linear map for first moments and momentum, an unsigned
    /// one for second moments and sums of squares. A block holding a NaN or an infinity becomes
    /// all NaN.
    Q8,
}

impl StateFormat {
    /// Every format.
    pub const ALL: [StateFormat; 3] = [StateFormat::F32, StateFormat::Bf16, StateFormat::Q8];

    /// Its name: `"f32"`, `"bf16"` or `"q8"`.
    ///
    /// ```
    /// assert_eq!(fusedopt::StateFormat::Q8.name(), "q8");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            StateFormat::F32 => "f32",
            StateFormat::Bf16 => "bf16",
            StateFormat::Q8 => "q8",
        }
    }
}

impl fmt::Display for StateFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for StateFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        StateFormat::ALL
            .into_iter()
            .find(|f| f.name() == s.trim())
            .ok_or_else(|| format!("unknown state format {s:?}, expected f32, bf16 or q8"))
    }
}

/// A hyperparameter's value, typed, as [`OptimizerConfig::value`](crate::OptimizerConfig::value)
/// gives it and [`OptimizerConfig::set_value`](crate::OptimizerConfig::set_value) takes it: how
/// bindings pass keyword arguments without going through text.
///
/// ```
/// use fusedopt::{OptimizerConfig, Value};
/// let config = OptimizerConfig::default_for("adam").unwrap();
/// assert_eq!(config.value("beta1"), Some(Value::Number(0.9)));
/// assert_eq!(config.value("amsgrad"), Some(Value::Bool(false)));
/// assert_eq!(config.value("eps_mode"), Some(Value::Choice("sqrt_v".into())));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Value {
    /// A number. Fields kept as `f32` round it to nearest.
    Number(f64),
    /// A flag.
    Bool(bool),
    /// A whole number: a count of steps (AdEMAMix's warm-up lengths). Fields that take a number
    /// take a count too; count fields take a number that is a whole number.
    Count(u64),
    /// One of a field's named choices, for example `"sqrt_v_hat"` for
    /// [`EpsMode`](crate::EpsMode).
    Choice(String),
}

impl fmt::Display for Value {
    /// The value as configuration strings write it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Number(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Count(n) => write!(f, "{n}"),
            Value::Choice(name) => f.write_str(name),
        }
    }
}

/// Why a step was refused. A refused step modifies neither the weights nor the optimizer state.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StepError {
    /// A tensor's weights and gradients have different lengths.
    LengthMismatch {
        /// Position of the tensor in the call (0 for [`Optimizer::step`](crate::Optimizer::step)).
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
        /// Position of the tensor in the call (0 for [`Optimizer::step`](crate::Optimizer::step)).
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
    /// A setting ([`Settings`]) is out of its valid range.
    InvalidSetting {
        /// The setting, for example `"grad_scale"`.
        field: &'static str,
        /// Its value.
        value: f32,
        /// The valid range, for example `"finite and > 0"`.
        expected: &'static str,
    },
    /// A per-tensor override of
    /// [`Optimizer::set_param_groups`](crate::Optimizer::set_param_groups) is out of range.
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
    /// The parameter groups set by
    /// [`Optimizer::set_param_groups`](crate::Optimizer::set_param_groups) cover another number
    /// of tensors than the step (or the optimizer's layout) has.
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
    /// [`step_all`](crate::OptimizerExt::step_all) was given another number of gradient tensors than
    /// weight tensors: a gradient is missing, or there is one too many.
    GradCount {
        /// Number of weight tensors.
        weights: usize,
        /// Number of gradient tensors.
        grads: usize,
    },
    /// A tensor name given to [`set_tensor_names`](crate::Optimizer::set_tensor_names) is
    /// unusable.
    InvalidName {
        /// Position of the tensor.
        tensor: usize,
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Tensor names were given for another number of tensors than the optimizer's layout (or,
    /// in a step, the step) has.
    NameCount {
        /// Number of names.
        names: usize,
        /// Number of tensors.
        tensors: usize,
    },
    /// A [`TensorFeed`](crate::TensorFeed) failed to lend a tensor, or lent it wrongly.
    Feed {
        /// Position of the tensor.
        tensor: usize,
        /// What went wrong.
        message: String,
    },
    /// The optimizer's own thread pool ([`set_threads`](crate::Optimizer::set_threads)) could
    /// not be built.
    ThreadPool {
        /// The thread count asked for.
        threads: usize,
        /// Why it failed.
        message: String,
    },
    /// A configuration of another optimizer was given to
    /// [`set_config`](crate::Optimizer#method.set_config).
    RuleMismatch {
        /// The optimizer's name.
        optimizer: &'static str,
        /// The configuration's.
        config: &'static str,
    },
    /// [`set_state_format`](crate::Optimizer::set_state_format) was asked for another format
    /// than the one the optimizer's state is held in.
    StateFormat {
        /// The format of the state held.
        held: StateFormat,
        /// The format asked for.
        requested: StateFormat,
    },
    /// The optimizer holds no state buffer `buffer` for tensor `tensor` (before the first step,
    /// or a buffer this optimizer does not keep).
    NoState {
        /// The buffer's position among the rule's buffers.
        buffer: usize,
        /// The tensor.
        tensor: usize,
    },
    /// A step was asked of a schedule-free optimizer whose weights are at their evaluation
    /// point: call [`train`](crate::Optimizer::train) first.
    EvalMode {
        /// The optimizer's name.
        optimizer: &'static str,
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
            StepError::InvalidSetting {
                field,
                value,
                expected,
            } => write!(f, "{field} = {value} is invalid, expected {expected}"),
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
            StepError::GradCount { weights, grads } => write!(
                f,
                "the step passed {weights} weight tensors but {grads} gradient tensors"
            ),
            StepError::InvalidName {
                tensor,
                name,
                reason,
            } => write!(f, "tensor {tensor}: name {name:?} {reason}"),
            StepError::NameCount { names, tensors } => write!(
                f,
                "{names} tensor names were given but there are {tensors} tensors"
            ),
            StepError::Feed { tensor, message } => {
                write!(f, "tensor {tensor}: the feed failed: {message}")
            }
            StepError::ThreadPool { threads, message } => {
                write!(f, "could not start a pool of {threads} threads: {message}")
            }
            StepError::RuleMismatch { optimizer, config } => write!(
                f,
                "a {config} configuration cannot be set on a {optimizer} optimizer"
            ),
            StepError::StateFormat { held, requested } => write!(
                f,
                "the optimizer state is held in {held}; it cannot become {requested} (choose \
                 the format before the first step, or reset)"
            ),
            StepError::NoState { buffer, tensor } => write!(
                f,
                "the optimizer holds no state buffer {buffer} for tensor {tensor}"
            ),
            StepError::EvalMode { optimizer } => write!(
                f,
                "{optimizer}: the weights are at the evaluation point (after eval()); call \
                 train() before stepping"
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

impl Backend {
    /// The tier this backend runs on here: `Scalar` for [`Backend::Scalar`], the best available
    /// tier for [`Backend::Simd`], and for [`Backend::Level`] the requested tier or, where the CPU
    /// lacks it, the best available one below it.
    ///
    /// ```
    /// use fusedopt::{Backend, SimdLevel};
    /// assert_eq!(Backend::Scalar.level(), SimdLevel::Scalar);
    /// assert_eq!(Backend::Simd.level(), SimdLevel::detect());
    /// assert_eq!(Backend::Level(SimdLevel::Portable).level(), SimdLevel::Portable);
    /// ```
    pub fn level(self) -> SimdLevel {
        self.tier().level()
    }

    /// Its name: `"simd"`, `"scalar"`, or the tier's name ([`SimdLevel::name`]) for
    /// [`Backend::Level`]; [`FromStr`](core::str::FromStr) reads it back.
    ///
    /// ```
    /// use fusedopt::{Backend, SimdLevel};
    /// assert_eq!(Backend::Simd.name(), "simd");
    /// assert_eq!(Backend::Level(SimdLevel::Portable).name(), "portable");
    /// assert_eq!("portable".parse::<Backend>(), Ok(Backend::Level(SimdLevel::Portable)));
    /// assert!("avx1024".parse::<Backend>().unwrap_err().contains("expected simd, scalar"));
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Backend::Simd => "simd",
            Backend::Scalar => "scalar",
            Backend::Level(level) => level.name(),
        }
    }

    /// The tier, with its proof of availability.
    pub(crate) fn tier(self) -> Tier {
        Tier::new(match self {
            Backend::Scalar => SimdLevel::Scalar,
            Backend::Simd => SimdLevel::detect(),
            Backend::Level(l) => l,
        })
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "simd" => Ok(Backend::Simd),
            "scalar" => Ok(Backend::Scalar),
            name => SimdLevel::ALL
                .into_iter()
                .find(|l| l.name() == name)
                .map(Backend::Level)
                .ok_or_else(|| {
                    let tiers: Vec<_> = SimdLevel::ALL.iter().map(|l| l.name()).collect();
                    format!(
                        "unknown backend {s:?}, expected simd, scalar or a tier ({})",
                        tiers.join(", ")
                    )
                }),
        }
    }
}

impl NonFinite {
    /// Every policy.
    pub const ALL: [NonFinite; 3] = [NonFinite::Propagate, NonFinite::Skip, NonFinite::Error];

    /// Its name: `"propagate"`, `"skip"` or `"error"`; [`FromStr`](core::str::FromStr) reads
    /// it back.
    ///
    /// ```
    /// use fusedopt::NonFinite;
    /// assert_eq!(NonFinite::Skip.name(), "skip");
    /// assert_eq!("error".parse::<NonFinite>(), Ok(NonFinite::Error));
    /// assert!("ignore".parse::<NonFinite>().is_err());
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            NonFinite::Propagate => "propagate",
            NonFinite::Skip => "skip",
            NonFinite::Error => "error",
        }
    }
}

impl fmt::Display for NonFinite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for NonFinite {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        NonFinite::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or_else(|| format!("unknown policy {s:?}, expected propagate, skip or error"))
    }
}

/// How an optimizer's steps run, and their gradient hygiene: everything an optimizer is set to
/// besides its rule's hyperparameters. One value, read with
/// [`Optimizer::settings`](crate::Optimizer::settings) and replaced, checked in full, with
/// [`Optimizer::set_settings`](crate::Optimizer::set_settings); the per-setting methods
/// ([`set_grad_scale`](crate::Optimizer::set_grad_scale), ...) are shorthands for it. Settings are
/// not state: [`reset`](crate::Optimizer::reset) and loading a state file keep them.
///
/// Build one from [`Settings::default`] with the `with_*` methods:
///
/// ```
/// use fusedopt::{Adam, AdamConfig, NonFinite, Optimizer, Settings};
/// let settings = Settings::default()
///     .with_grad_scale(1024.0)
///     .with_max_grad_norm(Some(1.0))
///     .with_non_finite(NonFinite::Skip);
/// let mut opt = Adam::new(AdamConfig::default());
/// opt.set_settings(settings)?;
/// assert_eq!(opt.settings(), &settings);
/// assert_eq!(opt.grad_scale(), 1024.0);
///
/// // Out of range: refused, and nothing changes.
/// assert!(opt.set_settings(settings.with_grad_scale(0.0)).is_err());
/// assert_eq!(opt.settings(), &settings);
/// # Ok::<(), fusedopt::StepError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Settings {
    /// Which kernels run (default [`Backend::Simd`]). Every backend gives the same bits.
    pub backend: Backend,
    /// Elements per task of a step, the unit of work handed to a thread; `0` (the default) for
    /// the installed [`Tuning`](crate::Tuning)'s value or
    /// [`DEFAULT_CHUNK_LEN`](crate::DEFAULT_CHUNK_LEN). Other values are rounded up to a
    /// multiple of 16 when set. Results do not depend on it.
    pub chunk_len: usize,
    /// The loss scale (default 1): every gradient is divided by it as the kernels read it.
    /// Finite and `> 0`.
    pub grad_scale: f32,
    /// Global-norm clipping (default `None`: no clipping), as `torch.nn.utils.clip_grad_norm_`.
    /// Finite and `>= 0` (`0` zeroes every update).
    pub max_grad_norm: Option<f32>,
    /// What a NaN or infinite gradient does (default [`NonFinite::Propagate`]).
    pub non_finite: NonFinite,
    /// Threads of the optimizer's own pool; `0` (the default) runs steps on the caller's rayon
    /// pool.
    pub threads: usize,
    /// The format new state is created in (default [`StateFormat::F32`]); another format than
    /// that of state already held is refused.
    pub state_format: StateFormat,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            backend: Backend::default(),
            chunk_len: 0,
            grad_scale: 1.0,
            max_grad_norm: None,
            non_finite: NonFinite::Propagate,
            threads: 0,
            state_format: StateFormat::F32,
        }
    }
}

impl Settings {
    /// These settings with [`backend`](Settings::backend) `backend`.
    ///
    /// ```
    /// use fusedopt::{Backend, Settings};
    /// assert_eq!(Settings::default().with_backend(Backend::Scalar).backend, Backend::Scalar);
    /// ```
    #[must_use]
    pub fn with_backend(self, backend: Backend) -> Self {
        Settings { backend, ..self }
    }

    /// These settings with [`chunk_len`](Settings::chunk_len) `chunk_len`.
    ///
    /// ```
    /// assert_eq!(fusedopt::Settings::default().with_chunk_len(4096).chunk_len, 4096);
    /// ```
    #[must_use]
    pub fn with_chunk_len(self, chunk_len: usize) -> Self {
        Settings { chunk_len, ..self }
    }

    /// These settings with [`grad_scale`](Settings::grad_scale) `grad_scale`.
    ///
    /// ```
    /// assert_eq!(fusedopt::Settings::default().with_grad_scale(8.0).grad_scale, 8.0);
    /// ```
    #[must_use]
    pub fn with_grad_scale(self, grad_scale: f32) -> Self {
        Settings { grad_scale, ..self }
    }

    /// These settings with [`max_grad_norm`](Settings::max_grad_norm) `max_grad_norm`.
    ///
    /// ```
    /// let s = fusedopt::Settings::default().with_max_grad_norm(Some(1.0));
    /// assert_eq!(s.max_grad_norm, Some(1.0));
    /// ```
    #[must_use]
    pub fn with_max_grad_norm(self, max_grad_norm: Option<f32>) -> Self {
        Settings {
            max_grad_norm,
            ..self
        }
    }

    /// These settings with [`non_finite`](Settings::non_finite) `non_finite`.
    ///
    /// ```
    /// use fusedopt::{NonFinite, Settings};
    /// assert_eq!(Settings::default().with_non_finite(NonFinite::Skip).non_finite, NonFinite::Skip);
    /// ```
    #[must_use]
    pub fn with_non_finite(self, non_finite: NonFinite) -> Self {
        Settings { non_finite, ..self }
    }

    /// These settings with [`threads`](Settings::threads) `threads`.
    ///
    /// ```
    /// assert_eq!(fusedopt::Settings::default().with_threads(4).threads, 4);
    /// ```
    #[must_use]
    pub fn with_threads(self, threads: usize) -> Self {
        Settings { threads, ..self }
    }

    /// These settings with [`state_format`](Settings::state_format) `state_format`.
    ///
    /// ```
    /// use fusedopt::{Settings, StateFormat};
    /// assert_eq!(Settings::default().with_state_format(StateFormat::Q8).state_format, StateFormat::Q8);
    /// ```
    #[must_use]
    pub fn with_state_format(self, state_format: StateFormat) -> Self {
        Settings {
            state_format,
            ..self
        }
    }

    /// Checks the ranges of the numeric settings: what
    /// [`set_settings`](crate::Optimizer::set_settings) checks before anything else.
    ///
    /// ```
    /// use fusedopt::{Settings, StepError};
    /// assert!(Settings::default().validate().is_ok());
    /// let err = Settings::default().with_max_grad_norm(Some(-1.0)).validate().unwrap_err();
    /// assert!(matches!(err, StepError::InvalidSetting { field: "max_grad_norm", .. }));
    /// assert_eq!(err.to_string(), "max_grad_norm = -1 is invalid, expected finite and >= 0");
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidSetting`] naming the first setting out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        let invalid = |field, value, expected| StepError::InvalidSetting {
            field,
            value,
            expected,
        };
        let scale = self.grad_scale;
        if !(scale.is_finite() && scale > 0.0) {
            return Err(invalid("grad_scale", scale, "finite and > 0"));
        }
        if let Some(max) = self.max_grad_norm
            && !(max.is_finite() && max >= 0.0)
        {
            return Err(invalid("max_grad_norm", max, "finite and >= 0"));
        }
        Ok(())
    }
}
