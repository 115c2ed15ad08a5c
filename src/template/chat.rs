//! Hugging Face chat templates, rendered as transformers' `apply_chat_template` renders them:
//! trim_blocks + lstrip_blocks, Python string methods (minijinja-contrib pycompat), `tojson` as
//! Python's `json.dumps(ensure_ascii=False)`, `raise_exception`, `strftime_now`, the tokenizer's
//! special tokens as variables, and `{% generation %}` markers removed (transformers only uses
//! them for its assistant mask, which tunekit derives by rendering prefixes instead).

use crate::record::Message;
use anyhow::{Context, Result};
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value as JValue};
use serde::Serialize;
use serde_json::{Map, Value};

/// Built-in chat templates for tokenizers that ship none (`--template NAME`).
pub const CHAT_TEMPLATES: &[(&str, &str)] = &[
    ("chatml", include_str!("../../templates/chat/chatml.jinja")),
    ("llama3", include_str!("../../templates/chat/llama3.jinja")),
    ("mistral", include_str!("../../templates/chat/mistral.jinja")),
    ("gemma", include_str!("../../templates/chat/gemma.jinja")),
    ("phi3", include_str!("../../templates/chat/phi3.jinja")),
    ("zephyr", include_str!("../../templates/chat/zephyr.jinja")),
    ("alpaca", include_str!("../../templates/chat/alpaca.jinja")),
    ("harmony", include_str!("../../templates/chat/harmony.jinja")),
];

pub struct ChatTemplate {
    env: Environment<'static>,
    pub name: String,
    pub sha256: String,
    /// The template's text as given (what `sha256` is of).
    pub source: String,
    /// bos_token, eos_token, ... as the template sees them.
    specials: Map<String, Value>,
    /// Extra variables passed to every render (transformers' `**kwargs`), e.g. `enable_thinking`.
    pub vars: Map<String, Value>,
}

#[derive(Serialize)]
struct Ctx<'a> {
    messages: &'a [Message],
    /// None renders as `none`, as transformers passes `tools=None` and `documents=None`.
    tools: Option<&'a Value>,
    documents: Option<&'a Value>,
    add_generation_prompt: bool,
    #[serde(flatten)]
    specials: &'a Map<String, Value>,
    #[serde(flatten)]
    vars: &'a Map<String, Value>,
}

fn strip_generation_tags(src: &str) -> String {
    let mut out = src.to_string();
    for tag in ["generation", "endgeneration"] {
        for (open, close) in [("{%", "%}"), ("{%-", "-%}"), ("{%-", "%}"), ("{%", "-%}")] {
            for sp in [" ", ""] {
                out = out.replace(&format!("{open}{sp}{tag}{sp}{close}"), "");
            }
        }
    }
    out
}

impl ChatTemplate {
    /// `specials`: the tokenizer's special tokens map (bos_token, eos_token, unk_token, pad_token).
    pub fn new(name: &str, source: &str, specials: Map<String, Value>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<JValue, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        // Python's iter(): strings, lists and dicts are iterable; None (transformers' `tools=None`) is not.
        env.add_test("iterable", |v: JValue| {
            matches!(
                v.kind(),
                minijinja::value::ValueKind::Seq
                    | minijinja::value::ValueKind::Map
                    | minijinja::value::ValueKind::String
                    | minijinja::value::ValueKind::Iterable
            )
        });
        env.add_template_owned("chat".to_string(), strip_generation_tags(source))
            .with_context(|| format!("chat template {name} does not parse"))?;
        let sha256 = crate::digest::sha256(source.as_bytes());
        Ok(ChatTemplate { env, name: name.to_string(), sha256, source: source.to_string(), specials, vars: Map::new() })
    }

    pub fn builtin_or_file(name_or_path: &str, specials: Map<String, Value>) -> Result<Self> {
        let (name, src) = super::load_named(name_or_path, CHAT_TEMPLATES, "chat template")?;
        Self::new(&name, &src, specials)
    }

    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let ctx =
            Ctx { messages, tools, documents: None, add_generation_prompt, specials: &self.specials, vars: &self.vars };
        self.env.get_template("chat").expect("added in new").render(JValue::from_serialize(&ctx))
    }
}

/// transformers' `strftime_now`: the current local time formatted, or the time of
/// `SOURCE_DATE_EPOCH` (UTC) when it is set, so renders that print a date can be reproduced.
fn strftime_now(fmt: String) -> String {
    match std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.trim().parse::<i64>().ok()) {
        Some(t) => chrono::DateTime::from_timestamp(t, 0).unwrap_or_default().format(&fmt).to_string(),
        None => chrono::Local::now().format(&fmt).to_string(),
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=.., separators=.., sort_keys=..)`.
fn tojson(value: JValue, kwargs: Kwargs) -> Result<JValue, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let v: Value = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let (item_sep, key_sep) = match &separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    py_dumps(&v, indent, &item_sep, &key_sep, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(JValue::from_safe_string(out))
}

/// Python's json.dumps with ensure_ascii=False.
pub fn py_dumps(
    v: &Value,
    indent: Option<usize>,
    item_sep: &str,
    key_sep: &str,
    sort: bool,
    level: usize,
    out: &mut String,
) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                if f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else {
                    out.push_str(&n.to_string());
                }
            } else {
                out.push_str(&n.to_string())
            }
        }
        Value::String(s) => py_str(s, out),
        Value::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_dumps(x, indent, item_sep, key_sep, sort, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(o) => {
            if o.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            let mut keys: Vec<&String> = o.keys().collect();
            if sort {
                keys.sort();
            }
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_str(k, out);
                out.push_str(key_sep);
                py_dumps(&o[k], indent, item_sep, key_sep, sort, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

fn py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}
