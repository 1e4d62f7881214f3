//! The six optimizers, one file each: configuration, per-step scalars, the element-wise kernel
//! (one generic body that is both the scalar reference and the SIMD kernel) and unit tests.

pub mod adagrad;
pub mod adam;
pub mod momentum;
pub mod nag;
pub mod rmsprop;
pub mod sgd;

use crate::Optimizer;

/// The names of the six optimizers, as [`Optimizer::name`] returns them.
pub const OPTIMIZER_NAMES: [&str; 6] = ["sgd", "momentum", "nag", "adagrad", "rmsprop", "adam"];

/// Builds an optimizer with its default configuration from its [`Optimizer::name`], for
/// command-line trainers and benchmarks. `None` for an unknown name.
///
/// ```
/// use fusedopt::{OPTIMIZER_NAMES, optimizer_by_name};
/// for name in OPTIMIZER_NAMES {
///     assert_eq!(optimizer_by_name(name).unwrap().name(), name);
/// }
/// assert!(optimizer_by_name("lion").is_none());
/// ```
pub fn optimizer_by_name(name: &str) -> Option<Box<dyn Optimizer>> {
    Some(match name {
        "sgd" => Box::new(sgd::Sgd::new(Default::default())),
        "momentum" => Box::new(momentum::Momentum::new(Default::default())),
        "nag" => Box::new(nag::Nag::new(Default::default())),
        "adagrad" => Box::new(adagrad::AdaGrad::new(Default::default())),
        "rmsprop" => Box::new(rmsprop::RmsProp::new(Default::default())),
        "adam" => Box::new(adam::Adam::new(Default::default())),
        _ => return None,
    })
}
