//! `--reward SPEC[*W]`, parsed once where it is given: which function (`match:COLUMN`,
//! `regex:PATTERN`, `json`, `length:N`, `model:DIR`, `command:CMD`) and its weight. A trailing
//! `*W` is a weight only when W is a number, so `regex:a*b` is a pattern. Written and read back
//! as the text it was given (options, config files, checkpoints).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The reward functions `--reward` names.
#[derive(Debug, Clone, PartialEq)]
pub enum RewardKind {
    /// The final answer equals the prompt row's COLUMN (number-aware).
    Match(String),
    Regex(String),
    Json,
    /// Closer to N words is higher.
    Length(f64),
    /// A reward model trained with `train --method reward`.
    Model(PathBuf),
    /// An external program: one JSON object per completion on stdin, one number per line out.
    Command(String),
}

/// One `--reward`: the function, its weight, and the spec's text without the weight (the name
/// its metrics are logged under).
#[derive(Debug, Clone, PartialEq)]
pub struct RewardSpec {
    pub kind: RewardKind,
    pub weight: f64,
    pub name: String,
    /// The spec as given (with its weight).
    text: String,
}

const USE: &str =
    "use match:COLUMN, regex:PATTERN, json, length:N, model:DIR or command:CMD, optionally weighted as SPEC*W";

impl std::str::FromStr for RewardSpec {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<Self> {
        let (body, weight) = split_weight(spec);
        let kind = match body.split_once(':').map_or((body, ""), |(k, v)| (k, v)) {
            ("match", col) if !col.is_empty() => RewardKind::Match(col.to_string()),
            ("regex", pat) if !pat.is_empty() => {
                regex::Regex::new(pat).with_context(|| format!("--reward {spec}: not a regular expression"))?;
                RewardKind::Regex(pat.to_string())
            }
            ("json", "") => RewardKind::Json,
            ("length", n) => RewardKind::Length(n.parse().ok().filter(|n: &f64| *n > 0.0).with_context(|| {
                format!("--reward {spec}: length:N needs a positive number of words, e.g. length:50")
            })?),
            ("model", dir) if !dir.is_empty() => RewardKind::Model(PathBuf::from(dir)),
            ("command", cmd) if !cmd.trim().is_empty() => RewardKind::Command(cmd.to_string()),
            _ => bail!("--reward {spec}: {USE}"),
        };
        Ok(RewardSpec { kind, weight, name: body.to_string(), text: spec.to_string() })
    }
}

impl std::fmt::Display for RewardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for RewardSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for RewardSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `SPEC*W` -> (SPEC, W); a spec without a trailing number keeps weight 1.
fn split_weight(spec: &str) -> (&str, f64) {
    match spec.rsplit_once('*') {
        Some((body, w)) if !body.is_empty() => match w.trim().parse::<f64>() {
            Ok(w) => (body, w),
            Err(_) => (spec, 1.0),
        },
        _ => (spec, 1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_a_trailing_number_only() {
        assert_eq!(split_weight("match:answer*0.5"), ("match:answer", 0.5));
        assert_eq!(split_weight("regex:a*b"), ("regex:a*b", 1.0));
        assert_eq!(split_weight("json"), ("json", 1.0));
        assert_eq!(split_weight("length:20*2"), ("length:20", 2.0));
    }

    #[test]
    fn one_rule_for_every_reader() {
        let s: RewardSpec = "model:/runs/rm*0.5".parse().unwrap();
        assert_eq!((s.kind, s.weight, s.name.as_str()), (RewardKind::Model("/runs/rm".into()), 0.5, "model:/runs/rm"));
        // A star inside a path or pattern stays in it.
        let s: RewardSpec = "model:/runs/a*b/rm".parse().unwrap();
        assert_eq!(s.kind, RewardKind::Model("/runs/a*b/rm".into()));
        let s: RewardSpec = "regex:\\boxed\\{*0.2".parse().unwrap();
        assert_eq!((s.kind, s.weight), (RewardKind::Regex("\\boxed\\{".into()), 0.2));
        assert_eq!(serde_json::to_string(&"length:20*2".parse::<RewardSpec>().unwrap()).unwrap(), "\"length:20*2\"");
        for bad in ["nope", "length:-1", "match:", "regex:("] {
            assert!(bad.parse::<RewardSpec>().is_err(), "{bad}");
        }
    }
}
