//! One value per model: the probe computes every number under the base and the merged model,
//! and the base is the reference that the merged model's numbers are read against.

use crate::error::Result;

/// The same quantity under the base and under the merged model.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pair<T> {
    pub base: T,
    pub merged: T,
}

/// The models' names as they appear in progress stages and in `SpanSource::model`.
pub(crate) const MODEL_NAMES: Pair<&str> = Pair { base: "base", merged: "merged" };

impl<T> Pair<T> {
    pub(crate) fn as_ref(&self) -> Pair<&T> {
        Pair { base: &self.base, merged: &self.merged }
    }

    pub(crate) fn map<U>(self, mut f: impl FnMut(T) -> U) -> Pair<U> {
        Pair { base: f(self.base), merged: f(self.merged) }
    }

    pub(crate) fn zip<U>(self, other: Pair<U>) -> Pair<(T, U)> {
        Pair { base: (self.base, other.base), merged: (self.merged, other.merged) }
    }

    /// `f(name, value)` for the base, then for the merged model: progress stages are reported,
    /// and the first error returned, in that order.
    pub(crate) fn try_map<U>(self, mut f: impl FnMut(&'static str, T) -> Result<U>) -> Result<Pair<U>> {
        let base = f(MODEL_NAMES.base, self.base)?;
        let merged = f(MODEL_NAMES.merged, self.merged)?;
        Ok(Pair { base, merged })
    }
}

impl<T> Pair<Vec<T>> {
    /// Entry `i` of a list kept per model (per subject, per window, per prompt).
    pub(crate) fn at(&self, i: usize) -> Pair<&T> {
        Pair { base: &self.base[i], merged: &self.merged[i] }
    }
}
