//! `--config FILE.toml` (train, and the commands that read raw rows: convert, dedup, prepare, export
//! openai, score): the file's keys become flags placed before the command line's own, so flags given
//! on the command line win.

use anyhow::Result;

/// Keys whose flag is given once per value (`reward = ["match:answer", "length:20*0.1"]`); the other
/// lists become one comma-separated value (`target = ["q_proj", "v_proj"]`).
const REPEATABLE: &[&str] = &["reward", "decontaminate"];

/// The commands that take `--config` (`export` through its `openai` target).
const COMMANDS: &[&str] = &["train", "convert", "dedup", "prepare", "export", "score"];

/// `COMMAND --config FILE.toml`: the file's keys become flags placed right after the command (after
/// `export openai` for export), before the command line's own, so flags given on the command line win.
pub fn expand_config(args: Vec<String>) -> Result<Vec<String>> {
    let Some(mut t) = args.iter().skip(1).position(|a| COMMANDS.contains(&a.as_str())).map(|i| i + 1) else {
        return Ok(args);
    };
    if args[t] == "export" && args.get(t + 1).is_some_and(|a| a == "openai") {
        t += 1;
    }
    let cfg_path = args.iter().enumerate().skip(t + 1).find_map(|(i, a)| {
        if a == "--config" {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix("--config=").map(str::to_string)
        }
    });
    let Some(path) = cfg_path else { return Ok(args) };
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read --config {path}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| anyhow::anyhow!("--config {path}: not valid TOML: {e}"))?;
    let mut extra = Vec::new();
    for (k, v) in table {
        if k == "config" {
            continue;
        }
        let flag = format!("--{}", k.replace('_', "-"));
        match v {
            toml::Value::Boolean(true) => extra.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => extra.extend([flag, s]),
            toml::Value::Integer(i) => extra.extend([flag, i.to_string()]),
            toml::Value::Float(f) => extra.extend([flag, f.to_string()]),
            toml::Value::Array(a) => {
                let items: Vec<String> =
                    a.iter().map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string())).collect();
                if REPEATABLE.contains(&k.as_str()) {
                    // One flag per item: a reward spec may itself hold commas.
                    for i in items {
                        extra.extend([flag.clone(), i]);
                    }
                } else {
                    extra.extend([flag, items.join(",")]);
                }
            }
            other => anyhow::bail!("--config {path}: key '{k}' has an unsupported value {other}"),
        }
    }
    let mut out = args[..=t].to_vec();
    out.extend(extra);
    out.extend(args[t + 1..].iter().cloned());
    Ok(out)
}
