//! Report structures (serde), canonical JSON and terminal summaries.

mod compare;
mod evidence;
mod finite;
pub(crate) mod html;
mod html_image;
mod image;
mod inspect;
mod probe;
mod spectrum;
pub use compare::*;
pub use evidence::*;
pub use image::*;
pub use inspect::*;
pub use probe::*;
pub use spectrum::*;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::named::closed_set;

pub(crate) const SCHEMA_VERSION: u32 = 1;

closed_set! {
    /// What an input file is to the analysis.
    pub enum InputRole ("input role") {
        Adapter = "adapter",
        AdapterConfig = "adapter-config",
        Base = "base",
        Work = "work",
        Control = "control",
        Prompts = "prompts",
        StyleControl = "style-control",
        /// A caption sidecar (`NAME.txt`) of an image work or control.
        Caption = "caption",
        /// A file read through `--tokenizer` (single-file image bases carry no tokenizer): the
        /// tokenizer's files and the configs of the pipeline beside it.
        Tokenizer = "tokenizer",
    }
}

/// One input file, recorded so a third party can check they hold the same bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputFile {
    pub role: InputRole,
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

pub(crate) fn tool() -> Tool {
    Tool { name: "lorascope".into(), version: env!("CARGO_PKG_VERSION").into() }
}

fn sort_keys(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.sort_keys();
            m.values_mut().for_each(sort_keys);
        }
        Value::Array(a) => a.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

/// Refuse a result holding NaN or ±Inf anywhere: JSON would show it as `null` (as if not
/// computed) and the report could not be read back. The error names the field.
pub fn check_finite<T: Serialize + ?Sized>(what: &str, x: &T) -> crate::error::Result<()> {
    match finite::first_non_finite(x) {
        None => Ok(()),
        Some(path) => Err(crate::error::Error::Numeric(format!(
            "the {what} result has a non-finite number (NaN or ±Inf) at {path}; refusing to report it as if it were \
             missing"
        ))),
    }
}

/// JSON with every object's keys sorted, so equal reports are equal bytes.
pub fn to_canonical_json<T: Serialize>(x: &T) -> String {
    let mut v = serde_json::to_value(x).expect("reports serialise");
    sort_keys(&mut v);
    let mut s = crate::shown::json(&serde_json::to_string_pretty(&v).expect("values serialise"));
    s.push('\n');
    s
}

/// One line of JSON with sorted keys (for JSONL streams).
pub fn to_canonical_json_line<T: Serialize>(x: &T) -> String {
    let mut v = serde_json::to_value(x).expect("reports serialise");
    sort_keys(&mut v);
    crate::shown::json(&serde_json::to_string(&v).expect("values serialise"))
}

/// A plain text table with left-aligned columns. Cells may hold names from input files: each
/// is shown on one line with its controls escaped (`shown::inline`), so a cell cannot forge a
/// row or rewrite the terminal.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| crate::shown::inline(c)).collect()).collect();
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push_str(c);
            if i + 1 < cells.len() {
                // Padded by hand: format!'s width argument panics above 65,535 (a cell can be a
                // module name of any length).
                s.extend(std::iter::repeat_n(' ', w[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&header.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    out += &line(&w.iter().map(|n| "-".repeat(*n)).collect::<Vec<_>>());
    for r in &rows {
        out += &line(r);
    }
    out
}

/// Short, human form of a number of values or bytes.
pub(crate) fn human(n: f64) -> String {
    let a = n.abs();
    if a >= 1e9 {
        format!("{:.2}G", n / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        // At most two decimals: 29.160000000000004 is float noise, not precision.
        let s = format!("{n:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_numbers_have_no_float_noise() {
        assert_eq!(super::human(233.28000000000003 / 8.0), "29.16");
        assert_eq!(super::human(432.0), "432");
        assert_eq!(super::human(54.0), "54");
        assert_eq!(super::human(0.5), "0.5");
        assert_eq!(super::human(4665.6), "4.7k");
        assert_eq!(super::human(1_425_308.0), "1.43M");
    }
}
