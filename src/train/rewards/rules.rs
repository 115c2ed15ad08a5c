//! Rule rewards, 1 or 0 unless said otherwise:
//! * `match:COLUMN`: the completion's final answer equals the prompt row's COLUMN. The final answer
//!   is the last `\boxed{...}`, else what follows the last `####`, else what follows the last
//!   "answer:"/"answer is", else the whole completion. When the reference is a number, the last
//!   number of the answer is compared numerically ("1,000" = "1000.0"); otherwise the texts are
//!   compared ignoring case, surrounding punctuation and runs of whitespace.
//! * `regex:PATTERN`: the pattern occurs in the completion.
//! * `json`: the completion (or a ```json fenced block in it) parses as JSON.
//! * `length:N`: `max(0, 1 - |words - N| / N)`, 1 at exactly N words.

use super::{RewardFn, Sample};
use anyhow::{Context, Result};

pub struct Match {
    column: String,
}

impl Match {
    pub fn new(column: &str) -> Self {
        Match { column: column.to_string() }
    }
}

impl RewardFn for Match {
    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>> {
        samples
            .iter()
            .map(|s| {
                let reference = s.columns.get(&self.column).with_context(|| {
                    let cols: Vec<&String> = s.columns.keys().collect();
                    format!(
                        "the prompt of completion {} has no column '{}' (its columns: {cols:?}); \
                         prepare the prompts from rows that have it",
                        s.label, self.column
                    )
                })?;
                Ok(answer_matches(s.completion, reference) as u8 as f64)
            })
            .collect()
    }
}

/// The final answer of a completion (see the module doc).
pub fn final_answer(text: &str) -> &str {
    if let Some(i) = text.rfind("\\boxed{") {
        let rest = &text[i + 7..];
        let mut depth = 1;
        for (j, ch) in rest.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return rest[..j].trim();
                    }
                }
                _ => {}
            }
        }
    }
    if let Some(i) = text.rfind("####") {
        return text[i + 4..].trim();
    }
    let lower = text.to_lowercase();
    let cut = ["answer:", "answer is"].iter().filter_map(|k| lower.rfind(k).map(|i| i + k.len())).max();
    match cut {
        // Lower-casing can change byte lengths only outside ASCII; fall back to the whole text then.
        Some(i) if lower.len() == text.len() && text.is_char_boundary(i) => text[i..].trim(),
        _ => text.trim(),
    }
}

/// A number as people write it: "1,000", "$3.50", "42.", "-7", "50%".
fn parse_number(s: &str) -> Option<f64> {
    let t: String = s.trim().trim_end_matches(['.', '%']).chars().filter(|c| !matches!(c, ',' | '$' | ' ')).collect();
    if t.is_empty() || !t.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// The last number in a text, if any.
fn last_number(s: &str) -> Option<f64> {
    let re = number_pattern();
    re.find_iter(s).filter_map(|m| parse_number(m.as_str())).last()
}

fn number_pattern() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"-?\$?\d[\d,]*(?:\.\d+)?").expect("valid pattern"))
}

fn normalize(s: &str) -> String {
    let words: Vec<&str> = s.split_whitespace().collect();
    words.join(" ").trim_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace()).to_lowercase()
}

/// Whether the completion's final answer equals the reference (number-aware).
pub fn answer_matches(completion: &str, reference: &str) -> bool {
    let answer = final_answer(completion);
    match parse_number(reference) {
        Some(want) => last_number(answer).is_some_and(|got| (got - want).abs() <= 1e-6 * want.abs().max(1.0)),
        None => normalize(answer) == normalize(reference),
    }
}

pub struct Regex(regex::Regex);

impl Regex {
    pub fn new(pattern: &str) -> Result<Self> {
        Ok(Regex(regex::Regex::new(pattern).with_context(|| format!("--reward regex:{pattern}: not a valid pattern"))?))
    }
}

impl RewardFn for Regex {
    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>> {
        Ok(samples.iter().map(|s| self.0.is_match(s.completion) as u8 as f64).collect())
    }
}

pub struct Json;

/// The completion, or the inside of its first ``` fenced block.
fn json_body(s: &str) -> &str {
    if let Some(i) = s.find("```") {
        let rest = &s[i + 3..];
        let rest = rest.strip_prefix("json").unwrap_or(rest);
        if let Some(j) = rest.find("```") {
            return rest[..j].trim();
        }
    }
    s.trim()
}

impl RewardFn for Json {
    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>> {
        Ok(samples
            .iter()
            .map(|s| serde_json::from_str::<serde_json::Value>(json_body(s.completion)).is_ok() as u8 as f64)
            .collect())
    }
}

pub struct Length(pub f64);

impl RewardFn for Length {
    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>> {
        Ok(samples
            .iter()
            .map(|s| {
                let words = s.completion.split_whitespace().count() as f64;
                (1.0 - (words - self.0).abs() / self.0).max(0.0)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_answers_are_found_and_compared_as_numbers_or_text() {
        assert!(answer_matches("So 2 + 3 = 5.", "5"));
        assert!(answer_matches("The total is \\boxed{1,000}", "1000"));
        assert!(answer_matches("Step 1: 3 * 4 = 12\n#### 12.0", "12"));
        assert!(answer_matches("The answer is: -7", "-7"));
        assert!(!answer_matches("It could be 5, but it is 6", "5"), "the last number counts");
        assert!(answer_matches("Answer:   Paris ", "paris"));
        assert!(!answer_matches("Answer: Lyon", "Paris"));
        assert!(!answer_matches("no number here", "3"));
        assert!(answer_matches("It costs $3.50.", "3.5"));
        assert_eq!(final_answer("a \\boxed{x^{2}} b"), "x^{2}");
    }

    #[test]
    fn regex_json_and_length() {
        let cols = Default::default();
        let s = |c: &'static str| Sample {
            label: "p#0".into(),
            prompt: "",
            completion: c,
            prompt_ids: &[],
            completion_ids: &[],
            columns: &cols,
        };
        let batch = [s("<answer>4</answer>"), s("```json\n{\"x\": [1, 2]}\n```"), s("one two three four")];
        assert_eq!(Regex::new(r"<answer>\d+</answer>").unwrap().score(&batch).unwrap(), vec![1.0, 0.0, 0.0]);
        assert_eq!(Json.score(&batch).unwrap(), vec![0.0, 1.0, 0.0]);
        assert_eq!(Length(4.0).score(&batch).unwrap()[2], 1.0);
        assert_eq!(Length(2.0).score(&batch).unwrap()[2], 0.0);
        assert!(Regex::new("(").is_err());
        let mut m = Match::new("answer");
        let err = m.score(&batch).unwrap_err().to_string();
        assert!(err.contains("no column 'answer'") && err.contains("p#0"), "{err}");
    }
}
