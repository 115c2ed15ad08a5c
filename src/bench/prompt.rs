//! A task's documents as prompts, exactly as lm-evaluation-harness builds them: `doc_to_text`,
//! `doc_to_target` and `doc_to_choice` resolved (a column, or a Jinja template rendered with the
//! document's fields, a rendered list read as a Python literal), few-shot examples joined with
//! `target_delimiter` and `fewshot_delimiter`, and, with a chat template, the whole context as one
//! user turn (or one turn per example with `fewshot_as_multiturn`).

use super::python_random::PyRandom;
use super::task::{plain_text, Doc, Field, OutputType, Sampler, Task};
use crate::record::Message;
use crate::template::chat::ChatTemplate;
use anyhow::{anyhow, bail, Result};
use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

/// The answer a document names.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// An index into the choices.
    Index(usize),
    Text(String),
    /// Several acceptable answers (any one counts).
    Texts(Vec<String>),
}

/// How contexts are rendered for a model.
#[derive(Clone, Copy)]
pub struct Style<'a> {
    pub chat: Option<&'a ChatTemplate>,
    pub fewshot_as_multiturn: bool,
}

pub struct Prompter<'t> {
    pub task: &'t Task,
    env: Environment<'static>,
    /// The few-shot draws of the `default` sampler: one generator for the task, documents in order.
    rng: std::cell::RefCell<PyRandom>,
}

/// One message of a context before rendering, with the text that follows it in plain form.
struct Turn {
    role: &'static str,
    content: String,
    delimiter: String,
}

impl<'t> Prompter<'t> {
    /// The prompter of a task; `seed` seeds the few-shot draws (lm-eval's default is 1234).
    pub fn new(task: &'t Task, seed: u64) -> Result<Prompter<'t>> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_filter(
            "regex_replace",
            |s: String, pattern: String, repl: String| -> Result<String, minijinja::Error> {
                let re = regex::Regex::new(&pattern)
                    .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
                Ok(re.replace_all(&s, python_replacement(&repl).as_str()).into_owned())
            },
        );
        let mut keys: Vec<(&str, &Field)> =
            vec![("doc_to_text", &task.doc_to_text), ("doc_to_target", &task.doc_to_target)];
        if let Some(c) = &task.doc_to_choice {
            keys.push(("doc_to_choice", c));
        }
        for (key, f) in keys {
            if let Field::Template(src) = f {
                env.add_template_owned(key.to_string(), src.clone())
                    .map_err(|e| anyhow!("{}: `{key}` is not a valid Jinja template: {e}", task.at(key)))?;
            }
        }
        if !task.description.is_empty() && !task.features.contains(&task.description) {
            env.add_template_owned("description".to_string(), task.description.clone())
                .map_err(|e| anyhow!("{}: `description` is not a valid Jinja template: {e}", task.at("description")))?;
        }
        Ok(Prompter { task, env, rng: std::cell::RefCell::new(PyRandom::new(seed)) })
    }

    fn render(&self, key: &str, doc: &Doc) -> Result<String> {
        let t = self.env.get_template(key).expect("compiled in new");
        t.render(minijinja::Value::from_serialize(&doc.fields)).map_err(|e| {
            anyhow!("{}: `{key}` does not render for the document at {}: {e}", self.task.at(key), doc.place())
        })
    }

    fn column<'d>(&self, key: &str, doc: &'d Doc, col: &str) -> Result<&'d Value> {
        doc.fields.get(col).ok_or_else(|| {
            anyhow!("{}: the document at {} has no field `{col}` (`{key}` names it)", self.task.at(key), doc.place())
        })
    }

    /// `doc_to_text`.
    pub fn text(&self, doc: &Doc) -> Result<String> {
        match &self.task.doc_to_text {
            Field::Column(c) => Ok(plain_text(self.column("doc_to_text", doc, c)?)),
            Field::Template(_) => self.render("doc_to_text", doc),
            Field::Index(i) => Ok(i.to_string()),
            Field::List(_) => bail!("{}: `doc_to_text` must be a column or a template", self.task.at("doc_to_text")),
        }
    }

    /// `doc_to_choice`: the answers to choose from (at least one, each text).
    pub fn choices(&self, doc: &Doc) -> Result<Vec<String>> {
        let Some(field) = &self.task.doc_to_choice else { return Ok(vec![]) };
        let at = || self.task.at("doc_to_choice");
        let list = match field {
            Field::List(l) => l.clone(),
            Field::Column(c) => match self.column("doc_to_choice", doc, c)? {
                Value::Array(a) => a.iter().map(plain_text).collect(),
                other => bail!("{}: the document at {} has `{c}` = {other}, not a list of choices", at(), doc.place()),
            },
            Field::Template(_) => {
                let s = self.render("doc_to_choice", doc)?;
                python_list(&s).map_err(|e| {
                    anyhow!("{}: `doc_to_choice` rendered {s:?} for {}, not a list of choices: {e}", at(), doc.place())
                })?
            }
            Field::Index(_) => bail!("{}: `doc_to_choice` must be a list, a column or a template", at()),
        };
        if list.is_empty() {
            bail!("{}: the document at {} has no choices", at(), doc.place());
        }
        Ok(list)
    }

    /// `doc_to_target`, resolved against the choices where there are some.
    pub fn target(&self, doc: &Doc, choices: &[String]) -> Result<Target> {
        let at = || self.task.at("doc_to_target");
        let raw = match &self.task.doc_to_target {
            Field::Index(i) => Value::from(*i),
            Field::List(l) => Value::from(l.clone()),
            Field::Column(c) => self.column("doc_to_target", doc, c)?.clone(),
            Field::Template(_) => {
                let s = self.render("doc_to_target", doc)?;
                if !choices.is_empty() && !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
                    Value::from(s.parse::<u64>()?)
                } else if s.len() >= 2 && s.starts_with('[') && s.ends_with(']') {
                    python_list(&s).map(Value::from).unwrap_or(Value::String(s))
                } else {
                    Value::String(s)
                }
            }
        };
        if choices.is_empty() {
            return Ok(match raw {
                Value::Array(a) => Target::Texts(a.iter().map(plain_text).collect()),
                other => Target::Text(plain_text(&other)),
            });
        }
        let index = match &raw {
            Value::Number(n) => n.as_u64().map(|i| i as usize).filter(|&i| i < choices.len()),
            Value::String(s) => choices.iter().position(|c| c == s),
            _ => None,
        };
        match index {
            Some(i) => Ok(Target::Index(i)),
            None => bail!(
                "{}: the target of the document at {} is {}, which is not among its {} choices ({}); fix the data or \
                 `doc_to_target` (an index from 0, or the text of a choice)",
                at(),
                doc.place(),
                raw,
                choices.len(),
                choices.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// The answer as text (a few-shot example's answer; the reference of a generation task).
    pub fn answer_text(&self, target: &Target, choices: &[String]) -> String {
        match target {
            Target::Index(i) => choices[*i].clone(),
            Target::Text(s) => s.clone(),
            Target::Texts(v) => v.first().cloned().unwrap_or_default(),
        }
    }

    fn description(&self, doc: &Doc) -> Result<String> {
        let d = &self.task.description;
        if d.is_empty() {
            Ok(String::new())
        } else if self.task.features.contains(d) {
            Ok(plain_text(self.column("description", doc, d)?))
        } else {
            self.render("description", doc)
        }
    }

    /// The few-shot examples of document `index` of the evaluation split, as lm-eval draws them:
    /// `first_n` the first n (the document itself left out), `default` Python's `sample` of n (n + 1
    /// when the pool is the evaluation split, the document then dropped). Call in document order.
    pub fn shots(&self, index: usize) -> Result<Vec<&'t Doc>> {
        let t = self.task;
        let n = t.num_fewshot;
        if n == 0 {
            return Ok(vec![]);
        }
        let pool = t.fewshot_docs.len() - usize::from(t.fewshot_is_eval);
        if pool < n {
            bail!("{}: {n} few-shot examples asked, the few-shot split has {pool} to draw from", t.at("num_fewshot"));
        }
        let own = |i: &usize| t.fewshot_is_eval && *i == index;
        let picked: Vec<usize> = match t.sampler {
            Sampler::FirstN => (0..t.fewshot_docs.len()).filter(|i| !own(i)).take(n).collect(),
            Sampler::Random => {
                let k = if t.fewshot_is_eval { n + 1 } else { n };
                let drawn = self.rng.borrow_mut().sample(t.fewshot_docs.len(), k);
                drawn.into_iter().filter(|i| !own(i)).take(n).collect()
            }
        };
        Ok(picked.into_iter().map(|i| &t.fewshot_docs[i]).collect())
    }

    /// The context of document `index` (its few-shot examples, then its question) as the model
    /// reads it.
    pub fn context(&self, index: usize, style: Style) -> Result<String> {
        let t = self.task;
        let doc = &t.docs[index];
        let mut turns = Vec::new();
        let description = self.description(doc)?;
        if !description.is_empty() {
            turns.push(Turn { role: "system", content: description, delimiter: String::new() });
        }
        for shot in self.shots(index)? {
            let choices = self.choices(shot)?;
            let answer = self.answer_text(&self.target(shot, &choices)?, &choices);
            let has_answer = !answer.is_empty();
            let delimiter = if has_answer { t.target_delimiter.clone() } else { String::new() };
            turns.push(Turn { role: "user", content: self.text(shot)?, delimiter });
            if has_answer {
                turns.push(Turn { role: "assistant", content: answer, delimiter: t.fewshot_delimiter.clone() });
            }
        }
        turns.push(Turn { role: "user", content: self.text(doc)?, delimiter: String::new() });
        let Some(chat) = style.chat else {
            return Ok(turns.iter().map(|m| format!("{}{}", m.content, m.delimiter)).collect());
        };
        let (system, rest) = match turns.first() {
            Some(m) if m.role == "system" => (Some(Message::new("system", m.content.clone())), &turns[1..]),
            _ => (None, &turns[..]),
        };
        let mut messages: Vec<Message> = system.into_iter().collect();
        if style.fewshot_as_multiturn {
            messages.extend(rest.iter().map(|m| Message::new(m.role, m.content.clone())));
        } else {
            let n = rest.len();
            let joined: String = rest
                .iter()
                .enumerate()
                .map(|(i, m)| if i + 1 == n { m.content.clone() } else { format!("{}{}", m.content, m.delimiter) })
                .collect();
            messages.push(Message::new("user", joined));
        }
        chat.render(&messages, None, true).map_err(|e| anyhow!("chat template: {e:#}"))
    }

    /// The text after the context that a choice is scored as (`target_delimiter` + choice; with a
    /// chat template, the choice alone, as lm-eval does).
    pub fn continuation(&self, choice: &str, style: Style) -> String {
        match style.chat {
            Some(_) => choice.to_string(),
            None => format!("{}{choice}", self.task.target_delimiter),
        }
    }

    /// Whether this task scores choices.
    pub fn is_choice(&self) -> bool {
        self.task.output == OutputType::MultipleChoice
    }
}

/// Python's `re.sub` replacement (`\1`, `\g<name>`) in the regex crate's form (`${1}`, `${name}`).
fn python_replacement(repl: &str) -> String {
    let mut out = String::new();
    let mut chars = repl.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    let d = chars.next().unwrap();
                    out.push_str(&format!("${{{d}}}"));
                }
                Some('g') => {
                    chars.next();
                    let name: String = chars.by_ref().skip(1).take_while(|&c| c != '>').collect();
                    out.push_str(&format!("${{{name}}}"));
                }
                Some('n') => {
                    chars.next();
                    out.push('\n');
                }
                Some('\\') => {
                    chars.next();
                    out.push('\\');
                }
                _ => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

/// A list literal as Python prints one (`['a', "b's", 3]`, or JSON's form) into its items as text.
pub fn python_list(s: &str) -> Result<Vec<String>> {
    let s = s.trim();
    let inner = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).ok_or_else(|| anyhow!("not a [...] list"))?;
    let mut items = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&c) = chars.peek() else { break };
        if c == '\'' || c == '"' {
            chars.next();
            let mut item = String::new();
            loop {
                match chars.next() {
                    None => bail!("a string is not closed"),
                    Some(q) if q == c => break,
                    Some('\\') => match chars.next() {
                        Some('n') => item.push('\n'),
                        Some('t') => item.push('\t'),
                        Some('r') => item.push('\r'),
                        Some('u') => {
                            let hex: String = chars.by_ref().take(4).collect();
                            let code = u32::from_str_radix(&hex, 16)?;
                            item.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                        }
                        Some('x') => {
                            let hex: String = chars.by_ref().take(2).collect();
                            item.push(char::from_u32(u32::from_str_radix(&hex, 16)?).unwrap_or('\u{fffd}'));
                        }
                        Some(o) => item.push(o),
                        None => bail!("a string ends in a backslash"),
                    },
                    Some(o) => item.push(o),
                }
            }
            items.push(item);
        } else {
            let item: String = chars.by_ref().take_while(|&c| c != ',').collect();
            items.push(item.trim().to_string());
            continue;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => break,
            Some(',') => {}
            Some(o) => bail!("unexpected `{o}` after an item"),
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_lists_of_either_quote_style_read_back() {
        assert_eq!(python_list("['a', \"b's\", 'c\\'d']").unwrap(), vec!["a", "b's", "c'd"]);
        assert_eq!(python_list("[\"x\", \"y\"]").unwrap(), vec!["x", "y"]);
        assert_eq!(python_list("[1, 2]").unwrap(), vec!["1", "2"]);
        assert!(python_list("a, b").is_err());
    }

    #[test]
    fn python_replacements_become_regex_crate_ones() {
        assert_eq!(python_replacement(r"\1-\g<x>$"), "${1}-${x}$$");
    }
}
