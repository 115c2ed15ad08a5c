//! Quality filters over mapped conversations, as declared by flags or the config file: word-count
//! bounds on the prompt and the answer, the answer/prompt length ratio, the share of the answer's
//! characters inside repeated word n-grams (Gopher's duplicate n-gram rule), the language
//! ([`language`]), refusal phrases, and answers that are empty or whitespace. A conversation that
//! fails one is rejected with the rule's reason and what it measured, so it lands in rejects.jsonl like every other bad row. A row whose
//! prompt or answer shares n-grams with an evaluation set ([`decontaminate`]) has a fate of its own:
//! it goes to contaminated.jsonl with the evaluation row it overlaps and the overlap.

pub mod decontaminate;
pub mod language;

use crate::accounting::{Reject, RowCtx};
use crate::record::Conversation;
use decontaminate::Contamination;
use std::collections::HashMap;
use std::sync::Arc;

/// Reject reasons of the filters.
pub mod reason {
    pub const PROMPT_LENGTH: &str = "prompt_length";
    pub const ANSWER_LENGTH: &str = "answer_length";
    pub const ANSWER_RATIO: &str = "answer_ratio";
    pub const REPETITIVE: &str = "repetitive";
    pub const REFUSAL: &str = "refusal";
    pub const EMPTY_ANSWER: &str = "empty_answer";
    pub const LANGUAGE: &str = "language";
}

/// The refusal phrases `--refusals default` looks for (matched without regard to case).
pub const DEFAULT_REFUSALS: &[&str] = &[
    "as an ai language model",
    "as an ai assistant, i",
    "i'm sorry, but i can't",
    "i am sorry, but i cannot",
    "i'm sorry, but i cannot",
    "i cannot fulfill",
    "i can't fulfill",
    "i can't assist with that",
    "i cannot assist with that",
    "i'm not able to help with that",
    "i am unable to provide",
];

/// The filters of a run; all off by default.
#[derive(Debug, Clone, Default)]
pub struct Quality {
    /// Inclusive word-count bounds of the prompt side (system + user turns).
    pub prompt_words: (Option<usize>, Option<usize>),
    /// Inclusive word-count bounds of the answers (assistant turns, the chosen answer).
    pub answer_words: (Option<usize>, Option<usize>),
    /// Bounds of answer words / prompt words.
    pub answer_ratio: (Option<f64>, Option<f64>),
    /// Largest share of the answer's characters inside word n-grams that occur more than once.
    pub max_repeated: Option<f64>,
    /// The n of those n-grams.
    pub repeated_n: usize,
    /// Phrases that mark an answer as a refusal (lower case).
    pub refusals: Vec<String>,
    /// Reject conversations with an empty or whitespace-only answer turn.
    pub drop_empty_answers: bool,
    /// Evaluation sets no training row may overlap.
    pub decontaminate: Option<Arc<decontaminate::EvalIndex>>,
    /// Languages a conversation must be identified as (none: any).
    pub languages: Vec<whatlang::Lang>,
    pub min_language_confidence: f64,
}

/// What the filters make of one mapped conversation.
// Rows move by value; boxing the kept conversation would cost an allocation per row.
#[allow(clippy::large_enum_variant)]
pub enum Verdict {
    Keep(Conversation),
    /// Failing a filter rule: the reject names the rule and what it measured.
    Rejected(Reject),
    /// Overlapping an evaluation set of `--decontaminate` (rare: boxed).
    Contaminated(Box<Contamination>),
}

impl Quality {
    /// Judges the conversation of row `ctx`: contaminated (overlapping an evaluation set), rejected
    /// by the first rule it fails, or kept. Prompts for online RL (`answers` false) have no answers
    /// to filter on, so only decontamination applies to them.
    pub fn verdict(&self, conv: Conversation, ctx: &RowCtx, answers: bool) -> Verdict {
        if let Some((side, o)) = self.contamination(&conv) {
            let n = self.decontaminate.as_ref().map_or(0, |i| i.n());
            return Verdict::Contaminated(Box::new(Contamination::new(ctx, side, o, n, conv)));
        }
        if answers {
            if let Err((why, detail)) = self.check(&conv) {
                return Verdict::Rejected(ctx.reject(None, why, detail));
            }
        }
        Verdict::Keep(conv)
    }

    pub fn is_active(&self) -> bool {
        let bounded = |b: (Option<usize>, Option<usize>)| b.0.is_some() || b.1.is_some();
        bounded(self.prompt_words)
            || bounded(self.answer_words)
            || self.answer_ratio.0.is_some()
            || self.answer_ratio.1.is_some()
            || self.max_repeated.is_some()
            || !self.refusals.is_empty()
            || self.drop_empty_answers
            || self.decontaminate.is_some()
            || !self.languages.is_empty()
    }

    /// The side (prompt or answer) of the conversation that overlaps the evaluation sets, and how.
    pub fn contamination(&self, c: &Conversation) -> Option<(&'static str, decontaminate::Overlap)> {
        let idx = self.decontaminate.as_ref()?;
        [("prompt", c.prompt_text()), ("answer", c.completion_text())]
            .into_iter()
            .find_map(|(side, text)| idx.check(&text).map(|o| (side, o)))
    }

    /// The first filter rule the conversation fails: its reason and what was measured.
    pub fn check(&self, c: &Conversation) -> Result<(), (&'static str, String)> {
        let answers: Vec<&str> = c
            .messages
            .iter()
            .filter(|m| m.role == "assistant")
            .chain(c.chosen.iter())
            .map(|m| m.content.as_str())
            .collect();
        if self.drop_empty_answers && answers.iter().any(|a| a.trim().is_empty()) {
            return Err((reason::EMPTY_ANSWER, "an answer turn is empty or only whitespace".into()));
        }
        let (prompt, answer) = (c.prompt_text(), c.completion_text());
        let (pw, aw) = (words(&prompt), words(&answer));
        within(pw, self.prompt_words)
            .map_err(|b| (reason::PROMPT_LENGTH, format!("the prompt has {pw} words; {b}")))?;
        within(aw, self.answer_words)
            .map_err(|b| (reason::ANSWER_LENGTH, format!("the answer has {aw} words; {b}")))?;
        if self.answer_ratio.0.is_some() || self.answer_ratio.1.is_some() {
            let ratio = aw as f64 / pw.max(1) as f64;
            let (lo, hi) = self.answer_ratio;
            if lo.is_some_and(|lo| ratio < lo) || hi.is_some_and(|hi| ratio > hi) {
                let b = format!("answer/prompt words {ratio:.2} outside [{}, {}]", show(lo), show(hi));
                return Err((reason::ANSWER_RATIO, b));
            }
        }
        if let Some(max) = self.max_repeated {
            let share = repeated_share(&answer, self.repeated_n.max(1));
            if share > max {
                return Err((
                    reason::REPETITIVE,
                    format!(
                        "{:.0}% of the answer's characters are in repeated {}-word sequences (at most {:.0}%)",
                        share * 100.0,
                        self.repeated_n,
                        max * 100.0
                    ),
                ));
            }
        }
        if !self.refusals.is_empty() {
            let lower = answer.to_lowercase();
            if let Some(p) = self.refusals.iter().find(|p| lower.contains(p.as_str())) {
                return Err((reason::REFUSAL, format!("the answer contains the refusal phrase {p:?}")));
            }
        }
        if !self.languages.is_empty() {
            language::check(&format!("{prompt}\n{answer}"), &self.languages, self.min_language_confidence)
                .map_err(|d| (reason::LANGUAGE, d))?;
        }
        Ok(())
    }
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

fn show(b: Option<f64>) -> String {
    b.map_or("-".into(), |x| x.to_string())
}

/// Ok when `n` is inside the inclusive bounds; otherwise which bound it crossed.
fn within(n: usize, (lo, hi): (Option<usize>, Option<usize>)) -> Result<(), String> {
    match (lo, hi) {
        (Some(lo), _) if n < lo => Err(format!("at least {lo} wanted")),
        (_, Some(hi)) if n > hi => Err(format!("at most {hi} wanted")),
        _ => Ok(()),
    }
}

/// Share of the text's word characters covered by word n-grams that occur more than once (Gopher's
/// "duplicate n-gram character fraction"): each word counted once however many repeats cover it.
pub fn repeated_share(text: &str, n: usize) -> f64 {
    let w: Vec<&str> = text.split_whitespace().collect();
    let total: usize = w.iter().map(|x| x.chars().count()).sum();
    if w.len() < n || total == 0 {
        return 0.0;
    }
    let mut seen: HashMap<&[&str], usize> = HashMap::new();
    for g in w.windows(n) {
        *seen.entry(g).or_default() += 1;
    }
    let mut covered = vec![false; w.len()];
    for (i, g) in w.windows(n).enumerate() {
        if seen[g] > 1 {
            covered[i..i + n].iter_mut().for_each(|c| *c = true);
        }
    }
    let dup: usize = w.iter().zip(&covered).filter(|(_, &c)| c).map(|(x, _)| x.chars().count()).sum();
    dup as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Message;

    fn conv(prompt: &str, answer: &str) -> Conversation {
        Conversation::new("t:1".into(), vec![Message::new("user", prompt), Message::new("assistant", answer)])
    }

    fn reason_of(q: &Quality, prompt: &str, answer: &str) -> Option<&'static str> {
        q.check(&conv(prompt, answer)).err().map(|e| e.0)
    }

    #[test]
    fn length_bounds_pass_inside_and_fail_outside() {
        let q = Quality { prompt_words: (Some(2), Some(5)), answer_words: (Some(1), Some(3)), ..Default::default() };
        assert_eq!(reason_of(&q, "what is it", "a cat"), None);
        assert_eq!(reason_of(&q, "why", "a cat"), Some(reason::PROMPT_LENGTH));
        assert_eq!(reason_of(&q, "one two three four five six", "a cat"), Some(reason::PROMPT_LENGTH));
        assert_eq!(reason_of(&q, "what is it", "a very fat cat"), Some(reason::ANSWER_LENGTH));
        let e = q.check(&conv("what is it", "a very fat cat")).unwrap_err();
        assert_eq!(e.1, "the answer has 4 words; at most 3 wanted");
    }

    #[test]
    fn the_answer_ratio_bounds_answer_words_over_prompt_words() {
        let q = Quality { answer_ratio: (Some(0.5), Some(3.0)), ..Default::default() };
        assert_eq!(reason_of(&q, "name one", "blue"), None);
        assert_eq!(reason_of(&q, "please name one colour that you like", "blue"), Some(reason::ANSWER_RATIO));
        assert_eq!(reason_of(&q, "colour", "blue green red yellow"), Some(reason::ANSWER_RATIO));
    }

    #[test]
    fn repeated_ngrams_catch_loops_not_ordinary_text() {
        let q = Quality { max_repeated: Some(0.3), repeated_n: 3, ..Default::default() };
        let ordinary = "The cat sat on the mat while the dog slept by the door and the bird sang.";
        assert!(repeated_share(ordinary, 3) < 0.05);
        assert_eq!(reason_of(&q, "q", ordinary), None);
        let looping = "I think so. I think so. I think so. I think so. Maybe not.";
        assert!((repeated_share(looping, 3) - 0.8).abs() < 1e-9, "36 of 45 characters are in the loop");
        assert_eq!(reason_of(&q, "q", looping), Some(reason::REPETITIVE));
    }

    #[test]
    fn refusals_and_empty_answers() {
        let q = Quality {
            refusals: DEFAULT_REFUSALS.iter().map(|s| s.to_string()).collect(),
            drop_empty_answers: true,
            ..Default::default()
        };
        assert_eq!(reason_of(&q, "q", "Sure: here it is."), None);
        assert_eq!(reason_of(&q, "q", "As an AI language model, I have no opinion."), Some(reason::REFUSAL));
        assert_eq!(reason_of(&q, "q", "I'm sorry, but I can't help."), Some(reason::REFUSAL));
        assert_eq!(reason_of(&q, "q", "  \n "), Some(reason::EMPTY_ANSWER));
        // Off by default: nothing is rejected.
        assert!(!Quality::default().is_active());
        assert_eq!(reason_of(&Quality::default(), "q", " "), None);
    }
}
