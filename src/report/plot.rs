//! Tiny PNG charts with no font dependency: a canvas, bars, polylines, and a 3x5 pixel font for
//! digits and a few letters (enough for axis labels). Used by `inspect` (length histogram).

use anyhow::{Context, Result};
use std::path::Path;

pub struct Canvas {
    pub w: usize,
    pub h: usize,
    px: Vec<[u8; 3]>,
}

pub const WHITE: [u8; 3] = [255, 255, 255];
pub const BLACK: [u8; 3] = [30, 30, 30];
pub const BLUE: [u8; 3] = [52, 101, 164];
pub const ORANGE: [u8; 3] = [230, 120, 30];
pub const GREY: [u8; 3] = [200, 200, 200];

const GLYPHS: &[(char, [u8; 5])] = &[
    ('0', [0b111, 0b101, 0b101, 0b101, 0b111]),
    ('1', [0b010, 0b110, 0b010, 0b010, 0b111]),
    ('2', [0b111, 0b001, 0b111, 0b100, 0b111]),
    ('3', [0b111, 0b001, 0b111, 0b001, 0b111]),
    ('4', [0b101, 0b101, 0b111, 0b001, 0b001]),
    ('5', [0b111, 0b100, 0b111, 0b001, 0b111]),
    ('6', [0b111, 0b100, 0b111, 0b101, 0b111]),
    ('7', [0b111, 0b001, 0b010, 0b010, 0b010]),
    ('8', [0b111, 0b101, 0b111, 0b101, 0b111]),
    ('9', [0b111, 0b101, 0b111, 0b001, 0b111]),
    ('.', [0b000, 0b000, 0b000, 0b000, 0b010]),
    ('k', [0b100, 0b101, 0b110, 0b101, 0b101]),
    ('-', [0b000, 0b000, 0b111, 0b000, 0b000]),
];

impl Canvas {
    pub fn new(w: usize, h: usize) -> Self {
        Canvas { w, h, px: vec![WHITE; w * h] }
    }
    pub fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            self.px[y as usize * self.w + x as usize] = c;
        }
    }
    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }
    pub fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for i in 0..=n {
            self.set(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n, c);
        }
    }
    /// Text in the 3x5 font scaled by `s`; unknown characters are blank.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            if let Some((_, rows)) = GLYPHS.iter().find(|(g, _)| *g == ch) {
                for (r, bits) in rows.iter().enumerate() {
                    for col in 0..3 {
                        if bits & (0b100 >> col) != 0 {
                            let (px, py) = (x + (i as i64 * 4 + col) * scale, y + r as i64 * scale);
                            self.rect(px, py, px + scale - 1, py + scale - 1, c);
                        }
                    }
                }
            }
        }
    }
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        let data: Vec<u8> = self.px.iter().flatten().copied().collect();
        w.write_image_data(&data)?;
        Ok(())
    }
}

/// Compact number label: 1234 -> "1.2k".
pub fn label(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.abs() >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A histogram chart: `counts[i]` for bins starting at `edges[i]`.
pub fn histogram_png(path: &Path, edges: &[f64], counts: &[u64]) -> Result<()> {
    let (w, h, m) = (800usize, 400usize, 50i64);
    let mut c = Canvas::new(w, h);
    let (x0, y0, x1, y1) = (m, h as i64 - m, w as i64 - 20, 20i64);
    let max = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let n = counts.len().max(1) as i64;
    let bw = (x1 - x0) / n;
    for (i, &k) in counts.iter().enumerate() {
        let top = y0 - ((y0 - y1) as f64 * k as f64 / max) as i64;
        let bx = x0 + i as i64 * bw;
        c.rect(bx + 1, top, bx + bw - 1, y0, BLUE);
    }
    c.line(x0, y0, x1, y0, BLACK);
    c.line(x0, y0, x0, y1, BLACK);
    let step = (counts.len() / 8).max(1);
    for i in (0..counts.len()).step_by(step) {
        c.text(x0 + i as i64 * bw, y0 + 8, &label(edges[i]), 2, BLACK);
    }
    c.text(4, y1, &label(max), 2, BLACK);
    c.text(4, y0 - 10, "0", 2, BLACK);
    c.save_png(path)
}

/// A series of (x, y) points and its colour.
pub type Series<'a> = (&'a [(f64, f64)], [u8; 3]);

/// Line chart of one or two series over x (e.g. train and eval loss over steps).
pub fn lines_png(path: &Path, series: &[Series]) -> Result<()> {
    let (w, h, m) = (800usize, 400usize, 60i64);
    let mut c = Canvas::new(w, h);
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(s, _)| s.iter().copied()).collect();
    let (xmin, xmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (xr, yr) = ((xmax - xmin).max(1e-9), (ymax - ymin).max(1e-9));
    let (x0, y0, x1, y1) = (m, h as i64 - 40, w as i64 - 20, 20i64);
    let map = |p: (f64, f64)| {
        (x0 + ((p.0 - xmin) / xr * (x1 - x0) as f64) as i64, y0 - ((p.1 - ymin) / yr * (y0 - y1) as f64) as i64)
    };
    for (s, col) in series {
        for win in s.windows(2) {
            let (a, b) = (map(win[0]), map(win[1]));
            c.line(a.0, a.1, b.0, b.1, *col);
            c.line(a.0, a.1 + 1, b.0, b.1 + 1, *col);
        }
        if s.len() == 1 {
            let a = map(s[0]);
            c.rect(a.0 - 2, a.1 - 2, a.0 + 2, a.1 + 2, *col);
        }
    }
    c.line(x0, y0, x1, y0, BLACK);
    c.line(x0, y0, x0, y1, BLACK);
    c.text(4, y1, &label(ymax), 2, BLACK);
    c.text(4, y0 - 10, &label(ymin), 2, BLACK);
    c.text(x0, y0 + 10, &label(xmin), 2, BLACK);
    c.text(x1 - 40, y0 + 10, &label(xmax), 2, BLACK);
    c.save_png(path)
}
