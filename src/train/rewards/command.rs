//! `--reward command:CMD`: rewards from an external program, so they can be written in any language.
//! For each batch the program is started with `sh -c CMD`, reads one JSON object per completion on
//! its stdin (`{"prompt", "completion", "id", ...the prompt row's columns}`), and writes one number
//! per line on its stdout, in order. A program that fails, hangs past the timeout, or prints
//! something that is not a number stops the run with the completion it was on.

use super::{RewardFn, Sample};
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

pub struct Command {
    cmd: String,
    timeout: Duration,
}

impl Command {
    pub fn new(cmd: &str, timeout_s: f64) -> Self {
        Command { cmd: cmd.to_string(), timeout: Duration::from_secs_f64(timeout_s.max(0.001)) }
    }
}

/// The line the program reads for one completion.
fn input_line(s: &Sample) -> String {
    let mut o = Map::new();
    for (k, v) in s.columns {
        o.insert(k.clone(), Value::String(v.clone()));
    }
    o.insert("id".into(), Value::String(s.label.clone()));
    o.insert("prompt".into(), Value::String(s.prompt.to_string()));
    o.insert("completion".into(), Value::String(s.completion.to_string()));
    Value::Object(o).to_string()
}

impl RewardFn for Command {
    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>> {
        let mut child = Process::new("sh")
            .arg("-c")
            .arg(&self.cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the reward command `{}`", self.cmd))?;
        let input: String = samples.iter().map(|s| input_line(s) + "\n").collect();
        let mut stdin = child.stdin.take().expect("piped");
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes()); // a program that stops reading is reported below
        });
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut stderr = child.stderr.take().expect("piped");
        let errors = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let start = Instant::now();
        let mut values = Vec::with_capacity(samples.len());
        let label = |i: usize| samples.get(i).map_or("(past the last completion)".to_string(), |s| s.label.clone());
        while values.len() < samples.len() {
            let left = self.timeout.saturating_sub(start.elapsed());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let v: f64 = line.trim().parse().map_err(|_| {
                        anyhow::anyhow!(
                            "the reward command `{}` printed {:?} for completion {}; it must print one number per line",
                            self.cmd,
                            line,
                            label(values.len())
                        )
                    })?;
                    values.push(v);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "the reward command `{}` did not answer within {:.0}s; it was on completion {} ({} of {} scored)",
                        self.cmd,
                        self.timeout.as_secs_f64(),
                        label(values.len()),
                        values.len(),
                        samples.len()
                    );
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = writer.join();
        let _ = reader.join();
        let status = child.wait()?;
        let err_text = errors.join().unwrap_or_default();
        let tail: String =
            err_text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        if !status.success() {
            bail!(
                "the reward command `{}` failed ({status}) on completion {} ({} of {} scored){}",
                self.cmd,
                label(values.len()),
                values.len(),
                samples.len(),
                if tail.is_empty() { String::new() } else { format!("; its stderr ends:\n{tail}") }
            );
        }
        if values.len() < samples.len() {
            bail!(
                "the reward command `{}` printed {} number(s) for {} completions; none for completion {}",
                self.cmd,
                values.len(),
                samples.len(),
                label(values.len())
            );
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn run(cmd: &str, timeout: f64) -> Result<Vec<f64>> {
        let cols: BTreeMap<String, String> = [("answer".to_string(), "4".to_string())].into();
        let s = |i: usize, c: &'static str| Sample {
            label: format!("p:1#{i}"),
            prompt: "2+2?",
            completion: c,
            prompt_ids: &[],
            completion_ids: &[],
            columns: &cols,
        };
        Command::new(cmd, timeout).score(&[s(0, "4"), s(1, "five")])
    }

    #[test]
    fn a_program_scores_each_line_and_its_failures_name_the_completion() {
        // A reward in another language: 1 when the completion equals the row's answer.
        let py = r#"python3 -c 'import sys,json
for l in sys.stdin:
    r=json.loads(l); print(1.0 if r["completion"]==r["answer"] else 0.0)'"#;
        assert_eq!(run(py, 30.0).unwrap(), vec![1.0, 0.0]);
        let e = run("echo 1; echo oops", 30.0).unwrap_err().to_string();
        assert!(e.contains("\"oops\"") && e.contains("p:1#1"), "{e}");
        let e = run("echo 1; echo boom >&2; exit 3", 30.0).unwrap_err().to_string();
        assert!(e.contains("failed") && e.contains("p:1#1") && e.contains("boom"), "{e}");
        let e = run("sleep 5", 0.3).unwrap_err().to_string();
        assert!(e.contains("did not answer within") && e.contains("p:1#0"), "{e}");
        let e = run("echo 1", 30.0).unwrap_err().to_string();
        assert!(e.contains("none for completion p:1#1"), "{e}");
    }
}
