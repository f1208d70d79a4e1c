//! Text ↔ token ids with Hugging Face `tokenizers`: from `tokenizer.json`, or built from GGUF
//! metadata by candle's `TokenizerFromGguf`.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{PreTokenizerWrapper, Tokenizer};

use crate::error::{Error, Result};

/// Byte ranges `(start, end)` of tokens in a text.
pub(crate) type ByteRanges = Vec<(usize, usize)>;

pub struct TextTokenizer {
    inner: Tokenizer,
    /// Where it came from (tokenizer.json or the GGUF file), for error messages.
    pub source: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("source", &self.source).finish()
    }
}

impl TextTokenizer {
    pub(crate) fn new(inner: Tokenizer, source: &Path) -> Self {
        TextTokenizer { inner, source: source.to_path_buf() }
    }

    /// From the bytes of a tokenizer.json (read by `load::BaseModel` with the other base files);
    /// `path` names it.
    pub(crate) fn from_json_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let inner =
            Tokenizer::from_bytes(bytes).map_err(|e| Error::input(path, format!("invalid tokenizer.json: {e}")))?;
        Ok(Self::new(inner, path))
    }

    pub(crate) fn from_gguf(path: &Path, content: &gguf_file::Content) -> Result<Self> {
        let mut inner = Tokenizer::from_gguf(content)
            .map_err(|e| Error::input(path, format!("cannot build a tokenizer from the GGUF metadata: {e}")))?;
        let pre = content.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str);
        // candle maps unknown `pre` names to GPT-2's byte-level pre-tokenizer with a prefix
        // space. SmolLM's tokenizer.json splits digits one by one and adds no prefix space.
        if pre == Some("smollm") {
            let seq = Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ]);
            inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(seq)));
        }
        Ok(Self::new(inner, path))
    }

    /// Ids of `text` without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::input(&self.source, format!("tokenizer failed on a text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of `text` without special tokens, with each token's byte range in `text`.
    pub(crate) fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, ByteRanges)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::input(&self.source, format!("tokenizer failed on a text: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::input(&self.source, format!("tokenizer cannot decode: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
