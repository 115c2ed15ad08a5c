//! `tunekit generate`: an answer from a model (optionally with an adapter) to one prompt, or a chat
//! on the terminal. Renders the chat template, then samples with a KV cache (`train::generate`).

use super::Summary;
use crate::record::Message;
use crate::template::chat::ChatTemplate;
use crate::tokenize::TokenizerInfo;
use crate::train::io::{load_model, Placement};
use crate::train::model::Model;
use crate::train::rollout::chat::generate;
use crate::train::rollout::SamplingParams;
use anyhow::Result;
use serde::Serialize;
use std::io::{BufRead, Write};
use std::path::PathBuf;

pub struct GenerateOptions {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    /// tokenizer.json / directory / GGUF; default: the model.
    pub tokenizer: Option<PathBuf>,
    pub template: Option<String>,
    pub system: Option<String>,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub placement: Placement,
}

#[derive(Debug, Serialize)]
pub struct GenerateSummary {
    pub command: &'static str,
    pub text: String,
    /// The answer's token ids (without the end-of-turn token), to compare runtimes token for token.
    pub tokens: Vec<u32>,
}

/// The model, its tokenizer and chat template, and the opening system message.
struct Session {
    model: Model,
    tok: TokenizerInfo,
    template: ChatTemplate,
    messages: Vec<Message>,
}

impl Session {
    fn open(o: &GenerateOptions) -> Result<Session> {
        let model = load_model(&o.model, o.adapter.as_deref(), &o.placement)?;
        let tok = TokenizerInfo::load(o.tokenizer.as_ref().unwrap_or(&o.model))?;
        let template = crate::tokenize::chat_template(&tok, o.template.as_deref())?;
        let messages = o.system.iter().map(|s| Message::new("system", s.clone())).collect();
        Ok(Session { model, tok, template, messages })
    }

    fn answer(&mut self, user: &str, s: &SamplingParams, seed: u64) -> Result<(String, Vec<u32>)> {
        self.messages.push(Message::new("user", user));
        let (answer, tokens) = generate(&self.model, &self.tok, &self.template, &self.messages, s, seed)?;
        self.messages.push(Message::new("assistant", answer.clone()));
        Ok((answer, tokens))
    }
}

/// The answer to one prompt.
pub fn run(o: &GenerateOptions, prompt: &str) -> Result<GenerateSummary> {
    let (text, tokens) = Session::open(o)?.answer(prompt, &o.sampling, o.seed)?;
    Ok(GenerateSummary { command: "generate", text, tokens })
}

/// A conversation on the terminal: a message per line on stdin, each answer on stdout; an empty
/// line or the end of input ends it.
pub fn chat(o: &GenerateOptions) -> Result<()> {
    let mut session = Session::open(o)?;
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        println!("{}", session.answer(line.trim(), &o.sampling, o.seed)?.0);
    }
}

impl Summary for GenerateSummary {
    fn print_human(&self) {
        println!("{}", self.text);
    }
}
