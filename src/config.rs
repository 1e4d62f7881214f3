//! [`OptimizerConfig`]: any optimizer's configuration as one value, chosen by name at run time,
//! parsed from `"adam:lr=3e-4,beta2=0.95"` strings or set field by field with typed [`Value`]s.
//! Made from the rule registry, so a new rule needs nothing here. Imports [`crate::optimizer`],
//! [`crate::optim`] and [`crate::types`].

use crate::optim::rules::*;
use crate::optim::sealed::RuleImpl;
use crate::optim::{FieldError, FieldValue, Fused, Rule, field_map, registry, set_field};
use crate::optimizer::Optimizer;
use crate::types::{StepError, Value};
use core::any::Any;
use core::fmt;
use core::str::FromStr;

/// What [`OptimizerConfig`] does with the configuration inside any of its variants: an object
/// safe view of a [`Rule`].
trait AnyRule {
    fn name(&self) -> &'static str;
    fn build(&self) -> Box<dyn Optimizer>;
    fn validate(&self) -> Result<(), StepError>;
    fn set(
        &mut self,
        field: &str,
        set: &mut dyn FnMut(&mut dyn FieldValue) -> Result<(), &'static str>,
    ) -> Result<(), FieldError>;
    fn texts(&self) -> Vec<(&'static str, String)>;
    fn values(&self) -> Vec<(&'static str, Value)>;
    fn buffer_names(&self) -> Vec<&'static str>;
    /// Writes this configuration into `slot` if `slot` holds one of the same rule.
    fn put(&self, slot: &mut dyn Any) -> bool;
}

impl<R: Rule> AnyRule for R {
    fn name(&self) -> &'static str {
        R::NAME
    }
    fn build(&self) -> Box<dyn Optimizer> {
        Box::new(Fused::new(*self))
    }
    fn validate(&self) -> Result<(), StepError> {
        self.check()
    }
    fn set(
        &mut self,
        field: &str,
        set: &mut dyn FnMut(&mut dyn FieldValue) -> Result<(), &'static str>,
    ) -> Result<(), FieldError> {
        set_field(self, field, set)
    }
    fn texts(&self) -> Vec<(&'static str, String)> {
        field_map(self, |v| v.encode())
    }
    fn values(&self) -> Vec<(&'static str, Value)> {
        field_map(self, |v| v.value())
    }
    fn buffer_names(&self) -> Vec<&'static str> {
        R::BUFFERS[..self.state_buffers()]
            .iter()
            .map(|b| b.name)
            .collect()
    }
    fn put(&self, slot: &mut dyn Any) -> bool {
        slot.downcast_mut::<R>().map(|c| *c = *self).is_some()
    }
}

/// Defines [`OptimizerConfig`], [`OPTIMIZER_NAMES`] and what follows the variant list, from the
/// registry.
macro_rules! optimizer_config {
    ($($file:ident => $($alias:ident($config:ident)),+;)*) => {
        /// The names of the optimizers, as [`Optimizer::name`] returns them.
        pub const OPTIMIZER_NAMES: [&str; 0 $($(+ optimizer_config!(@one $alias))+)*] =
            [$($(<$config as RuleImpl>::NAME),+),*];

        /// The configuration of any optimizer: what a trainer, a command line or a config file
        /// chooses at run time, before [`build`](OptimizerConfig::build)ing the optimizer.
        ///
        /// It parses from a name with optional overrides of its fields, `name[:field=value,...]`:
        ///
        /// ```
        /// use fusedopt::{AdamConfig, OptimizerConfig};
        /// let config: OptimizerConfig = "adam:lr=3e-4,beta2=0.95,weight_decay=0.1".parse()?;
        /// assert_eq!(
        ///     config,
        ///     OptimizerConfig::Adam(AdamConfig { lr: 3e-4, beta2: 0.95, weight_decay: 0.1, ..Default::default() })
        /// );
        /// let mut opt = config.build();
        /// assert_eq!(opt.name(), "adam");
        /// let mut w = vec![1.0f32; 8];
        /// opt.step(&mut w, &[0.5; 8])?;
        /// # Ok::<(), Box<dyn std::error::Error>>(())
        /// ```
        ///
        /// The names are those of [`OPTIMIZER_NAMES`], plus presets such as `adamw` for Adam
        /// with [`AdamConfig::adamw`]'s defaults. The fields are those of each configuration
        /// type, by their Rust names: numbers as Rust or Python write them, booleans as
        /// `true`/`false`, and [`EpsMode`](crate::EpsMode) as `sqrt_v` or `sqrt_v_hat` (`seed`
        /// and `pytorch` also read). Unset fields keep their defaults.
        /// [`Display`](fmt::Display) writes every field, in a form that parses back to the same
        /// value. Bindings set fields with typed [`Value`]s instead
        /// ([`set_value`](OptimizerConfig::set_value)).
        #[derive(Debug, Clone, Copy, PartialEq)]
        #[non_exhaustive]
        pub enum OptimizerConfig {
            $($(
                #[doc = concat!("[`", stringify!($alias), "`](crate::", stringify!($alias), ").")]
                $alias($config),
            )+)*
        }

        impl OptimizerConfig {
            /// The configuration inside the variant.
            fn rule(&self) -> &dyn AnyRule {
                match self {
                    $($(OptimizerConfig::$alias(c) => c,)+)*
                }
            }

            /// The configuration inside the variant, to change.
            fn rule_mut(&mut self) -> &mut dyn AnyRule {
                match self {
                    $($(OptimizerConfig::$alias(c) => c,)+)*
                }
            }

            /// The name of the optimizer type (`"Adam"`, `"RmsProp"`, ...): the name bindings
            /// give the classes they make for optimizers that have no class of their own.
            ///
            /// ```
            /// use fusedopt::OptimizerConfig;
            /// assert_eq!(OptimizerConfig::default_for("nag").unwrap().type_name(), "Nag");
            /// ```
            pub fn type_name(&self) -> &'static str {
                match self {
                    $($(OptimizerConfig::$alias(_) => stringify!($alias),)+)*
                }
            }

            /// The default configuration of every optimizer, in the order of
            /// [`OPTIMIZER_NAMES`].
            ///
            /// ```
            /// use fusedopt::{OPTIMIZER_NAMES, OptimizerConfig};
            /// let names: Vec<_> = OptimizerConfig::all().iter().map(|c| c.name()).collect();
            /// assert_eq!(names, OPTIMIZER_NAMES);
            /// ```
            pub fn all() -> Vec<OptimizerConfig> {
                vec![$($(OptimizerConfig::$alias($config::default())),+),*]
            }

            /// The preset called `name` (`adamw`), if a rule has one.
            fn preset(name: &str) -> Option<OptimizerConfig> {
                $($(
                    if let Some((_, make)) =
                        <$config as RuleImpl>::PRESETS.iter().find(|(n, _)| *n == name)
                    {
                        return Some(OptimizerConfig::$alias(make()));
                    }
                )+)*
                None
            }

            /// The names of the presets.
            fn preset_names() -> Vec<&'static str> {
                let mut names = Vec::new();
                $($(names.extend(<$config as RuleImpl>::PRESETS.iter().map(|(n, _)| *n));)+)*
                names
            }
        }

        /// `config` as an [`OptimizerConfig`] if it is one of the rule configurations.
        fn from_any(config: &dyn Any) -> Option<OptimizerConfig> {
            $($(
                if let Some(c) = config.downcast_ref::<$config>() {
                    return Some(OptimizerConfig::$alias(*c));
                }
            )+)*
            None
        }

        $($(
            impl From<$config> for OptimizerConfig {
                fn from(config: $config) -> Self {
                    OptimizerConfig::$alias(config)
                }
            }
        )+)*
    };
    (@one $alias:ident) => {
        1
    };
}
registry!(optimizer_config);

impl OptimizerConfig {
    /// The optimizer's [`name`](Optimizer::name): `"adam"`, `"sgd"`, ...
    ///
    /// ```
    /// use fusedopt::{OptimizerConfig, SgdConfig};
    /// assert_eq!(OptimizerConfig::Sgd(SgdConfig::default()).name(), "sgd");
    /// assert_eq!("adamw".parse::<OptimizerConfig>().unwrap().name(), "adam");
    /// ```
    pub fn name(&self) -> &'static str {
        self.rule().name()
    }

    /// The optimizer with this configuration.
    ///
    /// ```
    /// use fusedopt::{OPTIMIZER_NAMES, OptimizerConfig};
    /// for name in OPTIMIZER_NAMES {
    ///     let opt = name.parse::<OptimizerConfig>().unwrap().build();
    ///     assert_eq!((opt.name(), opt.steps()), (name, 0));
    /// }
    /// ```
    pub fn build(self) -> Box<dyn Optimizer> {
        self.rule().build()
    }

    /// The default configuration of the optimizer called `name` (one of [`OPTIMIZER_NAMES`], or
    /// a preset such as `adamw` for [`AdamConfig::adamw`]); `None` for another name.
    ///
    /// ```
    /// use fusedopt::{AdamConfig, OptimizerConfig};
    /// assert_eq!(OptimizerConfig::default_for("adamw"), Some(OptimizerConfig::Adam(AdamConfig::adamw())));
    /// assert_eq!(OptimizerConfig::default_for("shampoo"), None);
    /// ```
    pub fn default_for(name: &str) -> Option<OptimizerConfig> {
        let found = OptimizerConfig::all()
            .into_iter()
            .find(|c| c.name() == name);
        found.or_else(|| OptimizerConfig::preset(name))
    }

    /// Sets the field called `field` from its text form, as in a configuration string.
    ///
    /// ```
    /// use fusedopt::{OptimizerConfig, RmsPropConfig};
    /// let mut config = OptimizerConfig::RmsProp(RmsPropConfig::default());
    /// config.set("decay_rate", "0.99")?;
    /// assert_eq!(config, OptimizerConfig::RmsProp(RmsPropConfig { decay_rate: 0.99, ..Default::default() }));
    /// assert!(config.set("beta1", "0.9").is_err()); // RMSProp has no beta1
    /// # Ok::<(), fusedopt::ParseConfigError>(())
    /// ```
    ///
    /// # Errors
    /// [`ParseConfigError::UnknownField`] if the optimizer has no such field,
    /// [`ParseConfigError::Value`] if `value` is not a value of it (the configuration is then
    /// unchanged). Ranges are checked by [`validate`](OptimizerConfig::validate).
    pub fn set(&mut self, field: &str, value: &str) -> Result<(), ParseConfigError> {
        self.set_with(field, &mut |f| f.parse(value))
            .map_err(|e| match e {
                SetFailure::Error(e) => e,
                SetFailure::Expected(expected) => ParseConfigError::Value {
                    optimizer: self.name(),
                    field: field.to_string(),
                    value: value.to_string(),
                    expected,
                },
            })
    }

    /// Sets the field called `field` to a typed value: what bindings pass instead of text. A
    /// number given to an `f32` field is rounded to nearest.
    ///
    /// ```
    /// use fusedopt::{OptimizerConfig, ParseConfigError, Value};
    /// let mut config = OptimizerConfig::default_for("adam").unwrap();
    /// config.set_value("beta2", Value::Number(0.95))?;
    /// config.set_value("eps_mode", Value::Choice("sqrt_v_hat".into()))?;
    /// assert!(config.to_string().contains("beta2=0.95"));
    /// let err = config.set_value("amsgrad", Value::Number(1.0)).unwrap_err();
    /// assert!(matches!(err, ParseConfigError::Type { .. }), "{err}");
    /// assert_eq!(err.to_string(), "adam: amsgrad must be true or false, not the number 1");
    /// let err = config.set_value("lr", Value::Choice("0.1".into())).unwrap_err();
    /// assert_eq!(err.to_string(), "adam: lr must be a number, not the name 0.1");
    /// # Ok::<(), ParseConfigError>(())
    /// ```
    ///
    /// # Errors
    /// [`ParseConfigError::UnknownField`] if the optimizer has no such field,
    /// [`ParseConfigError::Type`] if `value` is of another type than the field,
    /// [`ParseConfigError::Value`] for a choice it does not have; the configuration is then
    /// unchanged. Ranges are checked by [`validate`](OptimizerConfig::validate).
    pub fn set_value(&mut self, field: &str, value: Value) -> Result<(), ParseConfigError> {
        // A name given to a field of names that has no such name is a bad value; anything
        // else refused is of the wrong type.
        let names = matches!(self.value(field), Some(Value::Choice(_)));
        self.set_with(field, &mut |f| f.set_value(&value))
            .map_err(|e| match (e, &value) {
                (SetFailure::Error(e), _) => e,
                (SetFailure::Expected(expected), Value::Choice(name)) if names => {
                    ParseConfigError::Value {
                        optimizer: self.name(),
                        field: field.to_string(),
                        value: name.clone(),
                        expected,
                    }
                }
                (SetFailure::Expected(expected), _) => ParseConfigError::Type {
                    optimizer: self.name(),
                    field: field.to_string(),
                    expected,
                    found: value.clone(),
                },
            })
    }

    /// Sets `field` with `set`, on a copy that replaces the configuration only on success.
    /// Fails with the error of an unknown field, or with what `set` expected instead.
    fn set_with(
        &mut self,
        field: &str,
        set: &mut dyn FnMut(&mut dyn FieldValue) -> Result<(), &'static str>,
    ) -> Result<(), SetFailure> {
        let mut copy = *self;
        copy.rule_mut().set(field, set).map_err(|e| match e {
            FieldError::Unknown => SetFailure::Error(ParseConfigError::UnknownField {
                optimizer: self.name(),
                field: field.to_string(),
                fields: self.fields().into_iter().map(|(f, _)| f).collect(),
            }),
            FieldError::Value(expected) => SetFailure::Expected(expected),
        })?;
        *self = copy;
        Ok(())
    }

    /// Every field with its text form, in the configuration type's order.
    ///
    /// ```
    /// use fusedopt::{OptimizerConfig, SgdConfig};
    /// let fields = OptimizerConfig::Sgd(SgdConfig::default()).fields();
    /// assert_eq!(fields[0], ("lr", "0.01".to_string()));
    /// ```
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        self.rule().texts()
    }

    /// Every field with its typed value, in the configuration type's order.
    ///
    /// ```
    /// use fusedopt::{OptimizerConfig, Value};
    /// let values = OptimizerConfig::default_for("momentum").unwrap().values();
    /// assert_eq!(values[1], ("momentum", Value::Number(0.9)));
    /// ```
    pub fn values(&self) -> Vec<(&'static str, Value)> {
        self.rule().values()
    }

    /// The typed value of the field called `field`, or `None` if the optimizer has none.
    ///
    /// ```
    /// use fusedopt::{OptimizerConfig, Value};
    /// let config: OptimizerConfig = "sgd:lr=0.5".parse().unwrap();
    /// assert_eq!(config.value("lr"), Some(Value::Number(0.5)));
    /// assert_eq!(config.value("beta1"), None);
    /// ```
    pub fn value(&self, field: &str) -> Option<Value> {
        self.values()
            .into_iter()
            .find_map(|(f, v)| (f == field).then_some(v))
    }

    /// The names of the state buffers a step with this configuration keeps, in order (as state
    /// files and [`Optimizer::state_names`] name them).
    ///
    /// ```
    /// use fusedopt::OptimizerConfig;
    /// let adam: OptimizerConfig = "adam:amsgrad=true".parse().unwrap();
    /// assert_eq!(adam.buffer_names(), ["m", "v", "v_max"]);
    /// assert!("sgd".parse::<OptimizerConfig>().unwrap().buffer_names().is_empty());
    /// ```
    pub fn buffer_names(&self) -> Vec<&'static str> {
        self.rule().buffer_names()
    }

    /// Checks every hyperparameter's range, as the configuration type's `validate` does.
    ///
    /// ```
    /// use fusedopt::{MomentumConfig, OptimizerConfig};
    /// assert!(OptimizerConfig::Momentum(MomentumConfig { momentum: 2.0, ..Default::default() }).validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`StepError::InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), StepError> {
        self.rule().validate()
    }
}

/// Why [`OptimizerConfig::set_with`] failed.
enum SetFailure {
    /// An error as it is (an unknown field).
    Error(ParseConfigError),
    /// The field refused the value; what it expected.
    Expected(&'static str),
}

impl FromStr for OptimizerConfig {
    type Err = ParseConfigError;

    /// Parses `name[:field=value,...]`; the result is [`validate`](OptimizerConfig::validate)d.
    ///
    /// ```
    /// use fusedopt::{OptimizerConfig, ParseConfigError};
    /// assert!("nag:momentum=0.8".parse::<OptimizerConfig>().is_ok());
    /// let err = "shampoo".parse::<OptimizerConfig>().unwrap_err();
    /// assert!(matches!(err, ParseConfigError::UnknownOptimizer { .. }));
    /// let err = "adam:beta3=0.5".parse::<OptimizerConfig>().unwrap_err();
    /// assert!(err.to_string().contains("beta3"), "{err}");
    /// let err = "adam:beta1=1.5".parse::<OptimizerConfig>().unwrap_err();
    /// assert_eq!(err.to_string(), "adam: beta1 = 1.5 is invalid, expected in [0, 1)");
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, overrides) = s.split_once(':').unwrap_or((s, ""));
        let name = name.trim();
        let mut config = OptimizerConfig::default_for(name).ok_or_else(|| {
            ParseConfigError::UnknownOptimizer {
                name: name.to_string(),
            }
        })?;
        let mut seen: Vec<&str> = Vec::new();
        for item in overrides
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let (field, value) = item
                .split_once('=')
                .ok_or_else(|| ParseConfigError::Syntax {
                    item: item.to_string(),
                })?;
            let field = field.trim();
            if seen.contains(&field) {
                return Err(ParseConfigError::Duplicate {
                    optimizer: config.name(),
                    field: field.to_string(),
                });
            }
            seen.push(field);
            config.set(field, value)?;
        }
        config.validate().map_err(ParseConfigError::Invalid)?;
        Ok(config)
    }
}

impl fmt::Display for OptimizerConfig {
    /// `name:field=value,...` with every field, parseable by [`FromStr`].
    ///
    /// ```
    /// use fusedopt::{AdamConfig, OptimizerConfig};
    /// let config = OptimizerConfig::Adam(AdamConfig::adamw());
    /// let text = config.to_string();
    /// assert!(text.starts_with("adam:lr=0.001,beta1=0.9,"), "{text}");
    /// assert_eq!(text.parse::<OptimizerConfig>().unwrap(), config);
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        for (i, (field, value)) in self.fields().into_iter().enumerate() {
            write!(f, "{}{field}={value}", if i == 0 { ':' } else { ',' })?;
        }
        Ok(())
    }
}

/// Reading and replacing a boxed optimizer's hyperparameters.
impl dyn Optimizer + '_ {
    /// The optimizer's hyperparameters, as an [`OptimizerConfig`].
    ///
    /// ```
    /// use fusedopt::OptimizerConfig;
    /// let opt = "adam:lr=0.01".parse::<OptimizerConfig>()?.build();
    /// assert_eq!(opt.config().to_string(), "adam:lr=0.01,beta1=0.9,beta2=0.999,eps=0.0000001,weight_decay=0,maximize=false,decoupled_weight_decay=false,amsgrad=false,eps_mode=seed");
    /// # Ok::<(), fusedopt::ParseConfigError>(())
    /// ```
    pub fn config(&self) -> OptimizerConfig {
        // Every optimizer is a `Fused<R>` of a registered rule, whose configuration is a
        // variant of `OptimizerConfig`.
        from_any(self.rule_config()).expect("every rule has an OptimizerConfig variant")
    }

    /// Replaces the optimizer's hyperparameters between steps, keeping its state: what a
    /// trainer does when a schedule changes `beta1` or `momentum`. The configuration must be of
    /// the same optimizer.
    ///
    /// ```
    /// use fusedopt::OptimizerConfig;
    /// let mut opt = "momentum".parse::<OptimizerConfig>()?.build();
    /// let mut w = vec![1.0f32; 4];
    /// opt.step(&mut w, &[1.0; 4])?;
    /// opt.set_config("momentum:lr=0.1,momentum=0.5".parse()?)?;
    /// assert_eq!((opt.lr(), opt.steps()), (0.1, 1));
    /// assert!(opt.set_config("adam".parse()?).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`StepError::RuleMismatch`] for another optimizer's configuration and
    /// [`StepError::InvalidConfig`] for a value out of range; then nothing changes.
    pub fn set_config(&mut self, config: OptimizerConfig) -> Result<(), StepError> {
        config.validate()?;
        if config.rule().put(self.rule_config_mut()) {
            Ok(())
        } else {
            Err(StepError::RuleMismatch {
                optimizer: self.name(),
                config: config.name(),
            })
        }
    }
}

/// Why a configuration string could not be read ([`OptimizerConfig`]'s `FromStr`, and
/// [`OptimizerConfig::set`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ParseConfigError {
    /// No optimizer has this name.
    UnknownOptimizer {
        /// The name given.
        name: String,
    },
    /// An override is not `field=value`.
    Syntax {
        /// The override as given.
        item: String,
    },
    /// The optimizer has no field of this name.
    UnknownField {
        /// The optimizer.
        optimizer: &'static str,
        /// The field given.
        field: String,
        /// The fields it has.
        fields: Vec<&'static str>,
    },
    /// A field is given twice.
    Duplicate {
        /// The optimizer.
        optimizer: &'static str,
        /// The field.
        field: String,
    },
    /// A value is not of the field's type.
    Value {
        /// The optimizer.
        optimizer: &'static str,
        /// The field.
        field: String,
        /// The value given.
        value: String,
        /// What the field takes, for example `"a number"`.
        expected: &'static str,
    },
    /// A typed value ([`OptimizerConfig::set_value`]) is of another type than the field.
    Type {
        /// The optimizer.
        optimizer: &'static str,
        /// The field.
        field: String,
        /// What the field takes, for example `"true or false"`.
        expected: &'static str,
        /// The value given.
        found: Value,
    },
    /// A value is out of the field's range ([`StepError::InvalidConfig`]).
    Invalid(StepError),
}

impl fmt::Display for ParseConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseConfigError::UnknownOptimizer { name } => write!(
                f,
                "unknown optimizer {name:?}: expected one of {}",
                OPTIMIZER_NAMES
                    .iter()
                    .chain(&OptimizerConfig::preset_names())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            ParseConfigError::Syntax { item } => {
                write!(f, "expected `field=value`, found {item:?}")
            }
            ParseConfigError::UnknownField {
                optimizer,
                field,
                fields,
            } => write!(
                f,
                "{optimizer} has no field {field:?}: its fields are {}",
                fields.join(", ")
            ),
            ParseConfigError::Duplicate { optimizer, field } => {
                write!(f, "{optimizer}: {field} is given twice")
            }
            ParseConfigError::Value {
                optimizer,
                field,
                value,
                expected,
            } => write!(f, "{optimizer}: {field} = {value:?} is not {expected}"),
            ParseConfigError::Type {
                optimizer,
                field,
                expected,
                found,
            } => {
                let kind = match found {
                    Value::Number(_) | Value::Count(_) => "the number",
                    Value::Bool(_) => "the flag",
                    _ => "the name",
                };
                write!(
                    f,
                    "{optimizer}: {field} must be {expected}, not {kind} {found}"
                )
            }
            ParseConfigError::Invalid(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ParseConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ParseConfigError::Invalid(e) => Some(e),
            _ => None,
        }
    }
}

/// Builds an optimizer from its [`Optimizer::name`] (or any configuration string
/// [`OptimizerConfig`] parses), for command-line trainers and benchmarks. `None` for a string it
/// does not parse; [`OptimizerConfig`]'s `FromStr` says why.
///
/// ```
/// use fusedopt::{OPTIMIZER_NAMES, optimizer_by_name};
/// for name in OPTIMIZER_NAMES {
///     assert_eq!(optimizer_by_name(name).unwrap().name(), name);
/// }
/// assert!(optimizer_by_name("shampoo").is_none());
/// ```
pub fn optimizer_by_name(name: &str) -> Option<Box<dyn Optimizer>> {
    name.parse::<OptimizerConfig>()
        .ok()
        .map(OptimizerConfig::build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_round_trips_through_its_text() {
        for name in OPTIMIZER_NAMES.into_iter().chain(["adamw"]) {
            let config = OptimizerConfig::default_for(name).unwrap();
            let text = config.to_string();
            assert_eq!(text.parse::<OptimizerConfig>(), Ok(config), "{text}");
        }
    }

    #[test]
    fn odd_values_round_trip_exactly() {
        let config = OptimizerConfig::Adam(AdamConfig {
            lr: 1.0 / 3.0,
            beta2: 0.95,
            eps: f32::MIN_POSITIVE,
            amsgrad: true,
            eps_mode: EpsMode::SqrtVHat,
            ..Default::default()
        });
        assert_eq!(config.to_string().parse::<OptimizerConfig>(), Ok(config));
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let err = |s: &str| s.parse::<OptimizerConfig>().unwrap_err();
        assert_eq!(
            err("shampoo:lr=1"),
            ParseConfigError::UnknownOptimizer {
                name: "shampoo".into()
            }
        );
        assert!(matches!(err("adam:lr"), ParseConfigError::Syntax { item } if item == "lr"));
        assert!(
            matches!(err("sgd:momentum=0.9"), ParseConfigError::UnknownField { optimizer: "sgd", field, .. } if field == "momentum")
        );
        assert!(
            matches!(err("adam:lr=1e-3,lr=2e-3"), ParseConfigError::Duplicate { field, .. } if field == "lr")
        );
        assert!(
            matches!(err("adam:amsgrad=yes"), ParseConfigError::Value { field, expected: "true or false", .. } if field == "amsgrad")
        );
        assert!(matches!(
            err("rmsprop:decay_rate=2"),
            ParseConfigError::Invalid(StepError::InvalidConfig {
                field: "decay_rate",
                ..
            })
        ));
        let message = err("sgd:beta1=0.9").to_string();
        assert!(
            message.contains("beta1") && message.contains("lr, weight_decay, maximize"),
            "{message}"
        );
    }

    #[test]
    fn spaces_and_an_empty_override_list_are_fine() {
        let config: OptimizerConfig = " momentum : lr = 0.5 , momentum=0.5 ".parse().unwrap();
        assert_eq!(
            config,
            OptimizerConfig::Momentum(MomentumConfig {
                lr: 0.5,
                momentum: 0.5,
                ..Default::default()
            })
        );
        assert_eq!(
            "sgd:".parse::<OptimizerConfig>(),
            Ok(OptimizerConfig::Sgd(SgdConfig::default()))
        );
    }

    #[test]
    fn a_failed_set_changes_nothing() {
        let mut config = OptimizerConfig::default_for("adam").unwrap();
        assert!(config.set("beta1", "lots").is_err());
        assert_eq!(config, OptimizerConfig::default_for("adam").unwrap());
    }
}
