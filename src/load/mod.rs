//! Loading: safetensors and GGUF reading, adapter formats, name mapping to base modules.

mod adapter;
pub mod base;
mod formats;
pub mod hashes;
pub mod metadata;
mod module;
pub mod names;
mod tensor;
pub mod tensorfile;
pub mod works;
pub mod write;

pub use adapter::{Adapter, LoadOptions};
pub use base::{BaseKind, BaseModel};
pub use formats::{detect_format, Format, LoraConfig};
pub use module::{Delta, KronPart, LoraModule, Magnitude, ModuleKind, NormAxis};
pub use tensor::TensorRef;
pub use tensorfile::TensorFile;
