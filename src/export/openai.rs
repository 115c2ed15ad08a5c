//! `tunekit export openai`: canonical conversations (or any raw input) to OpenAI fine-tuning JSONL.
//! SFT lines are `{"messages": [...], "tools"?: [...]}`; DPO lines are `{"input": {"messages": [...]},
//! "preferred_output": [...], "non_preferred_output": [...]}`. Examples over the model's token limit
//! are dropped or shortened (whole trailing turns removed), and counted. Files roll over before
//! the platform's upload size limit.

use super::tokens::{count_messages, ModelSpec};
use crate::accounting::{reason, Counts, Reject};
use crate::dedup::front::Front;
use crate::dedup::DedupOptions;
use crate::ingest::{stream_conversations, MapOptions};
use crate::output::AtomicFile;
use crate::record::{Conversation, Message};
use crate::split::is_eval;
use anyhow::Result;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportMethod {
    Sft,
    Dpo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OverLimit {
    /// Drop the example (written to rejects.jsonl).
    Drop,
    /// Remove whole turns from the end until it fits and still ends with an assistant answer.
    Truncate,
}

pub struct ExportOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub map: MapOptions,
    pub strict: bool,
    pub method: ExportMethod,
    pub model: ModelSpec,
    pub over_limit: OverLimit,
    pub eval_fraction: f64,
    pub seed: u64,
    pub dedup: DedupOptions,
    /// Largest file written; the platform accepts up to 512 MB per upload.
    pub max_file_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ExportSummary {
    pub command: &'static str,
    pub method: ExportMethod,
    pub model: ModelSpec,
    #[serde(flatten)]
    pub counts: Counts,
    pub truncated: u64,
    pub train_examples: u64,
    pub validation_examples: u64,
    pub train_files: Vec<String>,
    pub validation_files: Vec<String>,
    pub tokens: u64,
    pub rejects_file: Option<String>,
    pub duplicates_file: Option<String>,
    pub seconds: f64,
    pub rows_per_s: f64,
}

/// A JSONL output that rolls over to `stem-00001.jsonl`, ... before `max` bytes.
struct RollingJsonl {
    base: PathBuf,
    max: u64,
    current: Option<(AtomicFile, u64)>,
    files: Vec<PathBuf>,
    pub lines: u64,
}

impl RollingJsonl {
    fn new(base: PathBuf, max: u64) -> Self {
        RollingJsonl { base, max, current: None, files: Vec::new(), lines: 0 }
    }
    fn path(&self, i: usize) -> PathBuf {
        if i == 0 {
            return self.base.clone();
        }
        let stem = self.base.file_stem().unwrap_or_default().to_string_lossy();
        let ext = self.base.extension().map(|e| e.to_string_lossy().to_string()).unwrap_or_else(|| "jsonl".into());
        self.base.with_file_name(format!("{stem}-{i:05}.{ext}"))
    }
    fn write(&mut self, line: &[u8]) -> Result<()> {
        if let Some((_, n)) = &self.current {
            if n + line.len() as u64 > self.max {
                let (f, _) = self.current.take().expect("checked");
                f.commit()?;
            }
        }
        if self.current.is_none() {
            let p = self.path(self.files.len());
            self.current = Some((AtomicFile::create(&p)?, 0));
            self.files.push(p);
        }
        let (f, n) = self.current.as_mut().expect("opened");
        f.write_all(line)?;
        *n += line.len() as u64;
        self.lines += 1;
        Ok(())
    }
    fn finish(mut self) -> Result<Vec<String>> {
        if let Some((f, _)) = self.current.take() {
            f.commit()?;
        }
        Ok(self.files.iter().map(|p| p.display().to_string()).collect())
    }
}

fn message_json(m: &Message) -> Value {
    let mut o = Map::new();
    o.insert("role".into(), Value::from(m.role.as_str()));
    let has_calls = m.extra.contains_key("tool_calls");
    if !(has_calls && m.content.is_empty()) {
        o.insert("content".into(), Value::from(m.content.as_str()));
    }
    for k in ["name", "tool_calls", "tool_call_id", "function_call"] {
        if let Some(v) = m.extra.get(k) {
            let v = if k == "tool_calls" { normalize_tool_calls(v) } else { v.clone() };
            o.insert(k.into(), v);
        }
    }
    if m.role == "assistant" {
        if let Some(w) = m.weight {
            o.insert("weight".into(), Value::from(w));
        }
    }
    Value::Object(o)
}

/// OpenAI wants tool call arguments as a JSON string.
fn normalize_tool_calls(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(list) = v.as_array_mut() {
        for call in list {
            if let Some(args) = call.get_mut("function").and_then(|f| f.get_mut("arguments")) {
                if !args.is_string() {
                    *args = Value::from(args.to_string());
                }
            }
        }
    }
    v
}

/// The line for one conversation, or a reject reason.
fn example(c: &Conversation, method: ExportMethod) -> Result<(Value, Vec<Value>), (&'static str, String)> {
    let msgs: Vec<Value> = c.messages.iter().map(message_json).collect();
    match method {
        ExportMethod::Sft => {
            if c.is_text() {
                return Err((reason::NO_ASSISTANT, "raw-text records have no chat turns to export".into()));
            }
            if c.is_preference() {
                // A preference pair exports as SFT on its chosen answer.
                let mut m = msgs.clone();
                m.push(message_json(c.chosen.as_ref().expect("pair")));
                return Ok((line_json(&m, c.tools.as_ref()), m));
            }
            Ok((line_json(&msgs, c.tools.as_ref()), msgs))
        }
        ExportMethod::Dpo => {
            let (Some(ch), Some(rj)) = (&c.chosen, &c.rejected) else {
                return Err((
                    reason::NOT_PREFERENCE,
                    "--method dpo needs preference records (chosen and rejected)".into(),
                ));
            };
            let mut input = json!({"messages": msgs});
            if let Some(t) = &c.tools {
                input["tools"] = t.clone();
            }
            let line = json!({
                "input": input,
                "preferred_output": [{"role": "assistant", "content": ch.content}],
                "non_preferred_output": [{"role": "assistant", "content": rj.content}],
            });
            let mut counted = msgs;
            counted.push(json!({"role": "assistant", "content": ch.content}));
            Ok((line, counted))
        }
    }
}

fn line_json(msgs: &[Value], tools: Option<&Value>) -> Value {
    let mut o = json!({"messages": msgs});
    if let Some(t) = tools {
        o["tools"] = t.clone();
    }
    o
}

/// Removes trailing turns until the example fits; it must still end with an assistant message.
fn truncate_to_fit(c: &Conversation, spec: &ModelSpec) -> Option<Conversation> {
    let mut c = c.clone();
    loop {
        while c.messages.last().is_some_and(|m| m.role != "assistant") {
            c.messages.pop();
        }
        if c.messages.len() < 2 {
            return None;
        }
        let msgs: Vec<Value> = c.messages.iter().map(message_json).collect();
        if count_messages(spec.encoding, &msgs).0 <= spec.max_tokens_per_example {
            return Some(c);
        }
        c.messages.pop();
    }
}

pub fn validation_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{stem}_validation.jsonl"))
}

pub fn run(opts: &ExportOptions) -> Result<ExportSummary> {
    let start = Instant::now();
    let dir = opts.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let mut train = RollingJsonl::new(opts.out.clone(), opts.max_file_bytes);
    let mut valid = RollingJsonl::new(validation_path(&opts.out), opts.max_file_bytes);
    let mut front = Front::new(&dir, &opts.dedup, opts.strict, true);
    let (mut truncated, mut tokens) = (0u64, 0u64);
    let pb = crate::progress::rows("export");
    stream_conversations(&opts.inputs, &opts.map, |batch| {
        let kept = front.admit(batch.items)?;
        type Out = Result<(Vec<u8>, usize, bool), (&'static str, String)>;
        let lines: Vec<(Conversation, Out)> = kept
            .into_par_iter()
            .map(|c| {
                let res = (|| {
                    let (line, counted) = example(&c, opts.method)?;
                    let n = count_messages(opts.model.encoding, &counted).0;
                    if n <= opts.model.max_tokens_per_example {
                        return Ok((serde_json::to_vec(&line).expect("json"), n, false));
                    }
                    let over = (
                        reason::OVER_TOKEN_LIMIT,
                        format!("{n} tokens > {} allowed for {}", opts.model.max_tokens_per_example, opts.model.model),
                    );
                    if opts.over_limit == OverLimit::Drop || opts.method == ExportMethod::Dpo {
                        return Err(over);
                    }
                    let short = truncate_to_fit(&c, &opts.model).ok_or(over)?;
                    let (line, counted) = example(&short, opts.method)?;
                    Ok((
                        serde_json::to_vec(&line).expect("json"),
                        count_messages(opts.model.encoding, &counted).0,
                        true,
                    ))
                })();
                (c, res)
            })
            .collect();
        for (c, res) in lines {
            match res {
                Ok((mut bytes, n, was_truncated)) => {
                    bytes.push(b'\n');
                    front.counts.rows_kept += 1;
                    tokens += n as u64;
                    truncated += was_truncated as u64;
                    if is_eval(&c.id, opts.seed, opts.eval_fraction) {
                        valid.write(&bytes)?;
                    } else {
                        train.write(&bytes)?;
                    }
                }
                Err((reason, detail)) => front.reject(Reject::for_conversation(&c, reason, detail))?,
            }
        }
        pb.set_position(front.counts.rows_read);
        Ok(())
    })?;
    pb.finish_and_clear();
    let (train_examples, validation_examples) = (train.lines, valid.lines);
    let train_files = train.finish()?;
    let validation_files = valid.finish()?;
    let (rejects_file, duplicates_file) = front.finish()?;
    let counts = front.counts.clone();
    if train_examples < super::validate::MIN_EXAMPLES {
        crate::progress::warn(&format!("only {train_examples} training example(s); OpenAI requires at least 10"));
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(ExportSummary {
        command: "export",
        method: opts.method,
        model: opts.model.clone(),
        rows_per_s: counts.rows_read as f64 / seconds.max(1e-9),
        counts,
        truncated,
        train_examples,
        validation_examples,
        train_files,
        validation_files,
        tokens,
        rejects_file,
        duplicates_file,
        seconds,
    })
}

impl ExportSummary {
    pub fn print_human(&self) {
        let c = &self.counts;
        println!(
            "exported {} row(s) for {} ({:?}) in {:.2}s ({:.0} rows/s)",
            c.rows_read, self.model.model, self.method, self.seconds, self.rows_per_s
        );
        println!("  train:      {} example(s) -> {}", self.train_examples, self.train_files.join(", "));
        if self.validation_examples > 0 {
            println!("  validation: {} example(s) -> {}", self.validation_examples, self.validation_files.join(", "));
        }
        println!("  tokens:     {} ({:?})", self.tokens, self.model.encoding);
        println!("  duplicates: {} exact, {} near", c.duplicates_exact, c.duplicates_near);
        println!("  rejected:   {}", c.rejected);
        for (r, n) in &c.rejected_by_reason {
            println!("    {r}: {n}");
        }
        if self.truncated > 0 {
            println!("  truncated:  {}", self.truncated);
        }
        if let Some(f) = &self.rejects_file {
            println!("  rejects:    {f}");
        }
    }
}
