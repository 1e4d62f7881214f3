//! The six update rules, one file each (Momentum and NAG share one), and [`Fused`], the one
//! optimizer type they are applied through. Imports [`crate::engine`], [`crate::simd`] and
//! [`crate::types`].
//!
//! An optimizer file holds a configuration type (its hyperparameters, defaults and range
//! checks), the per-step scalars and the element-wise kernel written once over
//! [`Lane`](crate::simd::Lane), the [`Rule`] implementation that ties them to the engine, and unit
//! tests. Everything else (validation of the input, state, groups, hygiene, threads) is the
//! engine's.

pub mod adagrad;
pub mod adam;
pub mod momentum;
pub mod rmsprop;
pub mod sgd;

use crate::engine::{
    Engine, FeedStep, ListStep, Lists, PartialLists, StepRunner, TensorFeed, TensorSource,
    TypedLists, TypedPartialLists,
};
use crate::types::{Element, StepError, StepReport};
use core::fmt::Debug;
use core::marker::PhantomData;

/// An optimizer's update rule, implemented by its configuration type: [`SgdConfig`],
/// [`MomentumConfig`], [`NagConfig`], [`AdaGradConfig`], [`RmsPropConfig`] and [`AdamConfig`].
///
/// The trait is sealed: the engine relies on what a rule tells it, so only this crate implements
/// it. Use it as a bound, to write code generic over the optimizers:
///
/// ```
/// use fusedopt::{Fused, Optimizer, Rule, Sgd, SgdConfig};
/// fn lr_of<R: Rule>(opt: &Fused<R>) -> f32 {
///     opt.lr()
/// }
/// assert_eq!(lr_of(&Sgd::new(SgdConfig::default())), 0.01);
/// ```
///
/// [`SgdConfig`]: crate::SgdConfig
/// [`MomentumConfig`]: crate::MomentumConfig
/// [`NagConfig`]: crate::NagConfig
/// [`AdaGradConfig`]: crate::AdaGradConfig
/// [`RmsPropConfig`]: crate::RmsPropConfig
/// [`AdamConfig`]: crate::AdamConfig
pub trait Rule: sealed::RuleImpl {}

impl<R: sealed::RuleImpl> Rule for R {}

pub(crate) mod sealed {
    use super::*;

    /// What an optimizer file provides; the engine and [`Fused`] do the rest.
    pub trait RuleImpl: Copy + Debug + Default + PartialEq + Send + Sync + 'static {
        /// See [`Optimizer::name`](crate::Optimizer::name).
        const NAME: &'static str;
        /// Every state buffer the rule may keep, in the engine's order.
        const BUFFERS: &'static [StateBuffer];
        /// The configuration's range checks.
        fn check(&self) -> Result<(), StepError>;
        /// The learning rate, which every configuration has, to set.
        fn lr_mut(&mut self) -> &mut f32;
        /// The learning rate.
        fn lr(&self) -> f32 {
            let mut copy = *self;
            *copy.lr_mut()
        }
        /// Every hyperparameter, by name, for state files and configuration strings.
        fn fields(&mut self) -> Vec<(&'static str, &mut dyn FieldValue)>;
        /// The state buffers a step with this configuration keeps (by default, the required
        /// ones).
        fn state_buffers(&self) -> usize {
            Self::BUFFERS.iter().filter(|b| !b.optional).count()
        }
        /// Builds this step's kernels from the configuration, checked by the caller, and runs
        /// them through `runner`.
        fn step<X: StepRunner>(&self, runner: X) -> Result<StepReport, StepError>;
    }
}

/// Implements the [`RuleImpl`](sealed::RuleImpl) methods that follow from a configuration's field
/// list: `fields` (every hyperparameter by name), `lr_mut` (every configuration has `lr`) and
/// `check` (its inherent `validate`). Used inside each rule's `impl RuleImpl`.
macro_rules! config_fields {
    ($($field:ident),* $(,)?) => {
        fn check(&self) -> Result<(), StepError> {
            self.validate()
        }
        fn lr_mut(&mut self) -> &mut f32 {
            &mut self.lr
        }
        fn fields(&mut self) -> Vec<(&'static str, &mut dyn $crate::optim::FieldValue)> {
            vec![$((stringify!($field), &mut self.$field)),*]
        }
    };
}
use config_fields;

/// A state buffer a rule keeps: one `f32` per parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateBuffer {
    /// Its name in state files, for example `"m"`.
    pub name: &'static str,
    /// Kept only when a setting asks for it (AMSGrad's running maximum): a state of this rule
    /// may lack it, and it starts from zero when it first appears.
    pub optional: bool,
    /// Whether its values take both signs (first moments, momentum), which decides the map of
    /// 8-bit state ([`StateFormat::Q8`](crate::StateFormat::Q8)); non-negative otherwise
    /// (second moments, sums of squares).
    pub signed: bool,
}

impl StateBuffer {
    /// A buffer every stepped state holds, of values of both signs.
    pub(crate) const fn signed(name: &'static str) -> Self {
        StateBuffer {
            name,
            optional: false,
            signed: true,
        }
    }

    /// A buffer every stepped state holds, of non-negative values.
    pub(crate) const fn unsigned(name: &'static str) -> Self {
        StateBuffer {
            name,
            optional: false,
            signed: false,
        }
    }
}

/// A hyperparameter's text form, in state files and in configuration strings.
pub trait FieldValue {
    /// The text form; `parse` reads it back exactly.
    fn encode(&self) -> String;
    /// Sets the value from its text form.
    ///
    /// # Errors
    /// A description of the text expected, when `text` is not one.
    fn parse(&mut self, text: &str) -> Result<(), &'static str>;
}

impl FieldValue for f32 {
    fn encode(&self) -> String {
        // Rust prints the shortest string that parses back to the same f32.
        self.to_string()
    }
    fn parse(&mut self, text: &str) -> Result<(), &'static str> {
        *self = text.trim().parse().map_err(|_| "a number")?;
        Ok(())
    }
}

impl FieldValue for bool {
    fn encode(&self) -> String {
        self.to_string()
    }
    fn parse(&mut self, text: &str) -> Result<(), &'static str> {
        *self = text.trim().parse().map_err(|_| "true or false")?;
        Ok(())
    }
}

/// Reads field `name` of `config` from `text`.
///
/// # Errors
/// [`FieldError::Unknown`] if the rule has no such field, [`FieldError::Value`] if `text` is not
/// a value of it.
pub(crate) fn set_field<R: Rule>(config: &mut R, name: &str, text: &str) -> Result<(), FieldError> {
    let mut fields = config.fields();
    let (_, value) = fields
        .iter_mut()
        .find(|(n, _)| *n == name)
        .ok_or(FieldError::Unknown)?;
    value.parse(text).map_err(FieldError::Value)
}

/// Every field of `config` with its text form, in the rule's order.
pub(crate) fn field_texts<R: Rule>(config: &R) -> Vec<(&'static str, String)> {
    let mut copy = *config;
    copy.fields()
        .into_iter()
        .map(|(name, value)| (name, value.encode()))
        .collect()
}

/// Why [`set_field`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldError {
    /// The rule has no field of that name.
    Unknown,
    /// The text is not a value of the field; what is expected.
    Value(&'static str),
}

/// An optimizer: the configuration of an update rule `R`, with the engine that applies it.
///
/// The six optimizers are this type: [`Sgd`](crate::Sgd) is `Fused<SgdConfig>`,
/// [`Adam`](crate::Adam) is `Fused<AdamConfig>`, and so on. Its methods are those of the
/// [`Optimizer`](crate::Optimizer) trait, plus the ones below.
///
/// ```
/// use fusedopt::{Adam, AdamConfig, Optimizer};
/// let mut opt = Adam::new(AdamConfig { lr: 0.1, ..Default::default() });
/// let mut w = [1.0f32, -1.0];
/// opt.step(&mut w, &[1.0, -1.0])?;
/// assert!(w[0] < 1.0 && w[1] > -1.0);
/// # Ok::<(), fusedopt::StepError>(())
/// ```
#[derive(Debug)]
pub struct Fused<R: Rule> {
    pub(crate) config: R,
    pub(crate) engine: Engine,
}

impl<R: Rule> Fused<R> {
    /// Creates the optimizer. The configuration is checked at every step.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let opt = Adam::new(AdamConfig::default());
    /// assert_eq!((opt.name(), opt.steps(), opt.layout()), ("adam", 0, None));
    /// ```
    pub fn new(config: R) -> Self {
        Fused {
            config,
            engine: Engine::new(R::NAME, R::BUFFERS.iter().map(|b| b.signed).collect()),
        }
    }

    /// The hyperparameters.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig};
    /// assert_eq!(Adam::new(AdamConfig::default()).config().beta2, 0.999);
    /// ```
    pub fn config(&self) -> &R {
        &self.config
    }

    /// The hyperparameters, to change between steps; the next step checks them.
    ///
    /// ```
    /// use fusedopt::{Momentum, MomentumConfig};
    /// let mut opt = Momentum::new(MomentumConfig::default());
    /// opt.config_mut().momentum = 0.99;
    /// assert_eq!(opt.config().momentum, 0.99);
    /// ```
    pub fn config_mut(&mut self) -> &mut R {
        &mut self.config
    }

    /// Applies one update to a whole model held as two lists, weights and gradients, in one
    /// parallel dispatch: bitwise the same as [`step_many`](crate::Optimizer::step_many) over
    /// their pairs. Any types that lend slices will do (`Vec<f32>`, `Box<[f32]>`, `&mut [f32]`
    /// and `&[f32]`, ...). After the first call, a call allocates nothing (with up to 32
    /// distinct [parameter groups](crate::Optimizer::set_param_groups)).
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig};
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
    /// A `Box<dyn Optimizer>` has the same method
    /// ([`impl dyn Optimizer`](crate::Optimizer#impl-dyn+Optimizer)).
    ///
    /// # Errors
    /// [`StepError::GradCount`] if `grads` holds another number of tensors than `weights`; then
    /// as [`step_many`](crate::Optimizer::step_many). On error no tensor and no state is
    /// modified.
    pub fn step_all<W: AsMut<[f32]>, G: AsRef<[f32]>>(
        &mut self,
        weights: &mut [W],
        grads: &[G],
    ) -> Result<StepReport, StepError> {
        self.step_source(&mut Lists { weights, grads })
    }

    /// Like [`step_all`](Fused::step_all), where a tensor whose gradient is `None` has none this
    /// step: its weights and state are left alone and it does not count the step (it keeps its
    /// own step count, [`tensor_steps`](crate::Optimizer::tensor_steps), which Adam's bias
    /// correction uses). Bitwise the same as stepping the other tensors alone.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// let mut weights = vec![vec![1.0f32; 3], vec![1.0f32; 2]];
    /// opt.step_partial(&mut weights, &[Some(vec![0.5f32; 3]), None])?;
    /// opt.step_partial(&mut weights, &[Some(vec![0.5f32; 3]), Some(vec![0.5f32; 2])])?;
    /// assert_eq!(opt.tensor_steps(), [2, 1]); // the second tensor's first step used t = 1
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// As [`step_all`](Fused::step_all).
    pub fn step_partial<W: AsMut<[f32]>, G: AsRef<[f32]>>(
        &mut self,
        weights: &mut [W],
        grads: &[Option<G>],
    ) -> Result<StepReport, StepError> {
        self.step_source(&mut PartialLists { weights, grads })
    }

    /// [`step`](crate::Optimizer::step) with weights and gradients of any [`Element`] type:
    /// bfloat16 or half-precision gradients are read as their exact `f32` values (bitwise the
    /// step over `f32` copies of them). Half-precision weights are *master-weight* training: the
    /// optimizer keeps an `f32` copy of them in its state (taken from them at the tensor's first
    /// half-precision step, and again after a step with `f32` weights), updates it, and writes it
    /// back rounded to nearest even, in the same pass.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, Optimizer, half::bf16};
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
    /// As [`step`](crate::Optimizer::step).
    pub fn step_typed<E: Element, F: Element>(
        &mut self,
        weights: &mut [E],
        grads: &[F],
    ) -> Result<StepReport, StepError> {
        self.step_all_typed(&mut [weights], &[grads])
    }

    /// [`step_all`](Fused::step_all) with weights and gradients of any [`Element`] type (see
    /// [`step_typed`](Fused::step_typed)); tensors may mix them.
    ///
    /// ```
    /// use fusedopt::{Adam, AdamConfig, half::f16};
    /// let mut opt = Adam::new(AdamConfig::default());
    /// let mut weights = vec![vec![1.0f32; 3], vec![1.0f32; 5]];
    /// let grads = vec![vec![f16::from_f32(0.5); 3], vec![f16::from_f32(-0.5); 5]];
    /// opt.step_all_typed(&mut weights, &grads)?;
    /// assert!(weights[0][0] < 1.0 && weights[1][0] > 1.0);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// As [`step_all`](Fused::step_all).
    pub fn step_all_typed<E: Element, F: Element, W: AsMut<[E]>, G: AsRef<[F]>>(
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

    /// [`step_partial`](Fused::step_partial) with weights and gradients of any [`Element`]
    /// type (see [`step_typed`](Fused::step_typed)).
    ///
    /// ```
    /// use fusedopt::{Optimizer, Sgd, SgdConfig, half::bf16};
    /// let mut opt = Sgd::new(SgdConfig { lr: 0.5, ..SgdConfig::default() });
    /// let mut weights = vec![vec![bf16::ONE; 2], vec![bf16::ONE; 2]];
    /// opt.step_partial_typed(&mut weights, &[None, Some(vec![bf16::ONE; 2])])?;
    /// assert_eq!(weights[1], [bf16::from_f32(0.5); 2]);
    /// assert_eq!(weights[0], [bf16::ONE; 2]);
    /// # Ok::<(), fusedopt::StepError>(())
    /// ```
    ///
    /// # Errors
    /// As [`step_all`](Fused::step_all).
    pub fn step_partial_typed<E: Element, F: Element, W: AsMut<[E]>, G: AsRef<[F]>>(
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

    /// One step over the tensors of `source` (a concrete source, or `dyn TensorSource`).
    pub(crate) fn step_source<S: TensorSource + ?Sized>(
        &mut self,
        source: &mut S,
    ) -> Result<StepReport, StepError> {
        let config = &self.config;
        self.engine.with_tensors(source, |engine, tensors| {
            config.check()?;
            config.step(ListStep(engine, tensors))
        })
    }

    /// One step over the tensors `feed` lends one at a time.
    pub(crate) fn step_fed(&mut self, feed: &dyn TensorFeed) -> Result<StepReport, StepError> {
        self.config.check()?;
        self.config.step(FeedStep(&mut self.engine, feed))
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
