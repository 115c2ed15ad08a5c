//! `tunekit report` opened in a real browser: headless Chromium (Debian's chromium) loads the
//! report of the quickstart's shards and run without console errors, and the charts it renders
//! have their titles, axis titles and legends. `prepare` and `train` write one beside their outputs.

mod common;

use common::{stdout_json, tunekit};
use std::path::Path;
use std::process::Command;

fn chromium() -> Option<&'static str> {
    let bin = ["chromium", "chromium-browser"].into_iter().find(|c| common::runs(c, &["--version"]));
    common::found(bin, "chromium (.ci/fetch-tools)")
}

/// Chromium headless on `page`: (the DOM after load, its log), and a screenshot to `png`.
fn open_in_chromium(bin: &str, page: &Path, png: &Path, profile: &Path) -> (String, String) {
    let url = format!("file://{}", page.display());
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--enable-logging=stderr",
        "--v=0",
    ];
    let profile = format!("--user-data-dir={}", profile.display());
    let dom = Command::new(bin).args(common).arg(&profile).args(["--dump-dom", &url]).output().expect("run chromium");
    assert!(dom.status.success(), "{}", String::from_utf8_lossy(&dom.stderr));
    let shot = Command::new(bin)
        .args(common)
        .arg(&profile)
        .args(["--window-size=1360,2400", &format!("--screenshot={}", png.display()), &url])
        .output()
        .expect("run chromium");
    assert!(shot.status.success(), "{}", String::from_utf8_lossy(&shot.stderr));
    let log = format!("{}{}", String::from_utf8_lossy(&dom.stderr), String::from_utf8_lossy(&shot.stderr));
    (String::from_utf8_lossy(&dom.stdout).to_string(), log)
}

#[test]
fn the_report_opens_in_chromium_with_titled_charts_and_legends() {
    let dir = tempfile::tempdir().unwrap();
    let o = tunekit(&["quickstart", "--out", "qs", "-q"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.path().join("qs/shards/report.html").exists(), "prepare writes a report beside the shards");
    assert!(dir.path().join("qs/lora/report.html").exists(), "train writes a report beside the adapter");
    let o = tunekit(&["report", "qs/shards", "qs/lora", "--out", "r.html", "--json"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = stdout_json(&o);
    assert!(s["bytes"].as_u64().unwrap() < 3_000_000, "a few MB at most: {s}");
    let html = std::fs::read_to_string(dir.path().join("r.html")).unwrap();
    // Self-contained: no scripts, stylesheets or images fetched (SVG's xmlns is a name, not a fetch).
    for fetch in ["<script", "<link", "src=", "href=", "@import", "url("] {
        assert!(!html.contains(fetch), "the report fetches something: {fetch}");
    }
    let Some(bin) = chromium() else { return };
    let png = dir.path().join("r.png");
    let (dom, log) = open_in_chromium(bin, &dir.path().join("r.html"), &png, &dir.path().join("profile"));
    let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE") || l.contains("Uncaught")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    // Titles, axis titles and legend entries, as rendered in the page.
    for t in [
        "Loss",
        "step",
        "loss (nats per trained token)",
        "train loss",
        "train loss (smoothed)",
        "eval loss",
        "Learning rate",
        "Sample length",
        "sequences",
        "Trained share of each row (first 2,000 rows)",
        "Rows not kept, by reason",
        "Kept rows by source",
        "rows kept",
    ] {
        assert!(dom.contains(&format!(">\n{t}\n</text>")), "the page lacks {t:?}");
    }
    assert!(dom.contains("<mark>"), "a decoded row with its trained text highlighted");
    assert!(dom.contains("<h3>Rows by source</h3>"), "the table of rows by source");
    assert!(std::fs::metadata(&png).unwrap().len() > 20_000, "a screenshot with content");
}

/// The share of an RGB PNG's pixels that are not white, after checking its size.
fn drawn_share(path: &std::path::Path) -> f64 {
    let d = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut r = d.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height, info.color_type), (640, 320, png::ColorType::Rgb), "{}", path.display());
    let px = &buf[..info.buffer_size()];
    px.chunks(3).filter(|p| p != &[255, 255, 255]).count() as f64 / (px.len() / 3) as f64
}

#[test]
fn the_png_charts_are_drawn_by_the_charting_library() {
    let dir = tempfile::tempdir().unwrap();
    let o = tunekit(&["quickstart", "--out", "qs", "-q"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = tunekit(&["inspect", "qs/shards", "-q"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Axes, tick labels, titles, bars or curves: a chart covers a good part of its canvas, a blank
    // or nearly blank image does not.
    for png in ["qs/lora/loss.png", "qs/shards/lengths.png"] {
        let share = drawn_share(&dir.path().join(png));
        assert!(share > 0.05, "{png}: only {:.1}% of the pixels drawn", 100.0 * share);
    }
}
