//! lorascope: LoRA-adapter forensics.
//!
//! The pipeline runs one way: [`load`] reads an adapter (any format) and optionally its base
//! model into normalised [`load::LoraModule`]s; [`linalg`] and [`spectral`] measure what each
//! module adds without forming dense deltas; [`report`] turns the results into canonical JSON
//! and human summaries.

// Numeric kernels index several arrays with one loop variable; iterators would hide that.
#![allow(clippy::needless_range_loop)]

pub mod error;
/// Test-file generators: for tests, benches, examples and fuzzing only (feature `fixtures`).
#[cfg(feature = "fixtures")]
pub mod fixtures;
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod linalg;
pub mod load;
pub mod model;
pub(crate) mod named;
pub mod pipeline;
pub mod probe;
pub mod report;
pub mod rng;
pub mod scan;
pub mod spectral;

pub use error::{Error, Result};
pub use load::{Adapter, BaseModel, LoadOptions, LoraModule};
pub use pipeline::{inspect, open, probe, spectrum, ProbeInputs};
