//! Text normalisation for deduplication: Unicode NFKC, lower-case, whitespace collapsed, and
//! optionally punctuation removed. Recorded in the manifest so a run can be reproduced.

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Normalization {
    pub nfkc: bool,
    pub lowercase: bool,
    pub collapse_whitespace: bool,
    pub strip_punctuation: bool,
}

impl Default for Normalization {
    fn default() -> Self {
        Normalization { nfkc: true, lowercase: true, collapse_whitespace: true, strip_punctuation: false }
    }
}

impl Normalization {
    pub fn apply(&self, text: &str) -> String {
        // ASCII text is already in NFKC.
        let s: String = if self.nfkc && !text.is_ascii() { text.nfkc().collect() } else { text.to_string() };
        let s = if self.lowercase {
            if s.is_ascii() {
                s.to_ascii_lowercase()
            } else {
                s.to_lowercase()
            }
        } else {
            s
        };
        let s: String = if self.strip_punctuation {
            s.chars().filter(|c| !c.is_ascii_punctuation() && !is_unicode_punct(*c)).collect()
        } else {
            s
        };
        if self.collapse_whitespace {
            let mut out = String::with_capacity(s.len());
            for w in s.split_whitespace() {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(w);
            }
            out
        } else {
            s
        }
    }
}

fn is_unicode_punct(c: char) -> bool {
    matches!(c, '\u{2010}'..='\u{2027}' | '\u{3000}'..='\u{303F}' | '«' | '»' | '¿' | '¡')
}

/// Words for shingling: lower-cased, punctuation removed (as datatrove's simplify_text does).
pub fn words_for_shingles(text: &str) -> Vec<String> {
    let s: String =
        if text.is_ascii() { text.to_ascii_lowercase() } else { text.nfkc().collect::<String>().to_lowercase() };
    split_words(&s)
}

/// Splits already-normalised text into words at whitespace and punctuation.
pub fn split_words(s: &str) -> Vec<String> {
    s.split(|c: char| c.is_whitespace() || c.is_ascii_punctuation() || is_unicode_punct(c))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises() {
        let n = Normalization::default();
        assert_eq!(n.apply("  Hello\t\nWORLD  ﬁ "), "hello world fi");
        let p = Normalization { strip_punctuation: true, ..Default::default() };
        assert_eq!(p.apply("Hello, world!"), "hello world");
        assert_eq!(words_for_shingles("Hello, World! It's"), vec!["hello", "world", "it", "s"]);
    }
}
