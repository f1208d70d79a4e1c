//! The one-way layering of docs/architecture.md, checked from the source: a module may import
//! only modules of a lower layer (or itself). Every `crate::name` path and every `super::` that
//! climbs out of a top-level module is resolved to the top-level module it names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level modules and their layer, lowest first. Modules sharing a layer may not import each
/// other. `fixtures` and `fuzzing` are feature-gated helpers for tests and fuzzing: they may use
/// anything, and nothing may use them.
const LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("rng", 0),
    ("named", 0),
    ("shown", 0),
    ("order", 0),
    ("linalg", 1),
    ("load", 2),
    ("spectral", 3),
    ("model", 4),
    ("probe", 5),
    ("report", 6),
    ("scan", 6),
    ("pipeline", 7),
    ("fuzzing", 8),
    ("fixtures", 8),
];

fn layer(name: &str) -> Option<u32> {
    LAYERS.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a source file: src/load/module.rs → [load, module]; src/load/mod.rs →
/// [load]; src/lib.rs → [].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// Top-level modules a file refers to: `crate::x`, `crate::{x, y::z}`, and `super::` chains
/// that leave the file's top-level module. Comments are skipped.
fn references(path: &[String], text: &str) -> Vec<String> {
    let mut out = vec![];
    // Inline modules (`mod tests {`) add a level that `super::` climbs first.
    let mut inline = 0;
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let t = code.trim();
        if t.ends_with('{') && (t.starts_with("mod ") || t.starts_with("pub mod ") || t.starts_with("pub(crate) mod "))
        {
            inline += 1;
        }
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + 7..];
            if let Some(group) = after.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                out.extend(inner.split(',').map(|p| ident_at(p.trim()).to_string()).filter(|s| !s.is_empty()));
            } else {
                out.push(ident_at(after).to_string());
            }
            rest = after;
        }
        let mut rest = code;
        while let Some(i) = rest.find("super::") {
            // Count the chain: super::super::x climbs two levels.
            let mut ups = 0;
            let mut tail = &rest[i..];
            while let Some(t) = tail.strip_prefix("super::") {
                ups += 1;
                tail = t;
            }
            // A file's own module is `path`; `super` is its parent. Leaving the top level means
            // the chain reaches the crate root.
            if ups >= path.len() + inline {
                let name = ident_at(tail).to_string();
                if !name.is_empty() {
                    out.push(name);
                }
            }
            rest = tail;
        }
    }
    out
}

/// Every import that runs upward or sideways, as `file: a (layer) imports b (layer)`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = vec![];
    rust_files(src, &mut files);
    let mut bad = BTreeMap::new();
    for f in files {
        let path = module_path(src, &f);
        let Some(own) = path.first() else { continue }; // lib.rs and main.rs sit on top
        let Some(own_layer) = layer(own) else {
            bad.insert(f.display().to_string(), format!("top-level module {own} has no layer in tests/layering.rs"));
            continue;
        };
        let text = std::fs::read_to_string(&f).unwrap();
        for r in references(&path, &text) {
            if &r == own {
                continue;
            }
            match layer(&r) {
                Some(l) if l < own_layer => {}
                Some(l) => {
                    bad.insert(
                        format!("{} → {r}", f.display()),
                        format!("{own} (layer {own_layer}) imports {r} (layer {l})"),
                    );
                }
                // Re-exports at the crate root (Error, Result, Adapter, ...) are leaves' or
                // load's names; anything else unknown is reported.
                None if matches!(r.as_str(), "Error" | "Result") => {}
                None => {
                    bad.insert(format!("{} → {r}", f.display()), format!("{own} imports unknown crate item {r}"));
                }
            }
        }
    }
    bad.into_iter().map(|(k, v)| format!("{k}: {v}")).collect()
}

#[test]
fn no_module_imports_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let v = violations(&src);
    assert!(v.is_empty(), "layering violations (see docs/architecture.md):\n{}", v.join("\n"));
}

/// The check must catch a planted upward import (load → report), a sideways one (scan →
/// report), one through `super::`, and a grouped `crate::{..}` import.
#[test]
fn the_check_catches_planted_upward_imports() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    for (p, text) in [
        ("lib.rs", "pub mod load; pub mod report; pub mod scan; pub mod linalg;"),
        ("linalg/mod.rs", "use crate::{error::Error};\n"),
        ("load/mod.rs", "mod inner;\nuse crate::linalg::Factors; // crate::report in a comment is fine\n"),
        ("load/inner.rs", "use super::super::report::Thing;\n"),
        ("report/mod.rs", "use crate::load::Adapter;\n"),
        ("scan/mod.rs", "use crate::{linalg::X, report::Y};\nfn f() { crate::load::open(); }\n"),
    ] {
        let f = src.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, text).unwrap();
    }
    let v = violations(src);
    let joined = v.join("\n");
    assert_eq!(v.len(), 2, "{joined}");
    assert!(joined.contains("inner.rs → report: load (layer 2) imports report (layer 6)"), "{joined}");
    assert!(joined.contains("scan/mod.rs → report: scan (layer 6) imports report (layer 6)"), "{joined}");
}
