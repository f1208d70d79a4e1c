//! lorascope: LoRA-adapter forensics.
//!
//! One-way layers (docs/architecture.md; tests/layering.rs checks them): [`pipeline`] runs each
//! command's stages; [`report`] and [`scan`] hold their structures and rendering; [`probe`]
//! tests the merged model on the works; [`model`] runs llama-family models; [`spectral`] builds
//! and measures ΔW from the stored factors; [`load`] reads and validates every file; [`linalg`]
//! is the maths; [`error`], [`rng`], [`order`] (natural order of names) and [`shown`] (input strings made safe
//! to display) are leaves.

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
pub mod order;
pub mod pipeline;
pub mod probe;
pub mod report;
pub mod rng;
pub mod scan;
pub mod shown;
pub mod spectral;

pub use error::{Error, Result};
pub use load::{Adapter, BaseModel, LoadOptions, LoraModule};
pub use pipeline::{inspect, open, probe, spectrum, ProbeInputs};
