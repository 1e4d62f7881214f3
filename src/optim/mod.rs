//! The six optimizers, one file each: configuration, per-step scalars, the element-wise kernel
//! (one generic body that is both the scalar reference and the SIMD kernel) and unit tests.

pub mod adagrad;
pub mod adam;
pub mod momentum;
pub mod nag;
pub mod rmsprop;
pub mod sgd;
