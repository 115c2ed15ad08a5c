//! The benchmark section of a run's report: `bench.json` (what `tunekit bench --adapter RUN` left
//! in the run directory) as a table of every task and metric, the base and each adapter with their
//! standard errors and the paired differences, a bar chart of the differences, and documents where
//! the base and an adapter disagree.

use super::charts::{bar_chart, escape};
use anyhow::Result;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

fn estimate(v: &Value, signed: bool) -> String {
    let x = v["value"].as_f64().unwrap_or(f64::NAN);
    let se = v["stderr"].as_f64().unwrap_or(f64::NAN);
    let x = if signed { format!("{x:+.4}") } else { format!("{x:.4}") };
    if se.is_finite() {
        format!("{x} ± {se:.4}")
    } else {
        x
    }
}

/// The section, when `dir/bench.json` exists.
pub fn section(dir: &Path, out: &mut String) -> Result<()> {
    let path = dir.join("bench.json");
    let Ok(bytes) = std::fs::read(&path) else { return Ok(()) };
    let b: Value = serde_json::from_slice(&bytes)?;
    let names: Vec<&str> = b["subjects"].as_array().into_iter().flatten().filter_map(|s| s["name"].as_str()).collect();
    writeln!(out, "<h2>Benchmarks: {}</h2>", escape(&dir.display().to_string()))?;
    writeln!(
        out,
        "<p>`tunekit bench` of {} (standard errors; differences paired over the same documents).</p>",
        escape(b["model"].as_str().unwrap_or(""))
    )?;
    out.push_str("<table><tr><th>task</th><th>metric</th><th>n</th>");
    for n in &names {
        write!(out, "<th>{}</th>", escape(n))?;
    }
    for n in names.iter().skip(1) {
        write!(out, "<th>{} − {}</th>", escape(n), escape(names[0]))?;
    }
    out.push_str("</tr>\n");
    let mut bars = vec![];
    for t in b["tasks"].as_array().into_iter().flatten() {
        let task = t["task"].as_str().unwrap_or("");
        for m in t["metrics"].as_array().into_iter().flatten() {
            let key = m["key"].as_str().unwrap_or("");
            write!(out, "<tr><td>{}</td><td>{}</td><td>{}</td>", escape(task), escape(key), t["documents"])?;
            for v in m["values"].as_array().into_iter().flatten() {
                write!(out, "<td>{}</td>", estimate(v, false))?;
            }
            for (i, d) in m["differences"].as_array().into_iter().flatten().enumerate() {
                write!(out, "<td>{}</td>", estimate(d, true))?;
                if i == 0 {
                    bars.push((
                        format!("{task} {}", key.split(',').next().unwrap_or(key)),
                        d["value"].as_f64().unwrap_or(0.0),
                    ));
                }
            }
            out.push_str("</tr>\n");
        }
    }
    out.push_str("</table>\n");
    if names.len() > 1 && !bars.is_empty() {
        let title = format!("{} − {}", names[1], names[0]);
        writeln!(out, "<div class=\"charts\">{}</div>", bar_chart(&title, "task and metric", "difference", &bars)?)?;
    }
    let examples: Vec<&Value> = b["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["disagreements"].as_array().into_iter().flatten())
        .collect();
    if !examples.is_empty() {
        out.push_str("<h3>Where they disagree</h3>\n");
        for e in examples {
            let side = |v: &Value| -> String {
                match (v.get("response"), v.get("pred")) {
                    (Some(r), _) => format!("answer {}", r),
                    (_, Some(p)) => format!("picks choice {p} (target {})", v["target"]),
                    _ => v.to_string(),
                }
            };
            writeln!(
                out,
                "<p>{} document {} ({}): {} {}; {} {}</p><pre>{}</pre>",
                escape(e["metric"].as_str().unwrap_or("")),
                e["doc_id"],
                escape(e["subject"].as_str().unwrap_or("")),
                escape(names.first().copied().unwrap_or("base")),
                escape(&side(&e["first"])),
                escape(e["subject"].as_str().unwrap_or("")),
                escape(&side(&e["other"])),
                escape(e["context"].as_str().unwrap_or(""))
            )?;
        }
    }
    Ok(())
}
