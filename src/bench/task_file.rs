//! Where keys are in a task file (for errors that name the line) and how its values read as text.

use serde_json::Value;
use std::path::Path;

/// Where top-level keys are in a task file.
pub struct Lines<'a> {
    pub file: &'a Path,
    pub text: &'a str,
}

impl Lines<'_> {
    pub fn at(&self, key: &str) -> String {
        let prefix = format!("{key}:");
        match self.text.lines().position(|l| l.starts_with(&prefix)) {
            Some(i) => format!("{} line {}", self.file.display(), i + 1),
            None => self.file.display().to_string(),
        }
    }
}

/// A JSON scalar as text the way Python's str() shows it.
pub fn plain_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        other => other.to_string(),
    }
}
