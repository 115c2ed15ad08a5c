//! `tunekit validate openai`: a fine-tuning file (or all the parts of one dataset) checked as the
//! platform's data-preparation recipe checks it, with the line of every problem, the token
//! statistics and the billing estimate. The checks live in `export::validate`; the command exits 1
//! when the file would be rejected.

use super::Summary;
use crate::export::tokens::model_spec;
use crate::export::validate::{validate_files, ValidationReport};
use anyhow::Result;
use std::path::PathBuf;

/// What `validate openai` is asked.
pub struct ValidateOptions {
    pub files: Vec<PathBuf>,
    /// The model the file is for (its token limit and encoding).
    pub model: String,
    pub epochs: Option<u64>,
    pub max_problems: usize,
}

/// Checks the files as one dataset; the report says whether the platform would accept it.
pub fn run(o: &ValidateOptions) -> Result<ValidationReport> {
    let spec = model_spec(&o.model)?;
    validate_files(&o.files, &spec, o.epochs, o.max_problems)
}

impl Summary for ValidationReport {
    fn print_human(&self) {
        println!(
            "{}: {} example(s) ({} format), model {} ({:?}, {} tokens per example)",
            self.file,
            self.examples,
            self.kind,
            self.model.model,
            self.model.encoding,
            self.model.max_tokens_per_example
        );
        if self.valid {
            println!("  no errors found");
        } else {
            println!("  {} example(s) with errors:", self.errors);
            for (r, n) in &self.errors_by_reason {
                println!("    {r}: {n}");
            }
            for p in &self.problems {
                if p.line > 0 {
                    let at = p.file.as_ref().map(|f| format!("{f} ")).unwrap_or_default();
                    println!("  {at}line {}: {} ({})", p.line, p.detail, p.reason);
                } else {
                    println!("  {} ({})", p.detail, p.reason);
                }
            }
        }
        println!("  examples missing a system message: {}", self.missing_system);
        println!("  examples missing a user message:   {}", self.missing_user);
        for (name, d) in [
            ("messages per example", &self.messages_per_example),
            ("total tokens per example", &self.tokens_per_example),
            ("assistant tokens per example", &self.assistant_tokens_per_example),
        ] {
            println!(
                "  {name}: min/max {}/{}, mean/median {:.1}/{}, p5/p95 {:.1}/{:.1}",
                d.min, d.max, d.mean, d.median, d.p5, d.p95
            );
        }
        println!("  {} example(s) over the token limit", self.over_token_limit);
        println!(
            "  ~{} billed tokens per epoch; {} epochs -> ~{} billed tokens",
            self.billed_tokens_per_epoch, self.epochs, self.billed_tokens
        );
        println!("  {}", if self.valid { "OK: the file would be accepted" } else { "NOT OK: fix the problems above" });
    }
}
