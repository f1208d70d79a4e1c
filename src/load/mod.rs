//! Loading: safe opening of every input file (fsguard), safetensors and GGUF reading, adapter
//! formats, name mapping to base modules.

mod adapter;
pub mod base;
mod families;
mod formats;
pub(crate) mod fsguard;
mod gguf_check;
pub(crate) mod hashes;
pub mod images;
pub(crate) mod metadata;
mod module;
pub mod names;
mod patterns;
mod safeloras;
mod tensor;
pub(crate) mod tensorfile;
pub mod works;
pub(crate) mod write;

pub use adapter::{Adapter, LoadOptions};
pub(crate) use base::StoredMatrix;
pub use base::{BaseKind, BaseModel};
pub use families::Family;
pub use formats::{detect_format, Format, LoraConfig};
pub use fsguard::Tree;
pub use hashes::FileDigest;
pub use module::{Delta, KronPart, LoraModule, Magnitude, ModuleKind, NormAxis};
pub use tensor::TensorRef;
pub use tensorfile::TensorFile;
