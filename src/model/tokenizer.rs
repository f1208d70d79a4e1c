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
    /// The tokens this tokenizer puts in front of a text when asked for its special tokens
    /// (usually BOS, often none), and where that was read.
    pub template: TemplatePrefix,
}

/// What a tokenizer adds in front of every text, as transformers' `tokenizer(text)` and
/// llama.cpp's `llama_tokenize(…, add_special=true)` do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplatePrefix {
    pub ids: Vec<u32>,
    pub source: &'static str,
}

/// A text every tokenizer can encode, to see what its post-processor adds.
const PROBE_TEXT: &str = "the probe";

/// The template prefix of a tokenizer.json: the ids `encode(text, add_special_tokens=true)`
/// puts before those of `encode(text, false)` (its post-processor, e.g. Llama's `<s> $A`).
/// Tokens it appends after the text (an EOS) are not used: the probe scores texts, not
/// documents' ends.
fn json_template(t: &Tokenizer) -> TemplatePrefix {
    let ids = |special: bool| t.encode(PROBE_TEXT, special).map(|e| e.get_ids().to_vec()).unwrap_or_default();
    let (with, without) = (ids(true), ids(false));
    let at = (0..=with.len().saturating_sub(without.len())).find(|&i| with[i..].starts_with(&without));
    match at {
        Some(i) if !without.is_empty() => {
            TemplatePrefix { ids: with[..i].to_vec(), source: "tokenizer.json post-processor" }
        }
        _ => TemplatePrefix { ids: vec![], source: "tokenizer.json post-processor (output not understood: none used)" },
    }
}

/// The template prefix of a GGUF tokenizer: BOS when `tokenizer.ggml.add_bos_token` says so;
/// without that key, llama.cpp's defaults (`llama-vocab.cpp`): SentencePiece (`llama`)
/// vocabularies add BOS, BPE (`gpt2`) ones only for the Llama 3 pre-tokenizer.
fn gguf_template(c: &gguf_file::Content) -> TemplatePrefix {
    let get = |k: &str| c.metadata.get(k);
    let bos = get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok());
    let text = |k: &str| get(k).and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let (add, source) = match get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()) {
        Some(add) => (add, "GGUF tokenizer.ggml.add_bos_token"),
        None => {
            let add = match text("tokenizer.ggml.model").as_str() {
                "llama" => true,
                "gpt2" => matches!(text("tokenizer.ggml.pre").as_str(), "llama3" | "llama-bpe"),
                _ => false,
            };
            (add, "llama.cpp's default for this GGUF tokenizer (no tokenizer.ggml.add_bos_token)")
        }
    };
    TemplatePrefix { ids: if add { bos.into_iter().collect() } else { vec![] }, source }
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("source", &self.source).finish()
    }
}

impl TextTokenizer {
    pub(crate) fn new(inner: Tokenizer, source: &Path) -> Self {
        let template = json_template(&inner);
        TextTokenizer { inner, source: source.to_path_buf(), template }
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
        Ok(TextTokenizer { inner, source: path.to_path_buf(), template: gguf_template(content) })
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
