//! Strings from input files made safe to show. A tag name, module name, file name or work id
//! comes from whoever made the file; shown raw, an ANSI escape can rewrite the terminal (turn a
//! "DIFFERS" line into "matches"), a newline can forge a second error line, and a bidi override
//! (U+202E) can mirror the text after it in a terminal or a browser. Every such character is
//! replaced by a visible escape (`\u{202e}`, `\n`), so what a person reads is what the file
//! holds. Sources: Unicode TR #9 (the explicit directional formatting characters) and the
//! "Trojan Source" paper (Boucher & Anderson, 2021) for the bidi controls that matter.

/// Whether `c` must not reach a terminal or a page as itself: C0/C1 controls and DEL, the bidi
/// embedding/override/isolate controls and marks, and the line/paragraph separators.
pub(crate) fn is_hidden_control(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}'
        )
}

fn escape_char(c: char, out: &mut String) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
    }
}

/// One value from an input file, for a single line: every hidden control escaped, newlines too.
pub fn inline(s: &str) -> String {
    escape_where(s, is_hidden_control)
}

/// Text of several lines (a rendered summary, a page): hidden controls escaped, but `\n` kept
/// as the line break it is in the text we wrote ourselves.
pub fn lines(s: &str) -> String {
    escape_where(s, |c| c != '\n' && is_hidden_control(c))
}

fn escape_where(s: &str, hide: impl Fn(char) -> bool) -> String {
    if !s.chars().any(&hide) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if hide(c) {
            escape_char(c, &mut out);
        } else {
            out.push(c);
        }
    }
    out
}

/// JSON text with every hidden control that serde_json leaves raw (bidi controls, U+2028/9, C1)
/// written as a `\uXXXX` escape: the same JSON value, safe bytes on a terminal.
pub fn json(s: &str) -> String {
    if !s.chars().any(|c| c != '\n' && is_hidden_control(c)) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c != '\n' && is_hidden_control(c) {
            // Outside strings serde_json writes only ASCII structure, so these are inside one;
            // every hidden control is in the Basic Multilingual Plane (one \uXXXX).
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_become_visible_escapes() {
        assert_eq!(inline("tag\x1b[2K\rmatches"), "tag\\u{1b}[2K\\rmatches");
        assert_eq!(inline("a\nb"), "a\\nb");
        assert_eq!(inline("work\u{202E}txt.exe"), "work\\u{202e}txt.exe");
        assert_eq!(inline("\u{2067}x\u{2069}"), "\\u{2067}x\\u{2069}");
        assert_eq!(lines("one\ntwo\x07"), "one\ntwo\\u{7}");
        // Ordinary text, accents and CJK pass unchanged.
        assert_eq!(inline("café 水彩 ok"), "café 水彩 ok");
    }

    #[test]
    fn json_escapes_keep_the_value() {
        let v = serde_json::json!({"id": "a\u{202E}b\u{85}c"});
        let text = json(&serde_json::to_string_pretty(&v).unwrap());
        assert!(!text.contains('\u{202E}') && text.contains("\\u202e") && text.contains("\\u0085"));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), v);
    }
}
