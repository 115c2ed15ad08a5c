//! Charts as SVG (plotters' SVG backend, for the HTML report) and PNG (its bitmap backend, for
//! `inspect` and the loss plot beside a run): line charts with axis titles, tick labels and a legend
//! (training curves, several runs overlaid), and bar charts (length histograms, rows by reason).
//! Long curves are downsampled to at most [`MAX_POINTS`] points per series, keeping each bucket's
//! lowest and highest value, so a 10,000-step run stays a small file and its spikes still show.

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use std::path::Path;

pub const MAX_POINTS: usize = 1000;

/// One named curve.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Text made safe inside HTML and SVG markup.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// At most `max` points: each bucket of consecutive points kept as its lowest and highest.
pub fn downsample(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max || max < 4 {
        return points.to_vec();
    }
    let per = points.len().div_ceil(max / 2);
    points
        .chunks(per)
        .flat_map(|c| {
            let lo = c.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)).expect("chunks are not empty");
            let hi = c.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1)).expect("chunks are not empty");
            if lo.0 <= hi.0 {
                [lo, hi]
            } else {
                [hi, lo]
            }
        })
        .collect()
}

/// An exponential moving average (TensorBoard's smoothing, `weight` 0.6 by default there).
pub fn smoothed(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut last = None;
    points
        .iter()
        .map(|&(x, y)| {
            let s = match last {
                None => y,
                Some(l) => l * weight + (1.0 - weight) * y,
            };
            last = Some(s);
            (x, s)
        })
        .collect()
}

/// The curves of a loss chart: the training loss raw and smoothed, and the held-out metric (named
/// by its key, "eval_loss" for the loss itself) where there is one; `label` names each curve.
pub fn loss_series(
    label: impl Fn(&str) -> String,
    train: &[(f64, f64)],
    eval: Option<(&str, &[(f64, f64)])>,
) -> Vec<Series> {
    let mut s = vec![];
    if !train.is_empty() {
        s.push(Series { name: label("train loss"), points: train.to_vec() });
        s.push(Series { name: label("train loss (smoothed)"), points: smoothed(train, 0.6) });
    }
    if let Some((key, points)) = eval.filter(|e| !e.1.is_empty()) {
        let name = if key == "eval_loss" { "eval loss" } else { key };
        s.push(Series { name: label(name), points: points.to_vec() });
    }
    s
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-9);
    (lo - pad, hi + pad)
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

/// The size of every chart, in pixels.
const SIZE: (u32, u32) = (640, 320);

/// The font the charts measure their text with (and the PNGs draw it with): DejaVu Sans, subset to
/// Latin-1 (assets/fonts, with its licence), registered once as plotters' "sans-serif".
fn fonts() -> Result<()> {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *FONT.get_or_init(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the bundled chart font does not load"))
    }
}

/// Where the legend covers the fewest points: the corner of the plot with the least data in it.
fn legend_corner(series: &[Series], (x0, x1): (f64, f64), (y0, y1): (f64, f64)) -> SeriesLabelPosition {
    let (xm, ym) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
    let mut n = [0usize; 4];
    for p in series.iter().flat_map(|s| s.points.iter()) {
        n[(p.0 >= xm) as usize + 2 * (p.1 < ym) as usize] += 1;
    }
    let corners = [
        SeriesLabelPosition::UpperLeft,
        SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::LowerLeft,
        SeriesLabelPosition::LowerRight,
    ];
    // Ties go to the upper right, where a legend is looked for first.
    let order = [1, 0, 3, 2];
    let best = order.iter().copied().min_by_key(|&i| n[i]).expect("four corners");
    corners[best].clone()
}

fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    fonts()?;
    let series: Vec<Series> =
        series.iter().map(|s| Series { name: s.name.clone(), points: downsample(&s.points, MAX_POINTS) }).collect();
    let xs = bounds(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let ys = bounds(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
            .map_err(err)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(legend_corner(&series, xs, ys))
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    bars: &[(String, f64)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    fonts()?;
    let n = bars.len().max(1);
    let top = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0) * 1.08;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(56)
        .y_label_area_size(64)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_labels(n.min(24))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 11))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    // One rectangle per bar, in the bars' order (plotters' Histogram collects them in a hash map, so
    // its SVG came out in a different order on every run).
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let mut r =
                Rectangle::new([(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), b.1)], COLOURS[0].filled());
            r.set_margin(0, 0, 2, 2);
            r
        }))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// A line chart of `series` as an SVG document.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<String> {
    let mut svg = String::new();
    draw_lines(SVGBackend::with_string(&mut svg, SIZE).into_drawing_area(), title, x_label, y_label, series)?;
    Ok(svg)
}

/// A bar chart of labelled values as an SVG document (the labels under the bars).
pub fn bar_chart(title: &str, x_label: &str, y_label: &str, bars: &[(String, f64)]) -> Result<String> {
    let mut svg = String::new();
    draw_bars(SVGBackend::with_string(&mut svg, SIZE).into_drawing_area(), title, x_label, y_label, bars)?;
    Ok(svg)
}

/// The line chart as a PNG file at `path`.
pub fn line_chart_png(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    draw_lines(BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area(), title, x_label, y_label, series)?;
    save_png(path, &rgb)
}

/// The bar chart as a PNG file at `path`.
pub fn bar_chart_png(path: &Path, title: &str, x_label: &str, y_label: &str, bars: &[(String, f64)]) -> Result<()> {
    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    draw_bars(BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area(), title, x_label, y_label, bars)?;
    save_png(path, &rgb)
}

/// An RGB image of [`SIZE`] as a PNG file, written whole or not at all.
fn save_png(path: &Path, rgb: &[u8]) -> Result<()> {
    let mut f = crate::output::AtomicFile::create(path)?;
    {
        let mut enc = png::Encoder::new(&mut f, SIZE.0, SIZE.1);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(rgb).with_context(|| format!("cannot write {}", path.display()))?;
    }
    f.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_carry_titles_axis_titles_and_a_legend() {
        let s = |name: &str, k: f64| Series {
            name: name.into(),
            points: (0..50).map(|i| (i as f64, k / (1.0 + i as f64))).collect(),
        };
        let svg = line_chart("Loss", "step", "loss", &[s("train", 3.0), s("eval", 2.5)]).unwrap();
        for t in ["Loss", "step", "loss", "train", "eval"] {
            assert!(svg.contains(&format!(">\n{t}\n</text>")), "{t} missing");
        }
        let bars = bar_chart("Rejected", "reason", "rows", &[("too_long".into(), 5.0), ("empty".into(), 2.0)]).unwrap();
        assert!(bars.contains(">\ntoo_long\n</text>") && bars.contains(">\nrows\n</text>"));
    }

    #[test]
    fn long_curves_are_downsampled_keeping_their_extremes() {
        let pts: Vec<(f64, f64)> =
            (0..10_000).map(|i| (i as f64, if i == 7_777 { 50.0 } else { (i % 7) as f64 })).collect();
        let d = downsample(&pts, MAX_POINTS);
        assert!(d.len() <= MAX_POINTS + 2, "{}", d.len());
        assert!(d.contains(&(7777.0, 50.0)), "the spike survives");
        let sm = smoothed(&[(0.0, 1.0), (1.0, 0.0)], 0.6);
        assert!((sm[1].1 - 0.6).abs() < 1e-12);
    }
}
