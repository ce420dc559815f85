//! Terminal safety: every string that comes from outside podscope (a
//! process's comm, which any process sets with prctl(PR_SET_NAME), paths,
//! names from CRI, kube-proxy's rule comments, kernel messages) passes
//! through here before a human view prints it, so that none can move the
//! cursor, rewrite the screen, set the window title or fake a line. JSON
//! output never does: serde escapes control characters itself and the
//! values stay exact.
//!
//! Escaped: C0 controls (including newline and tab), DEL, C1 controls and
//! the Unicode bidirectional overrides (which reorder what is shown), as
//! `\xNN` or `\u{NNNN}`; a backslash is doubled so an escaped name cannot
//! pass for a real one. Every other character, non-ASCII included, is kept.

use std::borrow::Cow;

fn needs_escape(c: char) -> bool {
    c.is_control() // C0, DEL, C1
        || c == '\\'
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
}

/// `s` safe to print on one terminal line.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x100 && needs_escape(c) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Escapes every string inside a JSON value (object keys too), for views
/// that render what the agent sent.
pub fn escape_json_strings(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::String(s) => {
            if let Cow::Owned(e) = escape(s) {
                *s = e;
            }
        }
        Value::Array(a) => a.iter_mut().for_each(escape_json_strings),
        Value::Object(o) => {
            let entries = std::mem::take(o);
            for (k, mut val) in entries {
                escape_json_strings(&mut val);
                o.insert(escape(&k).into_owned(), val);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        assert_eq!(escape("nginx: worker"), "nginx: worker");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(escape("café µs → ok"), "café µs → ok");
        assert_eq!(
            escape("\x1b[2J\x1b]0;pwned\x07"),
            "\\x1b[2J\\x1b]0;pwned\\x07"
        );
        assert_eq!(escape("a\nb\tc\rd"), "a\\x0ab\\x09c\\x0dd");
        assert_eq!(escape("\u{7f}\u{9b}31m"), "\\x7f\\x9b31m");
        assert_eq!(escape("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(escape("x\\x1by"), "x\\\\x1by");
    }

    #[test]
    fn json_strings_are_escaped_in_place() {
        let mut v = serde_json::json!({"comm": "\u{1b}[31m", "n": 1, "l": ["\n"], "k\u{7}": true});
        escape_json_strings(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"comm": "\\x1b[31m", "n": 1, "l": ["\\x0a"], "k\\x07": true})
        );
    }
}
