//! Templates: minijinja environments for prompt templates over a row's columns (convert) and for
//! Hugging Face chat templates rendered exactly as transformers renders them (prepare).
//!
//! Built-in templates live in `templates/` and are compiled into the binary, so
//! `--prompt-template NAME` (convert) and `--template NAME` (prepare) work anywhere; a path to a
//! `.jinja` file works too.

pub mod chat;

use crate::accounting::RowCtx;
use crate::accounting::{reason, Reject};
use anyhow::{bail, Context, Result};
use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// Built-in prompt templates (convert --prompt-template NAME): blocks `system` (optional), `prompt`, `completion`.
pub const PROMPT_TEMPLATES: &[(&str, &str)] = &[
    ("alpaca", include_str!("../../templates/prompts/alpaca.jinja")),
    ("question-answer", include_str!("../../templates/prompts/question-answer.jinja")),
    ("translation", include_str!("../../templates/prompts/translation.jinja")),
    ("summarization", include_str!("../../templates/prompts/summarization.jinja")),
    ("classification", include_str!("../../templates/prompts/classification.jinja")),
];

/// Names the templates can use that are not columns.
const NOT_COLUMNS: &[&str] =
    &["row", "loop", "range", "dict", "namespace", "cycler", "joiner", "debug", "true", "false", "none"];

/// Reads a template given as a built-in name or a file path.
pub fn load_named(name_or_path: &str, builtins: &[(&str, &str)], what: &str) -> Result<(String, String)> {
    if let Some((n, src)) = builtins.iter().find(|(n, _)| *n == name_or_path) {
        return Ok((n.to_string(), src.to_string()));
    }
    let p = std::path::Path::new(name_or_path);
    if p.exists() {
        let src = std::fs::read_to_string(p).with_context(|| format!("cannot read template {}", p.display()))?;
        return Ok((p.display().to_string(), src));
    }
    let names: Vec<_> = builtins.iter().map(|(n, _)| *n).collect();
    bail!("{what} '{name_or_path}' is neither a built-in ({}) nor an existing file", names.join(", "))
}

fn prompt_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env
}

/// The `columns` format: system/prompt/completion rendered from the row's columns.
pub struct ColumnTemplates {
    env: Environment<'static>,
    from_file: bool,
    has_system: bool,
    /// A completion template was given (prompts for RL may have none).
    has_completion: bool,
    /// Columns the templates refer to.
    pub vars: BTreeSet<String>,
    /// Columns the template tests (`{% if col %}`, `col is defined`): they may be empty.
    optional: BTreeSet<String>,
}

impl ColumnTemplates {
    /// From `--prompt-template NAME|FILE`, or the `--prompt` and `--completion` templates; the
    /// completion is optional for `prompts` (RL prompts need no answer).
    pub fn new(prompt: Option<&str>, completion: Option<&str>, template: Option<&str>, prompts: bool) -> Result<Self> {
        let mut env = prompt_env();
        let mut vars = BTreeSet::new();
        let (from_file, has_system, has_completion);
        if let Some(t) = template {
            let (name, src) = load_named(t, PROMPT_TEMPLATES, "prompt template")?;
            env.add_template_owned("file".to_string(), src.clone())
                .with_context(|| format!("template {name} does not parse"))?;
            has_completion = src.contains("{% block completion %}");
            if !src.contains("{% block prompt %}") || (!has_completion && !prompts) {
                bail!("template {name} must define {{% block prompt %}} and {{% block completion %}} (and optionally {{% block system %}})");
            }
            has_system = src.contains("{% block system %}");
            from_file = true;
            vars.extend(env.get_template("file")?.undeclared_variables(false));
        } else {
            let (Some(p), Some(_)) = (prompt, completion.or(prompts.then_some(""))) else {
                bail!("the columns format needs --prompt and --completion templates (or --prompt-template NAME|FILE), e.g. \
                       --prompt \"Translate into {{{{ lang }}}}: {{{{ text }}}}\" --completion \"{{{{ translation }}}}\"");
            };
            env.add_template_owned("prompt".to_string(), p.to_string()).context("--prompt template does not parse")?;
            vars.extend(env.get_template("prompt")?.undeclared_variables(false));
            has_completion = completion.is_some();
            if let Some(c) = completion {
                env.add_template_owned("completion".to_string(), c.to_string())
                    .context("--completion template does not parse")?;
                vars.extend(env.get_template("completion")?.undeclared_variables(false));
            }
            has_system = false;
            from_file = false;
        }
        vars.retain(|v| !NOT_COLUMNS.contains(&v.as_str()));
        let sources: String = ["file", "prompt", "completion"]
            .iter()
            .filter_map(|n| env.get_template(n).ok().map(|t| t.source().to_string()))
            .collect();
        let optional = vars
            .iter()
            .filter(|v| {
                [format!("if {v}"), format!("{v} is defined"), format!("if not {v}"), format!("{v} or ")]
                    .iter()
                    .any(|pat| sources.contains(pat.as_str()))
            })
            .cloned()
            .collect();
        Ok(ColumnTemplates { env, from_file, has_system, has_completion, vars, optional })
    }

    /// Fails early when a fixed-schema source (CSV, Parquet) lacks columns the template needs.
    pub fn check_columns(&self, columns: &[String], source: &str) -> Result<()> {
        let missing: Vec<_> =
            self.vars.iter().filter(|v| !columns.contains(v) && !self.optional.contains(*v)).cloned().collect();
        if !missing.is_empty() && !columns.is_empty() {
            crate::progress::warn(&format!(
                "{source}: the template refers to {} not found in the first row's columns [{}]; rows without them are rejected",
                missing.iter().map(|m| format!("'{m}'")).collect::<Vec<_>>().join(", "),
                columns.join(", ")
            ));
        }
        Ok(())
    }

    /// Renders (system, prompt, completion) for one row.
    pub fn render(&self, row: &Map<String, Value>, ctx: &RowCtx) -> Result<(String, String, String), Reject> {
        let missing: Vec<&String> =
            self.vars.iter().filter(|v| !row.contains_key(v.as_str()) && !self.optional.contains(*v)).collect();
        if !missing.is_empty() {
            let cols: Vec<_> = row.keys().cloned().collect();
            return Err(ctx.reject(
                Some(missing[0]),
                reason::TEMPLATE_ERROR,
                format!(
                    "the template refers to column(s) {} that this row does not have (columns: {})",
                    missing.iter().map(|m| format!("'{m}'")).collect::<Vec<_>>().join(", "),
                    cols.join(", ")
                ),
            ));
        }
        if let Some(v) = self.vars.iter().find(|v| {
            !self.optional.contains(*v)
                && row.get(v.as_str()).and_then(Value::as_str).is_some_and(|s| s.trim().is_empty())
        }) {
            return Err(ctx.reject(
                Some(v),
                reason::EMPTY_FIELD,
                format!(
                    "column '{v}' is empty but the template needs it (test it with {{% if {v} %}} to make it optional)"
                ),
            ));
        }
        let mut ctx_map = row.clone();
        ctx_map.insert("row".into(), Value::Object(row.clone()));
        let value = minijinja::Value::from_serialize(&ctx_map);
        let err = |which: &str, e: minijinja::Error| {
            ctx.reject(Some(which), reason::TEMPLATE_ERROR, format!("the {which} template failed to render: {e:#}"))
        };
        let (system, prompt, completion) = if self.from_file {
            let t = self.env.get_template("file").expect("added");
            let mut captured = t.render_captured(&value).map_err(|e| err("template", e))?;
            captured.with_state_mut(|state| -> Result<_, Reject> {
                let system = if self.has_system {
                    state.render_block("system").map_err(|e| err("system", e))?
                } else {
                    String::new()
                };
                let p = state.render_block("prompt").map_err(|e| err("prompt", e))?;
                let c = if self.has_completion {
                    state.render_block("completion").map_err(|e| err("completion", e))?
                } else {
                    String::new()
                };
                Ok((system, p, c))
            })?
        } else {
            let p = self.env.get_template("prompt").expect("added").render(&value).map_err(|e| err("prompt", e))?;
            let c = match self.has_completion {
                true => self
                    .env
                    .get_template("completion")
                    .expect("added")
                    .render(&value)
                    .map_err(|e| err("completion", e))?,
                false => String::new(),
            };
            (String::new(), p, c)
        };
        if prompt.trim().is_empty() {
            return Err(ctx.reject(Some("prompt"), reason::EMPTY_FIELD, "the prompt template rendered to empty text"));
        }
        if self.has_completion && completion.trim().is_empty() {
            return Err(ctx.reject(
                Some("completion"),
                reason::EMPTY_FIELD,
                "the completion template rendered to empty text",
            ));
        }
        Ok((system.trim().to_string(), prompt, completion))
    }
}
