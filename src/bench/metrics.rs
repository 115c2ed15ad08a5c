//! Per-document scores and their aggregates, as lm-evaluation-harness computes them: `acc` (the
//! likeliest choice), `acc_norm` (log-likelihood per character of the choice), `acc_bytes` (per
//! UTF-8 byte), `exact_match` (after the task's filters, with its ignore options), `perplexity`;
//! the mean with its standard error (sample standard deviation over the square root of n), and for
//! two models on the same documents, the paired difference with its standard error.

use super::task::{FilterPipeline, FilterStep, MetricSpec};
use serde::Serialize;

/// Index of the first maximum (numpy's argmax).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// The choices a document's log-likelihoods pick: plain, per character, per byte.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Picks {
    pub pred: usize,
    pub pred_norm: usize,
    pub pred_bytes: usize,
}

pub fn picks(lls: &[f64], choices: &[String]) -> Picks {
    let per =
        |len: fn(&String) -> usize| -> Vec<f64> { lls.iter().zip(choices).map(|(l, c)| l / len(c) as f64).collect() };
    Picks { pred: argmax(lls), pred_norm: argmax(&per(|c| c.chars().count())), pred_bytes: argmax(&per(|c| c.len())) }
}

/// A filter pipeline on one answer.
pub fn filtered(answer: &str, pipeline: &FilterPipeline) -> String {
    let mut s = answer.to_string();
    for step in &pipeline.steps {
        s = match step {
            FilterStep::TakeFirst => s,
            FilterStep::Lowercase => s.to_lowercase(),
            FilterStep::Uppercase => s.to_uppercase(),
            FilterStep::RemoveWhitespace => s.trim_start().to_string(),
            FilterStep::Regex { pattern, group_select, fallback } => {
                // Python's findall: whole matches without groups, group 1 with one, the first
                // non-empty group with several.
                let found: Vec<String> = pattern
                    .captures_iter(&s)
                    .map(|c| match c.len() {
                        1 => c.get(0).map_or("", |m| m.as_str()).to_string(),
                        2 => c.get(1).map_or("", |m| m.as_str()).to_string(),
                        _ => (1..c.len())
                            .filter_map(|g| c.get(g))
                            .map(|m| m.as_str())
                            .find(|m| !m.is_empty())
                            .unwrap_or(fallback)
                            .to_string(),
                    })
                    .collect();
                let n = found.len() as i64;
                let i = if *group_select < 0 { n + group_select } else { *group_select };
                match (0..n).contains(&i) {
                    true => found[i as usize].trim().to_string(),
                    false if n == 0 => fallback.clone(),
                    false => fallback.clone(),
                }
            }
        };
    }
    s
}

/// lm-eval's exact_match of one prediction against one reference.
pub fn exact_match(prediction: &str, reference: &str, m: &MetricSpec) -> bool {
    let norm = |s: &str| -> String {
        let mut s = s.to_string();
        for r in &m.regexes_to_ignore {
            if let Ok(re) = regex::Regex::new(r) {
                s = re.replace_all(&s, "").into_owned();
            }
        }
        if m.ignore_case {
            s = s.to_lowercase();
        }
        if m.ignore_punctuation {
            s.retain(|c| !c.is_ascii_punctuation());
        }
        if m.ignore_numbers {
            s.retain(|c| !c.is_ascii_digit());
        }
        s
    };
    norm(prediction) == norm(reference)
}

/// A mean with its standard error.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub stderr: f64,
}

/// Mean and standard error of per-document scores.
pub fn mean_stderr(xs: &[f64]) -> Estimate {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return Estimate { value: f64::NAN, stderr: f64::NAN };
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    Estimate { value: mean, stderr: (var / n).sqrt() }
}

/// The difference `b - a` of two models' scores on the same documents, with the paired standard error.
pub fn paired_difference(a: &[f64], b: &[f64]) -> Estimate {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    mean_stderr(&d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_picks_divide_by_characters_and_bytes() {
        let choices = vec!["ab".to_string(), "abcdef".to_string(), "é".to_string()];
        let p = picks(&[-2.0, -3.0, -1.9], &choices);
        assert_eq!(p.pred, 2);
        assert_eq!(p.pred_norm, 1); // -0.5 per char beats -1.0 and -1.9
        assert_eq!(p.pred_bytes, 1); // "é" is two bytes: -0.95
        assert_eq!(argmax(&[1.0, 1.0]), 0);
    }

    #[test]
    fn regex_filter_selects_groups_like_python_findall() {
        let p = |pat: &str, g: i64| FilterPipeline {
            name: "x".into(),
            steps: vec![FilterStep::Regex {
                pattern: regex::Regex::new(pat).unwrap(),
                group_select: g,
                fallback: "[invalid]".into(),
            }],
        };
        assert_eq!(filtered("#### 12 and #### 7", &p(r"#### (\d+)", 0)), "12");
        assert_eq!(filtered("#### 12 and #### 7", &p(r"#### (\d+)", -1)), "7");
        assert_eq!(filtered("no number", &p(r"#### (\d+)", 0)), "[invalid]");
        assert_eq!(filtered("answer: B", &p(r"([A-D])|answer (\w)", 0)), "B");
    }

    #[test]
    fn exact_match_honours_its_ignore_options() {
        let m = MetricSpec {
            name: "exact_match".into(),
            ignore_case: true,
            ignore_punctuation: true,
            ..Default::default()
        };
        assert!(exact_match("Paris.", "paris", &m));
        assert!(!exact_match("Paris.", "paris", &MetricSpec::default()));
        let e = mean_stderr(&[1.0, 0.0, 1.0, 0.0]);
        assert_eq!(e.value, 0.5);
        assert!((e.stderr - (1.0f64 / 3.0 / 4.0).sqrt()).abs() < 1e-12);
    }
}
