//! The integration tests, as one test binary: every module below was its own binary, and each
//! compiled the optimizers' generic kernels again (most of a CI run's time). `alloc.rs` stays
//! separate: it installs its own global allocator.

mod common;

mod candle;
mod convergence;
mod errors;
mod feed;
mod formats;
mod half;
mod hygiene;
mod many;
mod options;
mod parity;
mod partial;
mod quality;
mod reference;
mod state;
mod state_access;
mod sweeps;
mod trust;
