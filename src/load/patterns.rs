//! PEFT's `rank_pattern` and `alpha_pattern`: module-name keys read as regular expressions the
//! way PEFT reads them, within limits a hostile config cannot exhaust.
//!
//! Source: peft `utils/other.py` `get_pattern_key` — the first key, in the config's order, for
//! which `re.match(rf"(.*\.)?({key})$", name)` succeeds, else the name itself, which is then
//! looked up exactly (`rank_pattern.get(key, r)`, peft `tuners/lora/model.py`). lorascope takes
//! an exact key first and the first matching pattern after; the two differ only when a module
//! has an exact key and an earlier key's pattern matches it too.
//!
//! PEFT's engine is Python's `re`, which has look-around and backreferences; the `regex` crate
//! has neither. A key `regex` compiles is matched by `regex` (linear time); any other key by
//! `fancy-regex` (a backtracking engine with `re`'s extensions), under a backtracking limit. A
//! key neither engine compiles, or whose evaluation hits a limit, refuses the adapter: reading it
//! as "no match" would silently change ΔW's scale.
//!
//! Python `re` syntax that `fancy-regex` reads differently, as far as known:
//! - refused here (see [`python_divergence`]): `\N{NAME}` (a named character in Python), and a
//!   `[` or a doubled `&&`, `--`, `~~` inside a character class (literal characters in Python,
//!   a nested class or a set operation here; Python warns about them);
//! - octal escapes `\141` are backreferences here and fail to compile (refused);
//! - `$` also matches before a final `\n` in Python, not here: names differ only if a module
//!   name ends with a newline, which no model module has;
//! - an inline global flag `(?i)` not at the start: an error in Python ≥ 3.11, global in older
//!   Pythons, and in effect to the end of the key here (the wrapper's prefix `(.*\.)?` is not
//!   affected by case, so the result agrees for `(?i)`);
//! - variable-width look-behind `(?<=a+)` and a backreference to a group still open (`\2`,
//!   which is the key's own wrapper group) are errors in Python (PEFT could not load the
//!   adapter) but compile here, the latter never matching;
//! - `\w`, `\d`, `\b` are Unicode in both, with small differences in which code points count as
//!   word characters; module names are ASCII;
//! - syntax only this side has (`\p{L}`, `\x{61}`; `[[:alpha:]]` is refused above) is an
//!   error in Python, so PEFT could not load such a config while lorascope evaluates it.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Most keys `rank_pattern` and `alpha_pattern` may hold together in the configs one adapter
/// reads (PEFT's `adapter_config.json`, or every component of diffusers'
/// `lora_adapter_metadata`). Every key is compiled, in a few milliseconds at most each (bounded
/// by [`MAX_PATTERN_PROGRAM`]). PEFT's EVA initialisation writes one exact key per module into
/// both maps: 2 × 882 for a 126-layer llama.
pub(crate) const MAX_PATTERN_KEYS: usize = 2048;

/// Longest key, in bytes. Real keys are module names or short expressions (≈ 100 bytes); an
/// alternation of every layer of a large model stays well below this.
pub(crate) const MAX_PATTERN_LEN: usize = 512;

/// Largest compiled form of one key, in bytes (the `regex` size limit and `fancy-regex`'s
/// delegate limits; `regex`'s own default is 10 MiB). `\w+\.\w+\.\w+` (Unicode classes) needs
/// about 150 KiB.
pub(crate) const MAX_PATTERN_PROGRAM: usize = 256 * 1024;

/// Most backtracking steps one evaluation of a look-around or backreference key may take (about
/// 0.4 ms); a key that needs more refuses the adapter. Real look-around keys on module names of
/// 150 characters take well under 1,000.
pub(crate) const MAX_PATTERN_BACKTRACK: usize = 20_000;

/// Most evaluations of look-around or backreference keys (the backtracking engine) for one
/// adapter: with [`MAX_PATTERN_BACKTRACK`], at most 1.6·10⁸ steps, a few seconds.
pub(crate) const MAX_BACKTRACKING_EVALUATIONS: usize = 8192;

/// Most (key, module) evaluations for one adapter, of either engine (an evaluation of a
/// `regex` key takes about a microsecond). An exact key costs none; a diffusers adapter of 700
/// modules with one key per module needs about 250,000.
pub(crate) const MAX_PATTERN_EVALUATIONS: usize = 1 << 20;

/// One adapter's count of pattern evaluations, shared by all the configs it reads.
#[derive(Debug, Default)]
pub(crate) struct PatternWork {
    evaluations: AtomicUsize,
    backtracking: AtomicUsize,
}

impl PatternWork {
    fn count(&self, backtracking: bool) -> Result<(), String> {
        let n = self.evaluations.fetch_add(1, Ordering::Relaxed) + 1;
        if n > MAX_PATTERN_EVALUATIONS {
            return Err(format!(
                "matching its keys against the module names needs more than {MAX_PATTERN_EVALUATIONS} evaluations \
                 (limit MAX_PATTERN_EVALUATIONS)"
            ));
        }
        if backtracking {
            let n = self.backtracking.fetch_add(1, Ordering::Relaxed) + 1;
            if n > MAX_BACKTRACKING_EVALUATIONS {
                return Err(format!(
                    "matching its look-around or backreference keys needs more than {MAX_BACKTRACKING_EVALUATIONS} \
                     evaluations (limit MAX_BACKTRACKING_EVALUATIONS)"
                ));
            }
        }
        Ok(())
    }
}

/// PEFT's `rank_pattern` or `alpha_pattern`: keys in file order, each compiled once when the
/// config is read ([`Patterns::compile`]). Entries whose value has the wrong type are dropped.
#[derive(Debug, Clone)]
pub struct Patterns<T> {
    entries: Vec<Pattern<T>>,
}

#[derive(Debug, Clone)]
struct Pattern<T> {
    key: String,
    /// `None` until compiled, and for keys after one that could not be.
    matcher: Option<Matcher>,
    value: T,
}

/// A compiled key, wrapped as PEFT wraps it: `^(.*\.)?(key)$`, the same groups, so that
/// backreferences in the key count groups as Python does.
#[derive(Debug, Clone)]
enum Matcher {
    Linear(regex::Regex),
    Backtracking(fancy_regex::Regex),
}

impl Matcher {
    fn new(key: &str) -> Result<Self, String> {
        if key.len() > MAX_PATTERN_LEN {
            return Err(format!("is {} bytes long (limit MAX_PATTERN_LEN = {MAX_PATTERN_LEN})", key.len()));
        }
        if let Some(what) = python_divergence(key) {
            return Err(format!("uses {what}, which Python's re (PEFT's engine) reads differently"));
        }
        let wrapped = format!(r"^(.*\.)?({key})$");
        let linear = regex::RegexBuilder::new(&wrapped)
            .size_limit(MAX_PATTERN_PROGRAM)
            .dfa_size_limit(MAX_PATTERN_PROGRAM)
            .build();
        match linear {
            Ok(re) => Ok(Matcher::Linear(re)),
            // Too large for `regex` is too large for `fancy-regex`, which hands the same
            // expression to `regex`.
            Err(regex::Error::CompiledTooBig(_)) => {
                Err(format!("compiles to more than {MAX_PATTERN_PROGRAM} bytes (limit MAX_PATTERN_PROGRAM)"))
            }
            Err(_) => fancy_regex::RegexBuilder::new(&wrapped)
                .backtrack_limit(MAX_PATTERN_BACKTRACK)
                .delegate_size_limit(MAX_PATTERN_PROGRAM)
                .delegate_dfa_size_limit(MAX_PATTERN_PROGRAM)
                .build()
                .map(Matcher::Backtracking)
                .map_err(|e| format!("is not a regular expression lorascope can evaluate: {e}")),
        }
    }

    fn is_match(&self, name: &str, work: &PatternWork) -> Result<bool, String> {
        work.count(matches!(self, Matcher::Backtracking(_)))?;
        match self {
            Matcher::Linear(re) => Ok(re.is_match(name)),
            Matcher::Backtracking(re) => re.is_match(name).map_err(|e| match e {
                fancy_regex::Error::RuntimeError(fancy_regex::RuntimeError::BacktrackLimitExceeded) => format!(
                    "needs more than {MAX_PATTERN_BACKTRACK} backtracking steps on module {name} \
                     (limit MAX_PATTERN_BACKTRACK)"
                ),
                other => format!("could not be evaluated on module {name}: {other}"),
            }),
        }
    }
}

/// Syntax that Python's `re` reads one way and `regex`/`fancy-regex` another, without an error
/// on either side: a key using it is refused rather than matched with the other meaning.
fn python_divergence(key: &str) -> Option<&'static str> {
    let mut chars = key.chars().peekable();
    let mut in_class = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let escaped = chars.next();
                if escaped == Some('N') {
                    return Some(r"a \N escape");
                }
            }
            '[' if in_class => return Some("a '[' inside a character class"),
            '[' => {
                in_class = true;
                // A leading `^` negates; a `]` right after the opening (or the `^`) is literal
                // in both.
                if chars.peek() == Some(&'^') {
                    chars.next();
                }
                if chars.peek() == Some(&']') {
                    chars.next();
                }
            }
            ']' if in_class => in_class = false,
            '&' | '-' | '~' if in_class && chars.peek() == Some(&c) => {
                return Some("a doubled '&&', '--' or '~~' inside a character class")
            }
            _ => {}
        }
    }
    None
}

impl<T> Default for Patterns<T> {
    fn default() -> Self {
        Patterns { entries: vec![] }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Patterns<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let Value::Object(map) = Value::deserialize(d)? else {
            return Ok(Patterns::default());
        };
        let entries = map
            .into_iter()
            .filter_map(|(key, v)| Some(Pattern { key, matcher: None, value: serde_json::from_value(v).ok()? }))
            .collect();
        Ok(Patterns { entries })
    }
}

impl<T> Patterns<T> {
    /// Compile every key, stopping at the first that cannot be, which the error names.
    pub(crate) fn compile(&mut self) -> Result<(), String> {
        for p in &mut self.entries {
            p.matcher = Some(Matcher::new(&p.key).map_err(|why| format!("key {:?} {why}", p.key))?);
        }
        Ok(())
    }

    /// The value for a module: an exact key first, then the first key in file order whose
    /// pattern matches the whole name or a dotted suffix of it. An error names the key that
    /// could not be evaluated, or the limit the evaluations reached.
    pub(crate) fn get(&self, module: &str, work: &PatternWork) -> Result<Option<&T>, String> {
        if let Some(p) = self.entries.iter().find(|p| p.key == module) {
            return Ok(Some(&p.value));
        }
        for p in &self.entries {
            let Some(m) = &p.matcher else {
                return Err(format!("key {:?} was not compiled", p.key));
            };
            if m.is_match(module, work).map_err(|why| format!("key {:?} {why}", p.key))? {
                return Ok(Some(&p.value));
            }
        }
        Ok(None)
    }
}

/// The number of `rank_pattern` and `alpha_pattern` keys in a config object (before any is
/// compiled), so that a config holding too many is refused without compiling them.
pub(crate) fn count_keys(config: &serde_json::Map<String, Value>) -> usize {
    ["rank_pattern", "alpha_pattern"].iter().filter_map(|f| config.get(*f)?.as_object().map(|m| m.len())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(key: &str) -> Result<Matcher, String> {
        Matcher::new(key)
    }

    fn matches(key: &str, name: &str) -> bool {
        matcher(key).unwrap().is_match(name, &PatternWork::default()).unwrap()
    }

    #[test]
    fn keys_match_a_dotted_suffix_as_peft_wraps_them() {
        // re.match(r"(.*\.)?(q_proj)$", name) in Python.
        assert!(matches("q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(!matches("q_proj", "model.layers.0.self_attn.xq_proj"));
        assert!(matches("layers\\.[0-9]+\\.mlp\\..*", "model.layers.3.mlp.up_proj"));
        // An alternation stays inside the key's group: `a|b` does not match "x.ab".
        assert!(!matches("a|b", "x.ab"));
        assert!(matches("a|b", "x.b"));
    }

    #[test]
    fn look_around_and_backreferences_are_evaluated() {
        assert!(matches!(matcher("(?=.)(.*)").unwrap(), Matcher::Backtracking(_)));
        assert!(matches("(?=.)(.*)", "model.layers.0.mlp.up_proj"));
        assert!(matches("(?!.*lm_head).*_proj", "model.layers.0.mlp.up_proj"));
        assert!(!matches("(?!.*lm_head).*", "lm_head"));
        assert!(matches("(?<=self_attn\\.)q_proj", "model.layers.0.self_attn.q_proj"));
        // Group 1 is PEFT's prefix `(.*\.)`, group 2 the key: `\1` is the prefix, as in Python.
        assert!(matches("a\\1", "x.ax."));
        assert!(!matches("a\\1", "x.a"));
        // Python reads `x{b` as literal characters and `{,2}` as {0,2}; so does fancy-regex.
        assert!(matches("x{b", "m.x{b"));
        assert!(matches("a{,2}", "m.aa"));
    }

    #[test]
    fn keys_read_differently_by_python_or_beyond_the_limits_are_errors() {
        for (key, says) in [
            ("q_proj(", "not a regular expression"),
            ("[[:alpha:]_.]+", "inside a character class"),
            ("[a-z&&[^b]]", "inside a character class"),
            ("[a--b]", "doubled"),
            (r"\N{LATIN SMALL LETTER A}", r"\N escape"),
            (r"\141", "not a regular expression"),
            (r"\w{1000}", "MAX_PATTERN_PROGRAM"),
        ] {
            let err = matcher(key).err().unwrap_or_else(|| panic!("{key} compiled"));
            assert!(err.contains(says), "{key}: {err}");
        }
        let long = "a".repeat(MAX_PATTERN_LEN + 1);
        assert!(matcher(&long).err().unwrap().contains("MAX_PATTERN_LEN"));
        assert!(matcher(&"a".repeat(MAX_PATTERN_LEN)).is_ok());
        // A class with a literal `]` first and an escaped `[` is not a nested class.
        assert!(matcher(r"[]a][\[b]").is_ok());
    }

    #[test]
    fn evaluations_stop_at_their_limits() {
        let name = "a".repeat(40);
        let err = matcher("(?=a)(a|aa)*c").unwrap().is_match(&name, &PatternWork::default()).unwrap_err();
        assert!(err.contains("MAX_PATTERN_BACKTRACK"), "{err}");
        let work = PatternWork::default();
        let fancy = matcher("(?=x)x").unwrap();
        for _ in 0..MAX_BACKTRACKING_EVALUATIONS {
            fancy.is_match("m.x", &work).unwrap();
        }
        assert!(fancy.is_match("m.x", &work).unwrap_err().contains("MAX_BACKTRACKING_EVALUATIONS"));
        let work = PatternWork::default();
        work.evaluations.store(MAX_PATTERN_EVALUATIONS - 1, Ordering::Relaxed);
        let plain = matcher("x").unwrap();
        assert!(plain.is_match("m.x", &work).unwrap());
        assert!(plain.is_match("m.x", &work).unwrap_err().contains("MAX_PATTERN_EVALUATIONS"));
    }
}
