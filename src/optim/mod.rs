//! The update rules, one file each (Momentum and NAG share one), and [`Fused`], the one
//! optimizer type they are applied through. Imports [`crate::engine`], [`crate::simd`] and
//! [`crate::types`].
//!
//! An optimizer file holds a configuration type (its hyperparameters, defaults and range
//! checks), the per-step scalars and the element-wise kernel written once over
//! [`Lane`](crate::simd::Lane), the [`Rule`] implementation that ties them to the engine, and unit
//! tests. Everything else (validation of the input, state, groups, hygiene, threads) is the
//! engine's.

/// The registry: every update rule, as its file and the optimizers it defines (the name of its
/// [`Fused`] alias and its configuration type). An optimizer is its rule file and one line here:
/// from this list come its module, its exports, its [`OptimizerConfig`](crate::OptimizerConfig)
/// variant (so configuration strings, `build`, the C ABI and the Python package, whose classes
/// are made from `OptimizerConfig`'s list), and [`OPTIMIZER_NAMES`](crate::OPTIMIZER_NAMES).
/// State files and candle need nothing more: they are generic over [`Rule`].
///
/// `registry!(callback)` calls `callback! { file => Alias(Config), ...; ... }`.
macro_rules! registry {
    ($callback:ident) => {
        $callback! {
            sgd => Sgd(SgdConfig);
            momentum => Momentum(MomentumConfig), Nag(NagConfig);
            adagrad => AdaGrad(AdaGradConfig);
            rmsprop => RmsProp(RmsPropConfig);
            adam => Adam(AdamConfig);
            adamax => Adamax(AdamaxConfig);
            lion => Lion(LionConfig);
            radam => RAdam(RAdamConfig);
            nadam => NAdam(NAdamConfig);
            ademamix => AdEMAMix(AdEMAMixConfig);
            schedule_free => ScheduleFreeAdamW(ScheduleFreeAdamWConfig), ScheduleFreeSgd(ScheduleFreeSgdConfig);
            lamb => Lamb(LambConfig);
            lars => Lars(LarsConfig);
        }
    };
}
pub(crate) use registry;

/// Declares each rule file of the registry, and `rules`, which re-exports what each defines.
macro_rules! rule_modules {
    ($($file:ident => $($alias:ident($config:ident)),+;)*) => {
        $(pub mod $file;)*

        /// Every rule file's public items, for the crate root to re-export.
        pub mod rules {
            $(pub use super::$file::*;)*
        }
    };
}
registry!(rule_modules);

use crate::engine::{Engine, FeedStep, ListStep, StepRunner, Sums, TensorFeed, TensorSource};
use crate::types::{StepError, StepReport, Value};
use core::fmt::Debug;

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

/// A name that configuration strings accept for a rule, with the defaults it stands for.
pub(crate) type Preset<R> = (&'static str, fn() -> R);

pub(crate) mod sealed {
    use super::*;

    /// What an optimizer file provides; the engine and [`Fused`] do the rest.
    pub trait RuleImpl: Copy + Debug + Default + PartialEq + Send + Sync + 'static {
        /// See [`Optimizer::name`](crate::Optimizer::name).
        const NAME: &'static str;
        /// Other names that configuration strings accept, each with its defaults (`adamw`).
        const PRESETS: &'static [Preset<Self>] = &[];
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
        /// The value state buffer `b` starts from (by default 0; Adagrad's
        /// `initial_accumulator_value`).
        fn initial_value(&self, _b: usize) -> f32 {
            0.0
        }
        /// Names of the running sums the rule keeps in [`State::sums`](crate::engine) (in state
        /// files); none by default.
        const SUMS: &'static [&'static str] = &[];
        /// Advances the running values over an applied step (by default, none are kept).
        fn advance(&self, _sums: &mut Sums) {}
        /// For rules whose weights have a separate evaluation point (schedule-free): the state
        /// buffer `d` and the coefficient `c` with `x = w + c·d` (the way back is `w = x − c·d`).
        fn eval_shift(&self) -> Option<(usize, f64)> {
            None
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

/// A hyperparameter's type: its text form, in state files and configuration strings, and its
/// typed [`Value`], for bindings.
pub trait FieldValue {
    /// The text form; `parse` reads it back exactly.
    fn encode(&self) -> String;
    /// Sets the value from its text form.
    ///
    /// # Errors
    /// A description of the text expected, when `text` is not one.
    fn parse(&mut self, text: &str) -> Result<(), &'static str>;
    /// The value, typed. By default a choice, named by its text form.
    fn value(&self) -> Value {
        Value::Choice(self.encode())
    }
    /// Sets the value from a typed one. By default a choice, read from its name.
    ///
    /// # Errors
    /// A description of the value expected, when `value` is not one.
    fn set_value(&mut self, value: &Value) -> Result<(), &'static str> {
        match value {
            Value::Choice(name) => self.parse(name),
            // Any text that names no choice: the error says which names do.
            _ => self.parse(""),
        }
    }
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
    fn value(&self) -> Value {
        // The decimal the f32 was written as (0.95, not 0.949999988079071): the shortest text
        // that reads back as this f32, read as an f64.
        Value::Number(self.to_string().parse().unwrap_or(f64::from(*self)))
    }
    fn set_value(&mut self, value: &Value) -> Result<(), &'static str> {
        match value {
            Value::Number(x) => *self = *x as f32,
            Value::Count(n) => *self = *n as f32,
            _ => return Err("a number"),
        }
        Ok(())
    }
}

impl FieldValue for f64 {
    fn encode(&self) -> String {
        self.to_string()
    }
    fn parse(&mut self, text: &str) -> Result<(), &'static str> {
        *self = text.trim().parse().map_err(|_| "a number")?;
        Ok(())
    }
    fn value(&self) -> Value {
        Value::Number(*self)
    }
    fn set_value(&mut self, value: &Value) -> Result<(), &'static str> {
        match value {
            Value::Number(x) => *self = *x,
            Value::Count(n) => *self = *n as f64,
            _ => return Err("a number"),
        }
        Ok(())
    }
}

/// A count of steps (a warm-up length): a whole number, exactly representable as an `f64` when
/// typed.
impl FieldValue for u64 {
    fn encode(&self) -> String {
        self.to_string()
    }
    fn parse(&mut self, text: &str) -> Result<(), &'static str> {
        *self = text.trim().parse().map_err(|_| "a whole number >= 0")?;
        Ok(())
    }
    fn value(&self) -> Value {
        Value::Count(*self)
    }
    fn set_value(&mut self, value: &Value) -> Result<(), &'static str> {
        match value {
            Value::Count(n) => {
                *self = *n;
                Ok(())
            }
            Value::Number(x) if x.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(x) => {
                *self = *x as u64;
                Ok(())
            }
            _ => Err("a whole number >= 0"),
        }
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
    fn value(&self) -> Value {
        Value::Bool(*self)
    }
    fn set_value(&mut self, value: &Value) -> Result<(), &'static str> {
        match value {
            Value::Bool(b) => *self = *b,
            _ => return Err("true or false"),
        }
        Ok(())
    }
}

/// Sets field `name` of `config` with `set` (from text or from a typed value).
///
/// # Errors
/// [`FieldError::Unknown`] if the rule has no such field, [`FieldError::Value`] if `set` refuses
/// the value.
pub(crate) fn set_field<R: Rule>(
    config: &mut R,
    name: &str,
    set: impl FnOnce(&mut dyn FieldValue) -> Result<(), &'static str>,
) -> Result<(), FieldError> {
    let mut fields = config.fields();
    let (_, value) = fields
        .iter_mut()
        .find(|(n, _)| *n == name)
        .ok_or(FieldError::Unknown)?;
    set(&mut **value).map_err(FieldError::Value)
}

/// Every field of `config` with `get` of it (its text, or its value), in the rule's order.
pub(crate) fn field_map<R: Rule, T>(
    config: &R,
    get: impl Fn(&dyn FieldValue) -> T,
) -> Vec<(&'static str, T)> {
    let mut copy = *config;
    copy.fields()
        .into_iter()
        .map(|(name, value)| (name, get(value)))
        .collect()
}

/// Why [`set_field`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldError {
    /// The rule has no field of that name.
    Unknown,
    /// The value is not one of the field; what is expected.
    Value(&'static str),
}

/// An optimizer: the configuration of an update rule `R`, with the engine that applies it.
///
/// Every optimizer is this type: [`Sgd`](crate::Sgd) is `Fused<SgdConfig>`,
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

    /// One step over the tensors of `source` (a concrete source, or `dyn TensorSource`).
    pub(crate) fn step_source<S: TensorSource + ?Sized>(
        &mut self,
        source: &mut S,
    ) -> Result<StepReport, StepError> {
        let config = &self.config;
        self.engine.with_tensors(source, |engine, tensors| {
            before_step(config, engine)?;
            let k = engine.state().steps;
            let report = config.step(ListStep(engine, tensors))?;
            after_step(config, engine, k);
            Ok(report)
        })
    }

    /// One step over the tensors `feed` lends one at a time.
    pub(crate) fn step_fed(&mut self, feed: &dyn TensorFeed) -> Result<StepReport, StepError> {
        before_step(&self.config, &mut self.engine)?;
        let k = self.engine.state().steps;
        let report = self.config.step(FeedStep(&mut self.engine, feed))?;
        after_step(&self.config, &mut self.engine, k);
        Ok(report)
    }

    /// Moves the weights to the evaluation point (`eval`) or back to the training point, for
    /// rules that have one; the others' weights are the same at both.
    pub(crate) fn shift(
        &mut self,
        weights: &mut [&mut [f32]],
        eval: bool,
    ) -> Result<(), StepError> {
        let Some((b, c)) = self.config.eval_shift() else {
            return Ok(());
        };
        if self.engine.is_eval() == eval {
            return Ok(());
        }
        let c = if eval { c } else { -c };
        self.engine.shift_weights(weights, b, c as f32, eval)
    }

    /// Creates the state a first step over tensors of `lens` would, without stepping.
    ///
    /// # Errors
    /// An invalid configuration, and those of [`Engine::init_state`].
    pub(crate) fn create_state(&mut self, lens: &[usize]) -> Result<(), StepError> {
        self.config.check()?;
        set_initial(&self.config, &mut self.engine);
        self.engine.init_state(lens, self.config.state_buffers())
    }
}

/// What every step checks and sets first: the configuration, the mode (a rule with an
/// evaluation point steps only from its training point) and the buffers' initial values.
fn before_step<R: Rule>(config: &R, engine: &mut Engine) -> Result<(), StepError> {
    config.check()?;
    if config.eval_shift().is_some() && engine.is_eval() {
        return Err(StepError::EvalMode { optimizer: R::NAME });
    }
    set_initial(config, engine);
    Ok(())
}

/// Advances the rule's running values once a step that followed `k` others was applied (not
/// skipped by the non-finite policy, not refused).
fn after_step<R: Rule>(config: &R, engine: &mut Engine, k: u64) {
    if engine.state().steps > k {
        config.advance(engine.sums_mut());
    }
}

/// Tells `engine` the values the state buffers of `config` start from.
fn set_initial<R: Rule>(config: &R, engine: &mut Engine) {
    for (b, value) in engine.initial_mut().iter_mut().enumerate() {
        *value = config.initial_value(b);
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
    value: impl Into<f64>,
    closed: bool,
) -> Result<(), StepError> {
    let value = value.into();
    let ok = value >= 0.0 && if closed { value <= 1.0 } else { value < 1.0 };
    check(
        optimizer,
        field,
        value as f32,
        ok,
        if closed { "in [0, 1]" } else { "in [0, 1)" },
    )
}
