//! The CLIP tokenizer of SD pipelines, built with Hugging Face `tokenizers` the way
//! transformers' `CLIPConverter` (convert_slow_tokenizer.py) builds `CLIPTokenizerFast` from
//! vocab.json and merges.txt: NFC, whitespace runs to one space, lowercase; split on CLIP's
//! pattern (`'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`, everything else
//! removed), byte-level; BPE with end-of-word suffix `</w>`. A tokenizer.json in the folder is
//! used instead when present. Ids are laid out as SD pipelines ask for them
//! (`padding="max_length", truncation=True`): BOS, at most `max_length − 2` tokens, EOS, then
//! the pad token (EOS in SD 1.x's tokenizer, "!" in SD 2.x's) up to `max_length`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// transformers' `CLIPConverter` pre-tokenizer pattern.
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The tokenizer files of one folder, by file name: path and bytes as read.
pub(crate) type TokenizerFiles = BTreeMap<String, (PathBuf, Vec<u8>)>;

pub(crate) struct ClipTokenizer {
    inner: Tokenizer,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    /// Ids per caption, special tokens and padding included.
    pub max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("max_length", &self.max_length).finish()
    }
}

/// A special token named in tokenizer_config.json or special_tokens_map.json: a string, or
/// an object with `content`.
fn special(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

fn json(path: &Path, bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| Error::read(path, "invalid JSON", e))
}

impl ClipTokenizer {
    /// From the files of a tokenizer folder `dir`; `positions` is the text encoder's
    /// `max_position_embeddings`, the longest `max_length` can be.
    pub fn from_files(dir: &Path, files: &TokenizerFiles, positions: usize) -> Result<Self> {
        let inner =
            match (files.get("tokenizer.json"), files.get("vocab.json"), files.get("merges.txt")) {
                (Some((p, bytes)), _, _) => {
                    let mut t = Tokenizer::from_bytes(bytes)
                        .map_err(|e| Error::input(p, format!("not a usable tokenizer.json: {e}")))?;
                    // Padding and truncation are laid out below, as the pipeline asks for them.
                    t.with_padding(None);
                    t.with_truncation(None).map_err(|e| Error::input(p, format!("truncation settings: {e}")))?;
                    t
                }
                (None, Some(v), Some(m)) => Self::build(v, m)?,
                _ => return Err(Error::input(
                    dir,
                    "no CLIP tokenizer here: a tokenizer folder holds vocab.json and merges.txt (or tokenizer.json)",
                )),
            };
        let mut settings = serde_json::Map::new();
        // tokenizer_config.json wins over special_tokens_map.json, as in transformers.
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            if let Some((p, bytes)) = files.get(name) {
                match json(p, bytes)? {
                    Value::Object(o) => settings.extend(o),
                    _ => return Err(Error::input(p, "expected a JSON object")),
                }
            }
        }
        let id = |key: &str, default: &str| -> Result<u32> {
            let tok = special(settings.get(key)).unwrap_or_else(|| default.to_string());
            inner
                .token_to_id(&tok)
                .ok_or_else(|| Error::input(dir, format!("the {key} {tok:?} is not in the tokenizer's vocabulary")))
        };
        let (bos, eos) = (id("bos_token", "<|startoftext|>")?, id("eos_token", "<|endoftext|>")?);
        // transformers' CLIPTokenizer pads with "<|endoftext|>" unless told otherwise.
        let pad = id("pad_token", "<|endoftext|>")?;
        // `model_max_length` when the config gives one the text encoder can take, else its
        // position count (transformers' sentinel for "no limit" is 1e30).
        let max_length = settings
            .get("model_max_length")
            .and_then(Value::as_f64)
            .filter(|m| *m >= 2.0 && *m <= positions as f64)
            .map_or(positions, |m| m as usize);
        Ok(ClipTokenizer { inner, bos, eos, pad, max_length })
    }

    fn build(vocab: &(PathBuf, Vec<u8>), merges: &(PathBuf, Vec<u8>)) -> Result<Tokenizer> {
        let (vp, vb) = vocab;
        let map: HashMap<String, u32> =
            serde_json::from_slice(vb).map_err(|e| Error::read(vp, "not a vocabulary (token → id JSON object)", e))?;
        let (mp, mb) = merges;
        let text = std::str::from_utf8(mb).map_err(|e| Error::read(mp, "merges.txt is not UTF-8", e))?;
        let mut pairs = vec![];
        for (i, line) in text.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let mut it = line.split(' ');
            match (it.next(), it.next(), it.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                    pairs.push((a.to_string(), b.to_string()))
                }
                _ => {
                    return Err(Error::input(
                        mp,
                        format!("line {}: a merge is two tokens separated by one space", i + 1),
                    ))
                }
            }
        }
        let v: Vocab = map.into_iter().collect();
        let bpe = BPE::builder()
            .vocab_and_merges(v, pairs)
            .unk_token("<|endoftext|>".into())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false)
            .build()
            .map_err(|e| Error::input(mp, format!("vocab.json and merges.txt do not fit together: {e}")))?;
        let internal = |e: tokenizers::Error| Error::Internal(format!("CLIP tokenizer pattern: {e}"));
        let normalizer = NormSeq::new(vec![
            NormalizerWrapper::from(NFC),
            Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
                .map_err(internal)?
                .into(),
            Lowercase.into(),
        ]);
        let pre = PreSeq::new(vec![
            PreTokenizerWrapper::from(
                Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
                    .map_err(internal)?,
            ),
            ByteLevel::new(false, true, true).into(),
        ]);
        let mut t = Tokenizer::new(bpe);
        t.with_normalizer(Some(normalizer)).map_err(internal)?;
        t.with_pre_tokenizer(Some(pre));
        // As transformers' added tokens: matched whole in the text, never split by BPE.
        t.add_special_tokens([AddedToken::from("<|startoftext|>", true), AddedToken::from("<|endoftext|>", true)])
            .map_err(internal)?;
        Ok(t)
    }

    /// Token ids of each caption, `max_length` each (see the module doc).
    pub fn encode(&self, captions: &[&str]) -> Result<Vec<Vec<u32>>> {
        captions
            .iter()
            .map(|c| {
                let enc = self
                    .inner
                    .encode(*c, false)
                    .map_err(|e| Error::Runtime { what: "CLIP tokenizer".into(), source: e })?;
                let body = enc.get_ids();
                let keep = body.len().min(self.max_length - 2);
                let mut ids = Vec::with_capacity(self.max_length);
                ids.push(self.bos);
                ids.extend_from_slice(&body[..keep]);
                ids.push(self.eos);
                ids.resize(self.max_length, self.pad);
                Ok(ids)
            })
            .collect()
    }
}
