//! Answer-quality metrics of a generated answer against a reference text, beyond lm-eval's exact
//! match: `number_match` (the last number in each, numerically equal), `f1` (SQuAD's token F1 after
//! its answer normalisation) and `rougeL` (the longest common subsequence F-measure of
//! Google's `rouge_score` with its default tokenizer, no stemming).

use std::collections::HashMap;

/// The last number in a text: optional sign, digits with `,` thousands separators, a decimal part
/// (`$1,234.50` and `1234.5` are the same number); none when the text has no digit.
pub fn last_number(text: &str) -> Option<f64> {
    let re = number_regex();
    let m = re.find_iter(text).last()?;
    m.as_str().replace(',', "").parse().ok()
}

fn number_regex() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+").unwrap())
}

/// Both texts end their last number on the same value (relative tolerance 1e-6).
pub fn number_match(prediction: &str, reference: &str) -> bool {
    match (last_number(prediction), last_number(reference)) {
        (Some(p), Some(r)) => (p - r).abs() <= 1e-6 * r.abs().max(1.0),
        _ => false,
    }
}

/// SQuAD's `normalize_answer`: lower case, ASCII punctuation removed, articles removed, whitespace
/// collapsed; returned as its tokens.
fn squad_tokens(s: &str) -> Vec<String> {
    let lower: String = s.to_lowercase().chars().filter(|c| !c.is_ascii_punctuation()).collect();
    lower.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).map(str::to_string).collect()
}

/// SQuAD's token F1 (1 when both are empty once normalised, 0 when one is).
pub fn token_f1(prediction: &str, reference: &str) -> f64 {
    let (p, r) = (squad_tokens(prediction), squad_tokens(reference));
    if p.is_empty() || r.is_empty() {
        return (p == r) as u8 as f64;
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &r {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0;
    for t in &p {
        if let Some(c) = counts.get_mut(t.as_str()).filter(|c| **c > 0) {
            *c -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let (precision, recall) = (same as f64 / p.len() as f64, same as f64 / r.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

/// rouge_score's default tokenizer: lower case, runs of characters outside `[a-z0-9]` are spaces.
fn rouge_tokens(s: &str) -> Vec<String> {
    let lower = s.to_lowercase();
    let spaced: String =
        lower.chars().map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { ' ' }).collect();
    spaced.split_whitespace().map(str::to_string).collect()
}

/// ROUGE-L F-measure: longest common subsequence of the tokens over their lengths (0 when either
/// text has no token).
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let (p, r) = (rouge_tokens(prediction), rouge_tokens(reference));
    if p.is_empty() || r.is_empty() {
        return 0.0;
    }
    let mut row = vec![0usize; r.len() + 1];
    for a in &p {
        let mut diag = 0;
        for (j, b) in r.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if a == b { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    let lcs = row[r.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (precision, recall) = (lcs / p.len() as f64, lcs / r.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

/// The unbiased pass@k of n samples of which c pass (Chen et al. 2021, as lm-eval and human-eval
/// compute it): 1 - C(n-c, k) / C(n, k).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n - c < k {
        return 1.0;
    }
    let mut fail = 1.0;
    for i in (n - c + 1)..=n {
        fail *= 1.0 - k as f64 / i as f64;
    }
    1.0 - fail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_compare_by_value_wherever_the_answer_puts_them() {
        assert_eq!(last_number("It costs $1,234.50 in total"), Some(1234.5));
        assert!(number_match("so the answer is 18.", "#### 18"));
        assert!(number_match("The result: 1,000", "1000.0"));
        assert!(!number_match("3 apples, then 4", "3"));
        assert!(!number_match("no digits", "3"));
        assert!(number_match("-0.5", "-.5"));
    }

    #[test]
    fn token_f1_is_squads() {
        assert_eq!(token_f1("The Eiffel Tower!", "eiffel tower"), 1.0);
        // precision 1/3, recall 1/2
        assert!((token_f1("in paris france", "paris city") - 0.4).abs() < 1e-12);
        assert_eq!(token_f1("the", "a"), 1.0);
        assert_eq!(token_f1("", "x"), 0.0);
    }

    #[test]
    fn rouge_l_uses_the_longest_common_subsequence() {
        // lcs "the cat the mat" = 4 of 6 and 4 of 5 tokens
        let f = rouge_l("the cat sat on the mat", "the cat lay the mat");
        let (p, r) = (4.0 / 6.0, 4.0 / 5.0);
        assert!((f - 2.0 * p * r / (p + r)).abs() < 1e-12);
        assert_eq!(rouge_l("Hello, World", "hello world"), 1.0);
        assert_eq!(rouge_l("...", "x"), 0.0);
        // rouge_score: 0.28571428571428575 (non-ASCII letters separate tokens)
        assert!((rouge_l("Élan vital 42x", "elan vital 42 x") - 0.28571428571428575).abs() < 1e-15);
    }

    #[test]
    fn pass_at_k_is_the_unbiased_estimator() {
        assert_eq!(pass_at_k(5, 0, 1), 0.0);
        assert_eq!(pass_at_k(5, 5, 3), 1.0);
        assert!((pass_at_k(5, 2, 1) - 0.4).abs() < 1e-12);
        // 1 - C(3,2)/C(5,2) = 1 - 3/10
        assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12);
    }
}
