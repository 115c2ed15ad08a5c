//! `tunekit report DIR... --out report.html`: one self-contained HTML file over shard and run
//! directories ([`crate::report::html`]).

use super::Summary;
use crate::output::AtomicFile;
use anyhow::Result;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

pub struct ReportOptions {
    pub dirs: Vec<PathBuf>,
    pub out: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct ReportSummary {
    pub command: &'static str,
    pub out: String,
    pub bytes: usize,
    pub seconds: f64,
}

pub fn run(o: &ReportOptions) -> Result<ReportSummary> {
    let start = std::time::Instant::now();
    let dirs: Vec<&std::path::Path> = o.dirs.iter().map(|d| d.as_path()).collect();
    let html = crate::report::html::report(&dirs)?;
    let mut f = AtomicFile::create(&o.out)?;
    f.write_all(html.as_bytes())?;
    f.commit()?;
    Ok(ReportSummary {
        command: "report",
        out: o.out.display().to_string(),
        bytes: html.len(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

impl Summary for ReportSummary {
    fn print_human(&self) {
        println!("wrote {} ({:.1} KB) in {:.2}s", self.out, self.bytes as f64 / 1024.0, self.seconds);
    }
}
