//! The normalised adapter module: every format becomes a `LoraModule` whose `Delta` says how
//! ΔW is built from the stored factors.

use crate::named::closed_set;

use super::tensor::TensorRef;
use crate::error::Error;

closed_set! {
    /// What kind of change a module makes (the adapter algorithm of that module).
    pub enum ModuleKind ("module kind") {
        Lora = "lora",
        Locon = "locon",
        Loha = "loha",
        Lokr = "lokr",
        Full = "full",
        Dora = "dora",
        Ia3 = "ia3",
        Embedding = "embedding",
        Oft = "oft",
        Boft = "boft",
        Glora = "glora",
    }
}

/// One Kronecker factor of LoKr: stored whole, or as a product `a·b` (with an optional Tucker
/// core for conv, in which case `a` is `[r, rows]` and `b` is `[r, cols]`).
#[derive(Debug, Clone)]
pub enum KronPart {
    Full(TensorRef),
    Product { a: TensorRef, b: TensorRef, t: Option<TensorRef> },
}

/// How ΔW is stored. Low-rank kinds never need the dense matrix for their spectrum.
#[derive(Debug, Clone)]
pub enum Delta {
    /// ΔW = scale·up·down. `mid` is a Tucker core `[r, r, kh, kw]` (kohya `lora_mid`).
    /// `transposed`: the stored product is ΔWᵀ (PEFT embeddings and `fan_in_fan_out`).
    LowRank { up: TensorRef, down: TensorRef, mid: Option<TensorRef>, transposed: bool },
    /// ΔW = scale·(w1a·w1b) ⊙ (w2a·w2b); with Tucker cores `t1`, `t2` the `a` factors are
    /// stored `[r, out]`.
    Hadamard {
        w1a: TensorRef,
        w1b: TensorRef,
        w2a: TensorRef,
        w2b: TensorRef,
        t1: Option<TensorRef>,
        t2: Option<TensorRef>,
    },
    /// ΔW = scale·kron(w1, w2), reshaped to the base weight's shape.
    Kronecker { w1: KronPart, w2: KronPart },
    /// ΔW stored whole (LyCORIS `full`, `.diff`).
    Diff { diff: TensorRef, bias: Option<TensorRef> },
    /// A replacement weight (PEFT `modules_to_save`): ΔW = new − W needs the base.
    Replace { weight: TensorRef },
    /// (IA)³: W' = W ⊙ (1 + w) along the input or output axis.
    Ia3 { weight: TensorRef, on_input: bool },
    /// Recognised but not analysed (OFT, BOFT, GLoRA).
    Unsupported { algo: String, tensors: Vec<TensorRef> },
}

pub use crate::linalg::NormAxis;

/// DoRA magnitude: W' = m / ‖W + ΔW‖ · (W + ΔW), the norm taken along `axis`.
#[derive(Debug, Clone)]
pub struct Magnitude {
    pub tensor: TensorRef,
    pub axis: NormAxis,
}

#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The module's name in the adapter file (format prefix and tensor suffix removed).
    pub name: String,
    /// The base model weight this module changes.
    pub base_key: String,
    /// Whether `base_key` was checked against a base model's key set.
    pub resolved: bool,
    pub kind: ModuleKind,
    pub delta: Delta,
    pub magnitude: Option<Magnitude>,
    pub alpha: Option<f64>,
    pub rank: usize,
    pub scale: f64,
    /// Shape of ΔW as the base weight is stored (`[out, in]` or `[out, in, kh, kw]`).
    pub shape: Vec<usize>,
    pub dtype: String,
    /// Number of stored values (all tensors of the module).
    pub params: usize,
    pub tensors: Vec<TensorRef>,
}

impl LoraModule {
    /// ΔW's matrix shape: rows = out, cols = in·kh·kw.
    pub(crate) fn matrix_shape(&self) -> (usize, usize) {
        let out = self.shape.first().copied().unwrap_or(0);
        (out, self.shape.iter().skip(1).product())
    }

    /// Whether ΔW can be built without the base weights.
    pub(crate) fn needs_base(&self) -> bool {
        self.magnitude.is_some() || matches!(self.delta, Delta::Replace { .. } | Delta::Ia3 { .. })
    }

    /// An input error about this module, naming its file.
    pub(crate) fn error(&self, reason: impl std::fmt::Display) -> Error {
        Error::input(self.path(), format!("module {}: {reason}", self.name))
    }

    /// An input error about this module's values (NaN/Inf, extreme magnitudes, overflow).
    pub(crate) fn value_error(&self, reason: impl std::fmt::Display) -> Error {
        Error::Values { path: self.path(), reason: format!("module {}: {reason}", self.name) }
    }

    fn path(&self) -> std::path::PathBuf {
        self.tensors.first().map(|t| t.file.path.clone()).unwrap_or_default()
    }
}
