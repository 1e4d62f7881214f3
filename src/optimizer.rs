//! The public [`Optimizer`] trait: sealed, object safe, implemented once for [`Fused`]; and
//! [`OptimizerExt`], the list steps written once for every optimizer and `dyn Optimizer`. Imports [`crate::optim`], [`crate::checkpoint`],
//! [`crate::engine`] and [`crate::types`].

use crate::checkpoint::{self, StateError};
use crate::engine::chunk_len_for;
use crate::engine::{
    Lists, Pairs, PartialLists, TensorFeed, TensorSource, TypedLists, TypedPartialLists,
};
use crate::optim::{Fused, Rule};
use crate::types::{
    Backend, Element, NonFinite, ParamGroup, Settings, StateFormat, StepError, StepReport,
};
use core::any::Any;
use core::marker::PhantomData;
use std::path::Path;

/// The name under which the state-access methods ([`Optimizer::state_names`],
/// [`Optimizer::tensor_state`], [`Optimizer::read_tensor_state`], ...) expose the `f32` master
/// weights of half-precision weights.
const MASTER: &str = "master";

/// An optimizer: updates weights in place from their gradients, keeping its own state.
///
/// Implemented by [`Sgd`](crate::Sgd), [`Momentum`](crate::Momentum), [`Nag`](crate::Nag),
/// [`AdaGrad`](crate::AdaGrad), [`RmsProp`](crate::RmsProp) and [`Adam`](crate::Adam), the
/// instances of [`Fused`]. The trait is sealed (only this crate implements it, so methods can be
/// added without breaking anyone) and object safe:
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
/// Outside code cannot implement it: even with every method written, `Mine` lacks the sealed
/// supertrait.
///
/// ```compile_fail,E0277
/// use fusedopt::*;
/// struct Mine;
/// impl Optimizer for Mine {
///     fn name(&self) -> &'static str {
///         "mine"
///     }
///     // ... every other method ...
/// #   fn step_many(&mut self, _: &mut [(&mut [f32], &[f32])]) -> Result<StepReport, StepError> { todo!() }
/// #   fn settings(&self) -> &Settings { todo!() }
/// #   fn set_settings(&mut self, _: Settings) -> Result<(), StepError> { Ok(()) }
/// #   fn steps(&self) -> u64 { 0 }
/// #   fn layout(&self) -> Option<&[usize]> { None }
/// #   fn tensor_steps(&self) -> &[u64] { &[] }
/// #   fn set_tensor_names(&mut self, _: &[&str]) -> Result<(), StepError> { Ok(()) }
/// #   fn tensor_names(&self) -> &[String] { &[] }
/// #   fn step_feed(&mut self, _: &dyn TensorFeed) -> Result<StepReport, StepError> { todo!() }
/// #   fn state_buffers(&self) -> usize { 0 }
/// #   fn state_names(&self) -> Vec<&'static str> { Vec::new() }
/// #   fn state_bytes(&self) -> usize { 0 }
/// #   fn tensor_state(&self, _: &str, _: usize) -> Option<&[f32]> { None }
/// #   fn tensor_state_mut(&mut self, _: &str, _: usize) -> Option<&mut [f32]> { None }
/// #   fn read_tensor_state(&self, _: &str, _: usize) -> Option<Vec<f32>> { None }
/// #   fn write_tensor_state(&mut self, _: &str, _: usize, _: &[f32]) -> Result<(), StepError> { Ok(()) }
/// #   fn init_state(&mut self, _: &[usize]) -> Result<(), StepError> { Ok(()) }
/// #   fn set_tensor_steps(&mut self, _: &[u64]) -> Result<(), StepError> { Ok(()) }
/// #   fn lr(&self) -> f32 { 0.0 }
/// #   fn set_lr(&mut self, _: f32) {}
/// #   fn set_param_groups(&mut self, _: &[ParamGroup]) -> Result<(), StepError> { Ok(()) }
/// #   fn param_groups(&self) -> &[ParamGroup] { &[] }
/// #   fn reset(&mut self) {}
/// #   fn scalar_state(&self) -> Vec<(&'static str, f64)> { Vec::new() }
/// #   fn set_scalar_state(&mut self, _: &[f64]) -> Result<(), StepError> { Ok(()) }
/// }
/// ```
///
/// # Threads and determinism
/// A step cuts its tensors into chunks of [`chunk_len`](Optimizer::chunk_len) elements and runs
/// them on the current rayon pool, so `pool.install(|| opt.step(..))` picks the thread count. The
/// result is bitwise identical for any thread count, chunk length and [`Backend`].
pub trait Optimizer: sealed::Sealed + Send {
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
    /// [`StepError::InvalidConfig`] for an out-of-range hyperparameter; [`StepError::InvalidGroup`] or [`StepError::GroupCount`] for parameter groups that do
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

    /// The settings of later steps: kernels, chunk length, threads, state format and gradient
    /// hygiene ([`Settings`]); always valid.
    ///
    /// ```
    /// use fusedopt::{Optimizer, Settings, Sgd, SgdConfig};
    /// assert_eq!(Sgd::new(SgdConfig::default()).settings(), &Settings::default());
    /// ```
    fn settings(&self) -> &Settings;

    /// Replaces the settings of later steps, checked in full before anything changes (the one
    /// place settings are checked: the per-setting methods such as
    /// [`set_grad_scale`](Optimizer::set_grad_scale) go through it). A chunk length other than 0
    /// is rounded up to a multiple of 16; a new thread count starts the optimizer's pool.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer, StateFormat, StepError};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// opt.set_settings(opt.settings().with_chunk_len(1000).with_threads(2))?;
    /// assert_eq!((opt.settings().chunk_len, opt.threads()), (1008, 2));
    ///
    /// opt.step(&mut [0.0; 4], &[1.0; 4])?; // f32 state from now on
    /// let q8 = opt.settings().with_state_format(StateFormat::Q8).with_threads(1);
    /// assert!(matches!(opt.set_settings(q8), Err(StepError::StateFormat { .. })));
    /// assert_eq!(opt.threads(), 2); // nothing changed
    /// # Ok::<(), StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidSetting`] for a value out of range ([`Settings::validate`]);
    /// [`StepError::StateFormat`] for another state format than that of the state held;
    /// [`StepError::ThreadPool`] if the pool cannot be started. Nothing changes on error.
    fn set_settings(&mut self, settings: Settings) -> Result<(), StepError>;

    /// Chooses the kernels of later steps. All backends give bitwise identical results.
    ///
    /// ```
    /// use fusedopt::{Backend, Optimizer, RmsProp, RmsPropConfig, SimdLevel};
    /// let mut opt = RmsProp::new(RmsPropConfig::default());
    /// opt.set_backend(Backend::Level(SimdLevel::Portable));
    /// assert_eq!(opt.backend().level(), SimdLevel::Portable);
    /// ```
    fn set_backend(&mut self, backend: Backend) {
        let settings = self.settings().with_backend(backend);
        // Only this setting changes, and every value of it is valid: this cannot fail.
        let changed = self.set_settings(settings);
        debug_assert!(changed.is_ok(), "{changed:?}");
    }

    /// The backend set by [`set_backend`](Optimizer::set_backend) ([`Backend::Simd`] by default).
    ///
    /// ```
    /// use fusedopt::{Backend, Optimizer, Sgd, SgdConfig};
    /// assert_eq!(Sgd::new(SgdConfig::default()).backend(), Backend::Simd);
    /// ```
    fn backend(&self) -> Backend {
        self.settings().backend
    }

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
    fn set_chunk_len(&mut self, len: usize) {
        let settings = self.settings().with_chunk_len(len);
        // Only this setting changes, and every value of it is valid: this cannot fail.
        let changed = self.set_settings(settings);
        debug_assert!(changed.is_ok(), "{changed:?}");
    }

    /// The effective chunk length, in elements.
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig, Tuning};
    /// let default = Tuning::installed().chunk_len_for("sgd").unwrap_or(fusedopt::DEFAULT_CHUNK_LEN);
    /// assert_eq!(Sgd::new(SgdConfig::default()).chunk_len(), default);
    /// ```
    fn chunk_len(&self) -> usize {
        chunk_len_for(self.name(), self.settings())
    }

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

    /// The steps each tensor has taken, in layout order; empty before the first step. A tensor
    /// without a gradient in a step ([`step_partial`](OptimizerExt::step_partial),
    /// [`step_feed`](Optimizer::step_feed)) does not count it, and Adam's bias correction uses
    /// the tensor's own count, as `torch.optim` and candle do.
    ///
    /// ```
    /// use fusedopt::{Momentum, MomentumConfig, Optimizer, OptimizerExt};
    /// let mut opt = Momentum::new(MomentumConfig::default());
    /// assert!(opt.tensor_steps().is_empty());
    /// let mut weights = vec![vec![1.0f32; 2], vec![1.0f32; 3]];
    /// opt.step_partial(&mut weights, &[None, Some(vec![1.0f32; 3])])?;
    /// assert_eq!((opt.steps(), opt.tensor_steps()), (1, &[0, 1][..]));
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    fn tensor_steps(&self) -> &[u64];

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
    /// AdaGrad and RMSProp, 2 for Adam (3 with `amsgrad`). A step moves `4·(3 + 2·n)` bytes per
    /// parameter for `n` buffers: it reads weights, gradients and each buffer, and writes
    /// weights and each buffer.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer, Sgd, SgdConfig};
    /// assert_eq!(Sgd::new(SgdConfig::default()).state_buffers(), 0);
    /// assert_eq!(Adam::new(AdamConfig::default()).state_buffers(), 2);
    /// ```
    fn state_buffers(&self) -> usize;

    /// The names of the state buffers the optimizer holds, in order, as state files name them:
    /// `m`, `v` (and `v_max` once AMSGrad has run) for Adam, `v` for Momentum and NAG (the
    /// velocity, or torch's momentum buffer with `MomentumForm::Buffer`), `h` for AdaGrad and
    /// RMSProp, none for SGD. Empty before the first step or [`init_state`](Optimizer::init_state).
    ///
    /// Last comes `master` once the optimizer keeps `f32` master weights (half-precision
    /// weights, [`step_typed`](OptimizerExt::step_typed)): the state-access methods read and write
    /// them under that name, always as `f32`, for the tensors that have them.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer, OptimizerExt, half::bf16};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// assert!(opt.state_names().is_empty());
    /// opt.step(&mut [0.0; 3], &[1.0; 3])?;
    /// assert_eq!(opt.state_names(), ["m", "v"]);
    ///
    /// let mut half = Adam::new(AdamConfig::default());
    /// half.step_typed(&mut [bf16::from_f32(1.5)], &[bf16::ONE])?;
    /// assert_eq!(half.state_names(), ["m", "v", "master"]);
    /// assert_eq!(half.tensor_state("master", 0), Some(&[1.5 - 0.001][..]));
    /// half.write_tensor_state("master", 0, &[2.0])?;
    /// assert_eq!(half.read_tensor_state("master", 0), Some(vec![2.0]));
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    fn state_names(&self) -> Vec<&'static str>;

    /// The bytes of memory the state holds: every state buffer, padding included, and the
    /// `f32` master weights of half-precision weights; 0 before the first step.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// assert_eq!(opt.state_bytes(), 0);
    /// opt.step(&mut [0.0; 1024], &[1.0; 1024])?;
    /// assert_eq!(opt.state_bytes(), 2 * 1024 * 4); // m and v
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    fn state_bytes(&self) -> usize;

    /// Chooses the format of the state buffers, before the first step (or after
    /// [`reset`](Optimizer::reset)): [`StateFormat::F32`] (the default), [`StateFormat::Bf16`]
    /// (half the state memory and bytes moved) or [`StateFormat::Q8`] (a quarter). The update
    /// arithmetic is `f32` in every format; results stay bitwise identical across tiers,
    /// threads and chunk lengths. [`tensor_state`](Optimizer::tensor_state) reads `f32` state
    /// only.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer, StateFormat};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// opt.set_state_format(StateFormat::Q8)?;
    /// let (mut w, g) = (vec![1.0f32; 1024], vec![0.5f32; 1024]);
    /// opt.step(&mut w, &g)?;
    /// assert!(w.iter().all(|&x| (x - 0.999).abs() < 1e-4));
    /// assert_eq!(opt.state_bytes(), 2 * (1024 + 4 * 4)); // a byte per element, a scale per 256
    /// assert!(opt.set_state_format(StateFormat::F32).is_err()); // it holds 8-bit state
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::StateFormat`] if the optimizer holds state in another format; nothing
    /// changes.
    fn set_state_format(&mut self, format: StateFormat) -> Result<(), StepError> {
        self.set_settings(self.settings().with_state_format(format))
    }

    /// The format new state is created in ([`set_state_format`](Optimizer::set_state_format)).
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig, StateFormat};
    /// assert_eq!(Sgd::new(SgdConfig::default()).state_format(), StateFormat::F32);
    /// ```
    fn state_format(&self) -> StateFormat {
        self.settings().state_format
    }

    /// Tensor `tensor`'s values in the state buffer called `buffer` (see
    /// [`state_names`](Optimizer::state_names)), or `None` if the optimizer holds no such
    /// buffer or tensor. Read it to export the state to another framework.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// opt.step(&mut [0.0; 2], &[1.0; 2])?;
    /// let m = opt.tensor_state("m", 0).unwrap(); // (1 - β1) · g
    /// assert!(m.len() == 2 && m.iter().all(|&x| (x - 0.1).abs() < 1e-6));
    /// assert_eq!(opt.tensor_state("m", 1), None);
    /// assert_eq!(opt.tensor_state("h", 0), None);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    fn tensor_state(&self, buffer: &str, tensor: usize) -> Option<&[f32]>;

    /// [`tensor_state`](Optimizer::tensor_state), to write: import state from another
    /// framework after [`init_state`](Optimizer::init_state), then set the step counts with
    /// [`set_tensor_steps`](Optimizer::set_tensor_steps).
    ///
    /// ```
    /// use fusedopt::{Momentum, MomentumConfig, Optimizer};
    /// let mut opt = Momentum::new(MomentumConfig::default());
    /// opt.init_state(&[2])?;
    /// opt.tensor_state_mut("v", 0).unwrap().copy_from_slice(&[-1.0, 1.0]);
    /// let mut w = [0.0f32; 2];
    /// opt.step(&mut w, &[0.0; 2])?; // v = 0.9 v - lr g; w += v
    /// assert_eq!(w, [-0.9, 0.9]);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    fn tensor_state_mut(&mut self, buffer: &str, tensor: usize) -> Option<&mut [f32]>;

    /// Tensor `tensor`'s values in state buffer `buffer` as `f32`, in every
    /// [`StateFormat`] (decoded from bf16 or 8-bit state; a copy), or `None` if the optimizer
    /// holds no such buffer or tensor.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer, StateFormat};
    /// let (mut q8, mut plain) = (Adam::new(AdamConfig::default()), Adam::new(AdamConfig::default()));
    /// q8.set_state_format(StateFormat::Q8)?;
    /// for opt in [&mut q8, &mut plain] {
    ///     opt.step(&mut [0.0; 3], &[1.0, -2.0, 0.5])?;
    /// }
    /// // m = 0.1·g: a half and a quarter of the block's largest value, exact on the 8-bit map.
    /// assert_eq!(q8.read_tensor_state("m", 0), plain.read_tensor_state("m", 0));
    /// assert_eq!(q8.read_tensor_state("m", 1), None);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    fn read_tensor_state(&self, buffer: &str, tensor: usize) -> Option<Vec<f32>>;

    /// Sets tensor `tensor`'s values in state buffer `buffer` from `f32`, encoded in the
    /// optimizer's [`StateFormat`] (bf16 rounded to nearest, 8-bit quantized block by block):
    /// [`tensor_state_mut`](Optimizer::tensor_state_mut) for every format.
    ///
    /// ```
    /// use fusedopt::{Momentum, MomentumConfig, Optimizer, StateFormat};
    /// let mut opt = Momentum::new(MomentumConfig::default());
    /// opt.set_state_format(StateFormat::Bf16)?;
    /// opt.init_state(&[2])?;
    /// opt.write_tensor_state("v", 0, &[-1.0, 0.5])?;
    /// assert_eq!(opt.read_tensor_state("v", 0).unwrap(), [-1.0, 0.5]);
    /// assert!(opt.write_tensor_state("v", 0, &[1.0]).is_err());
    /// assert!(opt.write_tensor_state("m", 0, &[1.0, 1.0]).is_err());
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::NoState`] if the optimizer holds no such buffer or tensor,
    /// [`StepError::TensorLen`] if `values` has another length; nothing changes then.
    fn write_tensor_state(
        &mut self,
        buffer: &str,
        tensor: usize,
        values: &[f32],
    ) -> Result<(), StepError>;

    /// Creates the state a first step over tensors of lengths `lens` would create (the layout,
    /// and zeroed buffers, every tensor at step 0) without stepping, so that state from
    /// elsewhere can be written into it. Buffers already held for this layout are kept.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// opt.init_state(&[3, 5])?;
    /// assert_eq!((opt.layout(), opt.steps()), (Some(&[3, 5][..]), 0));
    /// assert_eq!(opt.tensor_state("v", 1), Some(&[0.0f32; 5][..]));
    /// assert!(opt.init_state(&[3, 4]).is_err()); // it holds state for [3, 5]
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::TensorCount`] or [`StepError::TensorLen`] if the optimizer holds state for
    /// another layout; [`StepError::GroupCount`] or [`StepError::NameCount`] if parameter groups
    /// or names were set for another tensor count; [`StepError::OutOfMemory`]. Nothing changes
    /// on error.
    fn init_state(&mut self, lens: &[usize]) -> Result<(), StepError>;

    /// Sets each tensor's step count, for state imported from elsewhere; the optimizer's
    /// [`steps`](Optimizer::steps) becomes the largest. Adam's bias correction uses each
    /// tensor's count.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// opt.init_state(&[1, 1])?;
    /// opt.set_tensor_steps(&[4, 7])?;
    /// assert_eq!((opt.tensor_steps(), opt.steps()), (&[4, 7][..], 7));
    /// assert!(opt.set_tensor_steps(&[1]).is_err());
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::TensorCount`] unless `steps` has one count per tensor of the layout (none
    /// before the state exists); nothing changes on error.
    fn set_tensor_steps(&mut self, steps: &[u64]) -> Result<(), StepError>;

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

    /// Names the tensors, in layout order (an empty slice removes the names). Names are saved in
    /// state files, and [`load_state`](Optimizer::load_state) refuses a file whose names differ,
    /// so a restart that lists the tensors in another order cannot load one tensor's state into
    /// another of the same length. Like parameter groups, names are settings:
    /// [`reset`](Optimizer::reset) keeps them.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer, StepError};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// opt.set_tensor_names(&["fc.weight", "fc.bias"])?;
    /// assert_eq!(opt.tensor_names(), ["fc.weight", "fc.bias"]);
    /// let err = opt.set_tensor_names(&["a", "a"]).unwrap_err();
    /// assert!(matches!(err, StepError::InvalidName { tensor: 1, .. }), "{err}");
    /// # Ok::<(), StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidName`] for an empty name, one holding a comma or a line break, or one
    /// given twice; [`StepError::NameCount`] if the optimizer already holds state for another
    /// number of tensors. Steps with another number of tensors than names are refused with
    /// [`StepError::NameCount`]. On error the previous names stay.
    fn set_tensor_names(&mut self, names: &[&str]) -> Result<(), StepError>;

    /// The names set by [`set_tensor_names`](Optimizer::set_tensor_names) or loaded from a state
    /// file; empty when none are set.
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig};
    /// assert!(Sgd::new(SgdConfig::default()).tensor_names().is_empty());
    /// ```
    fn tensor_names(&self) -> &[String];

    /// Runs later steps on a pool of `threads` threads that the optimizer owns (`0`, the
    /// default: on the caller's rayon pool). A trainer then need not wrap each step in
    /// `pool.install`, which costs a hand-over to the pool on every call: a step that fits in
    /// one chunk runs on the calling thread, and only larger ones enter the pool.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// opt.set_threads(2)?;
    /// assert_eq!(opt.threads(), 2);
    /// opt.step(&mut vec![0.0f32; 1 << 18], &vec![1.0f32; 1 << 18])?; // four chunks, two threads
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::ThreadPool`] if the pool cannot be started; the previous setting stays.
    fn set_threads(&mut self, threads: usize) -> Result<(), StepError> {
        self.set_settings(self.settings().with_threads(threads))
    }

    /// The thread count set by [`set_threads`](Optimizer::set_threads); 0 for the caller's pool.
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig};
    /// assert_eq!(Sgd::new(SgdConfig::default()).threads(), 0);
    /// ```
    fn threads(&self) -> usize {
        self.settings().threads
    }

    /// Applies one update to a model whose tensors `feed` lends one at a time (see
    /// [`TensorFeed`]), with bitwise the results of [`step_many`](Optimizer::step_many) over the
    /// same tensors, every option and gradient hygiene included. A tensor without a gradient is
    /// left alone, as in [`step_partial`](OptimizerExt::step_partial).
    ///
    /// Every gradient is read once before any tensor is updated: that checks every length
    /// (nothing changes on a mismatch), and, when clipping or the non-finite check is on, takes
    /// the global norm in the same fixed slices as `step_many` (each tensor's slice sums are
    /// kept, then added in order), so the norm and the clipping coefficient have the same bits.
    /// Then each tensor is lent once more and updated. Both phases run tasks of small tensors on
    /// the pool, and split a tensor larger than a chunk across threads inside its call. The stack
    /// depth does not grow with the number of tensors, and after the first step nothing is
    /// allocated.
    ///
    /// See [`TensorFeed`] for an example.
    ///
    /// # Errors
    /// As [`step_many`](Optimizer::step_many), and [`StepError::Feed`] when the feed fails or
    /// lends a tensor of another length than it announced. Errors found while reading the
    /// gradients modify nothing. An error while updating cannot undo the tensors already updated
    /// (they keep their update and count the step); the others are left alone.
    fn step_feed(&mut self, feed: &dyn TensorFeed) -> Result<StepReport, StepError>;

    /// Sets the loss scale of later steps (default 1): the kernels divide every gradient by it as
    /// they read it, so a mixed-precision trainer passes its scaled gradients unchanged. A
    /// power-of-two scale (what dynamic loss scalers use) is applied as an exact multiplication by
    /// its reciprocal, which gives the same bits as the division. Shorthand for
    /// [`set_settings`](Optimizer::set_settings) with [`Settings::with_grad_scale`].
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig};
    /// let mut opt = Sgd::new(SgdConfig { lr: 1.0, ..Default::default() });
    /// opt.set_grad_scale(1024.0)?;
    /// let mut w = [1.0f32];
    /// opt.step(&mut w, &[512.0])?; // the true gradient is 0.5
    /// assert_eq!(w, [0.5]);
    /// assert!(opt.set_grad_scale(0.0).is_err());
    /// assert_eq!(opt.grad_scale(), 1024.0);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidSetting`] unless `scale` is finite and `> 0`; nothing changes then.
    fn set_grad_scale(&mut self, scale: f32) -> Result<(), StepError> {
        self.set_settings(self.settings().with_grad_scale(scale))
    }

    /// The loss scale set by [`set_grad_scale`](Optimizer::set_grad_scale) (1 by default).
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// assert_eq!(Adam::new(AdamConfig::default()).grad_scale(), 1.0);
    /// ```
    fn grad_scale(&self) -> f32 {
        self.settings().grad_scale
    }

    /// Clips later steps by global norm (`None`, the default, does not clip): the L2 norm of all
    /// gradients of the call (`step` or `step_many`), taken on unscaled gradients, gives the
    /// coefficient `min(1, max / (norm + 1e-6))` of `torch.nn.utils.clip_grad_norm_`, applied
    /// inside the update kernel. The norm costs one extra read of the gradients; its sum runs in
    /// a fixed order, so its bits do not depend on threads or chunk length. `0` zeroes every
    /// update, as torch's does. Shorthand for [`set_settings`](Optimizer::set_settings) with
    /// [`Settings::with_max_grad_norm`].
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig};
    /// let mut opt = Sgd::new(SgdConfig { lr: 1.0, ..Default::default() });
    /// opt.set_max_grad_norm(Some(1.0))?;
    /// let mut w = [0.0f32; 2];
    /// let report = opt.step(&mut w, &[3.0, 4.0])?; // norm 5: scaled to norm 1
    /// assert_eq!(report.grad_norm, Some(5.0));
    /// assert!((w[0] + 0.6).abs() < 1e-6 && (w[1] + 0.8).abs() < 1e-6);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidSetting`] unless `max` is `None` or finite and `>= 0`; nothing
    /// changes then.
    fn set_max_grad_norm(&mut self, max: Option<f32>) -> Result<(), StepError> {
        self.set_settings(self.settings().with_max_grad_norm(max))
    }

    /// The clipping norm set by [`set_max_grad_norm`](Optimizer::set_max_grad_norm).
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// assert_eq!(Adam::new(AdamConfig::default()).max_grad_norm(), None);
    /// ```
    fn max_grad_norm(&self) -> Option<f32> {
        self.settings().max_grad_norm
    }

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
    fn set_non_finite(&mut self, policy: NonFinite) {
        let settings = self.settings().with_non_finite(policy);
        // Only this setting changes, and every value of it is valid: this cannot fail.
        let changed = self.set_settings(settings);
        debug_assert!(changed.is_ok(), "{changed:?}");
    }

    /// The policy set by [`set_non_finite`](Optimizer::set_non_finite).
    ///
    /// ```
    /// use fusedopt::{NonFinite, Optimizer, Sgd, SgdConfig};
    /// assert_eq!(Sgd::new(SgdConfig::default()).non_finite(), NonFinite::Propagate);
    /// ```
    fn non_finite(&self) -> NonFinite {
        self.settings().non_finite
    }

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
    fn save_state(&self, path: &Path) -> Result<(), StateError> {
        self.save_to(Some(path)).map(drop)
    }

    /// The bytes of the state file [`save_state`](Optimizer::save_state) writes, for a caller
    /// that keeps or sends state itself (Python's `copy` and `pickle`).
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// opt.step(&mut [1.0f32; 3], &[0.5; 3])?;
    /// let bytes = opt.save_state_bytes()?;
    /// let mut copy = Adam::new(AdamConfig::default());
    /// copy.load_state_bytes(&bytes)?;
    /// assert_eq!((copy.steps(), copy.tensor_state("m", 0)), (1, opt.tensor_state("m", 0)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`StateError::Io`] if the state cannot be serialized.
    fn save_state_bytes(&self) -> Result<Vec<u8>, StateError> {
        self.save_to(None).map(Option::unwrap_or_default)
    }

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
    fn load_state(&mut self, path: &Path) -> Result<(), StateError> {
        self.load_from(path, &checkpoint::read(path)?)
    }

    /// [`load_state`](Optimizer::load_state) from the bytes of a state file
    /// ([`save_state_bytes`](Optimizer::save_state_bytes)); errors name the source
    /// `<state bytes>`.
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig};
    /// let mut opt = Sgd::new(SgdConfig::default());
    /// assert!(opt.load_state_bytes(b"not a state file").is_err());
    /// ```
    ///
    /// # Errors
    /// As [`load_state`](Optimizer::load_state), but for [`StateError::Io`].
    fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        self.load_from(Path::new(checkpoint::IN_MEMORY), bytes)
    }

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

    /// Moves the weights to the point to evaluate the model at, for the optimizers that keep
    /// one apart from the point gradients are taken at: the schedule-free ones
    /// ([`ScheduleFreeAdamW`](crate::ScheduleFreeAdamW), [`ScheduleFreeSgd`](crate::ScheduleFreeSgd)),
    /// whose `eval()` sets the weights `y` to the average `x`. Call it before evaluating or
    /// saving a model; [`train`](Optimizer::train) moves them back. Steps are refused
    /// ([`StepError::EvalMode`]) until then. Does nothing when the weights are there already,
    /// and for every other optimizer (whose two points are one); before the first step every
    /// tensor is at both points. `weights` are the tensors the steps update, in their order.
    ///
    /// ```
    /// use fusedopt::{Optimizer, ScheduleFreeSgd, ScheduleFreeSgdConfig, StepError};
    /// let mut opt = ScheduleFreeSgd::new(ScheduleFreeSgdConfig { lr: 0.5, ..Default::default() });
    /// let mut w = [1.0f32, 2.0];
    /// opt.step(&mut w, &[1.0, -1.0])?; // the first step sets x = y = z
    /// opt.step(&mut w, &[1.0, -1.0])?;
    /// let y = w;
    /// opt.eval(&mut [&mut w])?;
    /// assert!(opt.is_eval() && w != y); // x, the average, differs from y
    /// assert!(matches!(opt.step(&mut w, &[1.0, 1.0]), Err(StepError::EvalMode { .. })));
    /// opt.train(&mut [&mut w])?;
    /// assert!((w[0] - y[0]).abs() < 1e-6 && (w[1] - y[1]).abs() < 1e-6);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::TensorCount`] or [`StepError::TensorLen`] if `weights` are not the tensors
    /// of the layout; nothing is modified then.
    fn eval(&mut self, weights: &mut [&mut [f32]]) -> Result<(), StepError> {
        self.shift_weights(weights, true)
    }

    /// Moves the weights back to the point gradients are taken at (schedule-free's `y`) after
    /// [`eval`](Optimizer::eval); does nothing when they are there already, and for the
    /// optimizers without a separate evaluation point.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// let mut w = [1.0f32];
    /// opt.step(&mut w, &[1.0])?;
    /// let before = w;
    /// opt.eval(&mut [&mut w])?; // Adam has one point: nothing moves
    /// opt.train(&mut [&mut w])?;
    /// assert_eq!((w, opt.is_eval()), (before, false));
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// As [`eval`](Optimizer::eval).
    fn train(&mut self, weights: &mut [&mut [f32]]) -> Result<(), StepError> {
        self.shift_weights(weights, false)
    }

    /// Whether the weights were left at the evaluation point by [`eval`](Optimizer::eval)
    /// (always `false` for optimizers without one).
    ///
    /// ```
    /// use fusedopt::{Optimizer, ScheduleFreeAdamW, ScheduleFreeAdamWConfig};
    /// let mut opt = ScheduleFreeAdamW::new(ScheduleFreeAdamWConfig::default());
    /// assert!(!opt.is_eval());
    /// opt.eval(&mut [])?; // before the first step, nothing to move
    /// assert!(opt.is_eval());
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    fn is_eval(&self) -> bool {
        self.eval_mode()
    }

    /// Records where the weights are (`eval`: at the evaluation point) without moving them,
    /// for a state restored next to weights saved apart from it (a torch state dict saved in
    /// eval mode, with the model's weights in their own file). Does nothing for optimizers
    /// without an evaluation point.
    ///
    /// ```
    /// use fusedopt::{Optimizer, ScheduleFreeSgd, ScheduleFreeSgdConfig};
    /// let mut opt = ScheduleFreeSgd::new(ScheduleFreeSgdConfig::default());
    /// opt.step(&mut [1.0], &[1.0])?;
    /// opt.set_eval_mode(true);
    /// assert!(opt.is_eval());
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    fn set_eval_mode(&mut self, eval: bool) {
        self.record_mode(eval);
    }

    /// The optimizer's state besides its buffers and per-tensor step counts: values the rule
    /// keeps for the whole optimizer, by name (the schedule-free rules' `k`, the steps of their
    /// averaging, `lr_max`, the largest learning rate so far, and `weight_sum`, the sum of the
    /// averaging weights, as the reference keeps them per parameter group; none for the
    /// others).
    /// With [`set_scalar_state`](Optimizer::set_scalar_state), what it takes to move a state
    /// into another optimizer (as [`tensor_state`](Optimizer::tensor_state) does for buffers).
    ///
    /// ```
    /// use fusedopt::{Optimizer, ScheduleFreeSgd, ScheduleFreeSgdConfig};
    /// let mut opt = ScheduleFreeSgd::new(ScheduleFreeSgdConfig { lr: 0.5, ..Default::default() });
    /// opt.step(&mut [1.0], &[1.0])?;
    /// opt.step(&mut [1.0], &[1.0])?;
    /// // Two steps, each of weight 0.5²:
    /// assert_eq!(opt.scalar_state(), [("k", 2.0), ("lr_max", 0.5), ("weight_sum", 0.5)]);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    fn scalar_state(&self) -> Vec<(&'static str, f64)>;

    /// Sets the values of [`scalar_state`](Optimizer::scalar_state), one per name in its
    /// order.
    ///
    /// ```
    /// use fusedopt::{Optimizer, ScheduleFreeAdamW, ScheduleFreeAdamWConfig};
    /// let mut opt = ScheduleFreeAdamW::new(ScheduleFreeAdamWConfig::default());
    /// opt.set_scalar_state(&[3.0, 0.01, 0.25])?;
    /// assert_eq!(opt.scalar_state(), [("k", 3.0), ("lr_max", 0.01), ("weight_sum", 0.25)]);
    /// assert!(opt.set_scalar_state(&[0.01]).is_err());
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidSetting`] unless there is one value per name, each finite, `>= 0`
    /// and whole (counts are kept as `f64`, exact to 2⁵³); nothing changes then.
    fn set_scalar_state(&mut self, values: &[f64]) -> Result<(), StepError>;
}

pub(crate) mod sealed {
    use super::*;

    /// Keeps [`Optimizer`] implemented by this crate alone, and carries what `dyn Optimizer`
    /// needs.
    pub trait Sealed {
        /// One step over the tensors of `source`: [`step_all`](OptimizerExt::step_all).
        fn step_source(&mut self, source: &mut dyn TensorSource) -> Result<StepReport, StepError>;
        /// The rule's configuration (`R` of `Fused<R>`), for `OptimizerConfig` to read.
        fn rule_config(&self) -> &dyn Any;
        /// The rule's configuration, for `OptimizerConfig` to replace.
        fn rule_config_mut(&mut self) -> &mut dyn Any;
        /// Writes the state file to `path`, or returns its bytes when `path` is `None`.
        fn save_to(&self, path: Option<&Path>) -> Result<Option<Vec<u8>>, StateError>;
        /// Loads the state file `bytes`, read from `path` (for errors).
        fn load_from(&mut self, path: &Path, bytes: &[u8]) -> Result<(), StateError>;
        /// [`Optimizer::eval`] (`eval`) and [`Optimizer::train`].
        fn shift_weights(
            &mut self,
            weights: &mut [&mut [f32]],
            eval: bool,
        ) -> Result<(), StepError>;
        /// [`Optimizer::is_eval`].
        fn eval_mode(&self) -> bool;
        /// [`Optimizer::set_eval_mode`].
        fn record_mode(&mut self, eval: bool);
    }
}

impl<R: Rule> sealed::Sealed for Fused<R> {
    fn step_source(&mut self, source: &mut dyn TensorSource) -> Result<StepReport, StepError> {
        Fused::step_source(self, source)
    }
    fn rule_config(&self) -> &dyn Any {
        &self.config
    }
    fn rule_config_mut(&mut self) -> &mut dyn Any {
        &mut self.config
    }
    fn save_to(&self, path: Option<&Path>) -> Result<Option<Vec<u8>>, StateError> {
        let engine = &self.engine;
        let parts = (&self.config, engine.state(), engine.param_groups());
        let names = engine.tensor_names();
        match path {
            Some(path) => checkpoint::save(path, parts.0, parts.1, parts.2, names).map(|()| None),
            None => checkpoint::save_bytes(parts.0, parts.1, parts.2, names).map(Some),
        }
    }
    fn shift_weights(&mut self, weights: &mut [&mut [f32]], eval: bool) -> Result<(), StepError> {
        self.shift(weights, eval)
    }
    fn eval_mode(&self) -> bool {
        self.engine.is_eval()
    }
    fn record_mode(&mut self, eval: bool) {
        if self.config.eval_shift().is_some() {
            self.engine.set_eval(eval);
        }
    }
    fn load_from(&mut self, path: &Path, bytes: &[u8]) -> Result<(), StateError> {
        let engine = &self.engine;
        let format = engine.settings().state_format;
        let (layout, names) = (engine.layout(), engine.tensor_names());
        let loaded = checkpoint::load::<R>(path, bytes, layout, names, format)?;
        // Everything is checked: apply.
        self.config = loaded.config;
        self.engine
            .restore(loaded.state, &loaded.groups, loaded.names);
        Ok(())
    }
}

impl<R: Rule> Optimizer for Fused<R> {
    fn name(&self) -> &'static str {
        R::NAME
    }
    fn scalar_state(&self) -> Vec<(&'static str, f64)> {
        R::SUMS
            .iter()
            .copied()
            .zip(self.engine.state().sums)
            .collect()
    }
    fn set_scalar_state(&mut self, values: &[f64]) -> Result<(), StepError> {
        let whole = |i: usize, v: f64| R::SUMS.get(i) != Some(&"k") || v.fract() == 0.0;
        let bad = (0..values.len())
            .find(|&i| !(values[i].is_finite() && values[i] >= 0.0 && whole(i, values[i])))
            .map(|i| &values[i]);
        if values.len() != R::SUMS.len() || bad.is_some() {
            return Err(StepError::InvalidSetting {
                field: "scalar_state",
                value: bad.map_or(values.len() as f32, |&v| v as f32),
                expected: "one value per name of scalar_state(), each finite and >= 0 (k whole)",
            });
        }
        self.engine.sums_mut()[..values.len()].copy_from_slice(values);
        Ok(())
    }
    fn settings(&self) -> &Settings {
        self.engine.settings()
    }
    fn set_settings(&mut self, settings: Settings) -> Result<(), StepError> {
        self.engine.set_settings(settings)
    }
    fn step_many(&mut self, params: &mut [(&mut [f32], &[f32])]) -> Result<StepReport, StepError> {
        self.step_source(&mut Pairs(params))
    }
    fn steps(&self) -> u64 {
        self.engine.state().steps
    }
    fn layout(&self) -> Option<&[usize]> {
        self.engine.layout()
    }
    fn tensor_steps(&self) -> &[u64] {
        self.engine.tensor_steps()
    }
    fn set_tensor_names(&mut self, names: &[&str]) -> Result<(), StepError> {
        self.engine.set_tensor_names(names)
    }
    fn tensor_names(&self) -> &[String] {
        self.engine.tensor_names()
    }
    fn step_feed(&mut self, feed: &dyn TensorFeed) -> Result<StepReport, StepError> {
        self.step_fed(feed)
    }
    fn state_buffers(&self) -> usize {
        self.config.state_buffers()
    }
    fn state_names(&self) -> Vec<&'static str> {
        let held = self.engine.state().buffers.len().min(R::BUFFERS.len());
        let mut names: Vec<_> = R::BUFFERS[..held].iter().map(|b| b.name).collect();
        if self.engine.state().master.is_some() {
            names.push(MASTER);
        }
        names
    }
    fn state_bytes(&self) -> usize {
        let state = self.engine.state();
        let master = state.master.as_ref().map_or(0, |m| m.len());
        let words: usize = state.buffers.iter().map(|b| b.len()).sum();
        (words + master) * size_of::<f32>()
    }
    fn tensor_state(&self, buffer: &str, tensor: usize) -> Option<&[f32]> {
        if buffer == MASTER {
            return self.engine.master_slice(tensor);
        }
        let b = R::BUFFERS.iter().position(|b| b.name == buffer)?;
        self.engine.state_slice(b, tensor)
    }
    fn tensor_state_mut(&mut self, buffer: &str, tensor: usize) -> Option<&mut [f32]> {
        if buffer == MASTER {
            return self.engine.master_slice_mut(tensor);
        }
        let b = R::BUFFERS.iter().position(|b| b.name == buffer)?;
        self.engine.state_slice_mut(b, tensor)
    }
    fn init_state(&mut self, lens: &[usize]) -> Result<(), StepError> {
        self.create_state(lens)
    }
    fn read_tensor_state(&self, buffer: &str, tensor: usize) -> Option<Vec<f32>> {
        if buffer == MASTER {
            return self.engine.master_slice(tensor).map(<[f32]>::to_vec);
        }
        let b = R::BUFFERS.iter().position(|b| b.name == buffer)?;
        self.engine.read_state(b, tensor)
    }
    fn write_tensor_state(
        &mut self,
        buffer: &str,
        tensor: usize,
        values: &[f32],
    ) -> Result<(), StepError> {
        if buffer == MASTER {
            return self.engine.write_master(tensor, values, R::BUFFERS.len());
        }
        let b = R::BUFFERS
            .iter()
            .position(|b| b.name == buffer)
            .unwrap_or(R::BUFFERS.len());
        self.engine.write_state(b, tensor, values)
    }
    fn set_tensor_steps(&mut self, steps: &[u64]) -> Result<(), StepError> {
        self.engine.set_tensor_steps(steps)
    }
    fn lr(&self) -> f32 {
        self.config.lr()
    }
    fn set_lr(&mut self, lr: f32) {
        *self.config.lr_mut() = lr;
    }
    fn set_param_groups(&mut self, groups: &[ParamGroup]) -> Result<(), StepError> {
        self.engine.set_param_groups(groups)
    }
    fn param_groups(&self) -> &[ParamGroup] {
        self.engine.param_groups()
    }
    fn reset(&mut self) {
        self.engine.reset();
    }
}

/// The steps over a whole model held as lists, for every [`Optimizer`] (a blanket
/// implementation: [`Fused`] and `dyn Optimizer` alike). Its methods are generic over how the
/// caller holds its tensors (`Vec<f32>`, `Box<[f32]>`, `&mut [f32]` and `&[f32]`, ...) and their
/// element types, so they cannot be methods of the object-safe [`Optimizer`] itself. Bring it
/// into scope with `use fusedopt::OptimizerExt` (or `use fusedopt::prelude::*`).
///
/// ```
/// use fusedopt::{Optimizer, OptimizerConfig, OptimizerExt};
/// let mut opt: Box<dyn Optimizer> = "momentum:lr=0.1".parse::<OptimizerConfig>()?.build();
/// let mut weights = vec![vec![1.0f32; 4], vec![2.0f32; 2]];
/// let grads = vec![vec![1.0f32; 4], vec![1.0f32; 2]];
/// opt.step_all(&mut weights, &grads)?;
/// assert_eq!(weights, [vec![0.9f32; 4], vec![1.9f32; 2]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait OptimizerExt: Optimizer {
    /// Applies one update to a whole model held as two lists, weights and gradients, in one
    /// parallel dispatch: bitwise the same as [`step_many`](Optimizer::step_many) over their
    /// pairs. After the first call, a call allocates nothing (with up to 32 distinct
    /// [parameter groups](Optimizer::set_param_groups)).
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, OptimizerExt};
    /// let mut weights = vec![vec![1.0f32; 3], vec![1.0f32; 5]];
    /// let grads = vec![vec![0.5f32; 3], vec![-0.5f32; 5]];
    /// let mut opt = Adam::new(AdamConfig::default());
    /// opt.step_all(&mut weights, &grads)?;
    /// assert!(weights[0][0] < 1.0 && weights[1][0] > 1.0);
    ///
    /// // A missing gradient is refused, and nothing changes.
    /// let before = weights.clone();
    /// assert!(opt.step_all(&mut weights, &grads[..1]).is_err());
    /// assert_eq!(weights, before);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::GradCount`] if `grads` holds another number of tensors than `weights`; then
    /// as [`step_many`](Optimizer::step_many). On error no tensor and no state is modified.
    fn step_all<W: AsMut<[f32]>, G: AsRef<[f32]>>(
        &mut self,
        weights: &mut [W],
        grads: &[G],
    ) -> Result<StepReport, StepError> {
        self.step_source(&mut Lists { weights, grads })
    }

    /// Like [`step_all`](OptimizerExt::step_all), where a tensor whose gradient is `None` has
    /// none this step: its weights and state are left alone and it does not count the step (it
    /// keeps its own step count, [`tensor_steps`](Optimizer::tensor_steps), which Adam's bias
    /// correction uses). Bitwise the same as stepping the other tensors alone.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer, OptimizerExt};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// let mut weights = vec![vec![1.0f32; 3], vec![1.0f32; 2]];
    /// opt.step_partial(&mut weights, &[Some(vec![0.5f32; 3]), None])?;
    /// opt.step_partial(&mut weights, &[Some(vec![0.5f32; 3]), Some(vec![0.5f32; 2])])?;
    /// assert_eq!(opt.tensor_steps(), [2, 1]); // the second tensor's first step used t = 1
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// As [`step_all`](OptimizerExt::step_all).
    fn step_partial<W: AsMut<[f32]>, G: AsRef<[f32]>>(
        &mut self,
        weights: &mut [W],
        grads: &[Option<G>],
    ) -> Result<StepReport, StepError> {
        self.step_source(&mut PartialLists { weights, grads })
    }

    /// [`step`](Optimizer::step) with weights and gradients of any [`Element`] type:
    /// bfloat16 or half-precision gradients are read as their exact `f32` values (bitwise the
    /// step over `f32` copies of them). Half-precision weights are *master-weight* training: the
    /// optimizer keeps an `f32` copy of them in its state (taken from them at the tensor's first
    /// half-precision step, and again after a step with `f32` weights), updates it, and writes it
    /// back rounded to nearest even, in the same pass.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, OptimizerExt, half::bf16};
    /// let mut opt = Adam::new(AdamConfig { lr: 1e-4, ..AdamConfig::default() });
    /// let mut w = vec![bf16::from_f32(1.0); 4];
    /// let g = vec![bf16::from_f32(0.5); 4];
    /// for _ in 0..3 {
    ///     opt.step_typed(&mut w, &g)?;
    /// }
    /// // Each step moves the master weights by 1e-4, far below a bf16 ulp under 1.0 (2^-8): the
    /// // bf16 weights round back to 1.0 while the master weights keep every step.
    /// assert_eq!(w[0], bf16::from_f32(1.0));
    /// for _ in 0..27 {
    ///     opt.step_typed(&mut w, &g)?;
    /// }
    /// assert_eq!(w[0], bf16::from_f32(0.99609375)); // 1 - 3e-3, rounded to a bf16
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// As [`step`](Optimizer::step).
    fn step_typed<E: Element, F: Element>(
        &mut self,
        weights: &mut [E],
        grads: &[F],
    ) -> Result<StepReport, StepError> {
        self.step_all_typed(&mut [weights], &[grads])
    }

    /// [`step_all`](OptimizerExt::step_all) with weights and gradients of any [`Element`] type
    /// (see [`step_typed`](OptimizerExt::step_typed)).
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, OptimizerExt, half::f16};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// let mut weights = vec![vec![1.0f32; 3], vec![1.0f32; 5]];
    /// let grads = vec![vec![f16::from_f32(0.5); 3], vec![f16::from_f32(-0.5); 5]];
    /// opt.step_all_typed(&mut weights, &grads)?;
    /// assert!(weights[0][0] < 1.0 && weights[1][0] > 1.0);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// As [`step_all`](OptimizerExt::step_all).
    fn step_all_typed<E: Element, F: Element, W: AsMut<[E]>, G: AsRef<[F]>>(
        &mut self,
        weights: &mut [W],
        grads: &[G],
    ) -> Result<StepReport, StepError> {
        let types = PhantomData;
        self.step_source(&mut TypedLists {
            weights,
            grads,
            types,
        })
    }

    /// [`step_partial`](OptimizerExt::step_partial) with weights and gradients of any
    /// [`Element`] type (see [`step_typed`](OptimizerExt::step_typed)).
    ///
    /// ```
    /// use fusedopt::{OptimizerExt, Sgd, SgdConfig, half::bf16};
    /// let mut opt = Sgd::new(SgdConfig { lr: 0.5, ..SgdConfig::default() });
    /// let mut weights = vec![vec![bf16::ONE; 2], vec![bf16::ONE; 2]];
    /// opt.step_partial_typed(&mut weights, &[None, Some(vec![bf16::ONE; 2])])?;
    /// assert_eq!(weights[1], [bf16::from_f32(0.5); 2]);
    /// assert_eq!(weights[0], [bf16::ONE; 2]);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// As [`step_all`](OptimizerExt::step_all).
    fn step_partial_typed<E: Element, F: Element, W: AsMut<[E]>, G: AsRef<[F]>>(
        &mut self,
        weights: &mut [W],
        grads: &[Option<G>],
    ) -> Result<StepReport, StepError> {
        let types = PhantomData;
        self.step_source(&mut TypedPartialLists {
            weights,
            grads,
            types,
        })
    }
}

impl<O: Optimizer + ?Sized> OptimizerExt for O {}
