//! Training curves as a PNG: the loss per step with the evaluation losses on top, and, beside
//! them, every other evaluation metric (accuracies, recalls).
//!
//! The labels use a copy of DejaVu Sans cut down to ASCII and compiled into the binary
//! (`assets/`), so plots need no system fonts.

use crate::Error;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");
const FAMILY: &str = "neural-arch-sans";

/// The series of a `metrics.jsonl`: training loss by step, and each evaluation metric by step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curves {
    /// `(step, loss)` of every training step.
    pub train_loss: Vec<(f64, f64)>,
    /// `(step, value)` of each evaluation metric, by name.
    pub eval: BTreeMap<String, Vec<(f64, f64)>>,
}

impl Curves {
    /// Reads the lines of a `metrics.jsonl` written by the trainer; lines that are not JSON
    /// objects with a `step` are skipped.
    pub fn from_jsonl(text: &str) -> Self {
        let mut c = Curves::default();
        for line in text.lines() {
            let Ok(serde_json::Value::Object(map)) = serde_json::from_str(line) else {
                continue;
            };
            let Some(step) = map.get("step").and_then(|s| s.as_f64()) else {
                continue;
            };
            if let Some(loss) = map.get("loss").and_then(|l| l.as_f64()) {
                c.train_loss.push((step, loss));
                continue;
            }
            for (k, v) in &map {
                if let (true, Some(v)) = (k != "step", v.as_f64()) {
                    c.eval.entry(k.clone()).or_default().push((step, v));
                }
            }
        }
        c
    }
}

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::Checkpoint(format!("cannot draw the curves: {e}"))
}

/// The range of `values` with a margin, for an axis.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

/// One line of a panel: its name, points, colour and width.
type Line<'a> = (&'a str, &'a [(f64, f64)], RGBAColor, u32);

/// One chart: `lines` over steps `0..last_step`, with a legend.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    last_step: f64,
    lines: &[Line<'_>],
) -> Result<(), Error> {
    let (lo, hi) = span(lines.iter().flat_map(|l| l.1.iter()).map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .caption(caption, (FAMILY, 18))
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..last_step, lo..hi)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style((FAMILY, 13))
        .draw()
        .map_err(plot_error)?;
    for &(name, points, color, width) in lines {
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(width),
            ))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 13))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}

/// Draws `curves` into a 1200×450 PNG at `path` (atomically: a temporary file, then a rename):
/// the training loss with the evaluation losses on the left, other evaluation metrics on the
/// right.
pub fn write_png(curves: &Curves, title: &str, path: &Path) -> Result<(), Error> {
    // Registering the same family again is harmless; the bytes are 'static.
    plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| plot_error("the embedded font is unreadable"))?;
    let colors = [RED, GREEN, MAGENTA, CYAN, BLACK, BLUE];
    let mut losses: Vec<Line<'_>> = vec![("train loss", &curves.train_loss, BLUE.mix(0.6), 1)];
    let mut others: Vec<Line<'_>> = Vec::new();
    for (i, (name, points)) in curves.eval.iter().enumerate() {
        let line = (
            name.as_str(),
            points.as_slice(),
            colors[i % colors.len()].to_rgba(),
            2,
        );
        if name.contains("loss") {
            losses.push(line);
        } else {
            others.push(line);
        }
    }
    let last_step = curves
        .train_loss
        .iter()
        .chain(curves.eval.values().flatten())
        .map(|p| p.0)
        .fold(1.0, f64::max);
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (1200, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let root = root.titled(title, (FAMILY, 22)).map_err(plot_error)?;
        let (left, right) = root.split_horizontally(600);
        panel(&left, "loss", last_step, &losses)?;
        if !others.is_empty() {
            panel(&right, "evaluation", last_step, &others)?;
        }
        root.present().map_err(plot_error)?;
    }
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::Checkpoint(format!("cannot write {}: {e}", path.display())))
}

/// One picture of a [`write_tiles`] grid: `side`×`side` RGB pixels, row-major, and a caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Tile {
    /// Pixels per side.
    pub side: usize,
    /// `side · side` colours, row by row.
    pub rgb: Vec<[u8; 3]>,
    /// The text under the picture (ASCII).
    pub caption: String,
}

/// Draws `tiles` into a PNG at `path` (atomically), `columns` to a row, each pixel enlarged to
/// `scale`×`scale`, captions under the pictures and `title` on top. For pictures a person
/// should look at: attention maps, samples of a data set.
pub fn write_tiles(
    tiles: &[Tile],
    columns: usize,
    scale: u32,
    title: &str,
    path: &Path,
) -> Result<(), Error> {
    plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| plot_error("the embedded font is unreadable"))?;
    let side = tiles.iter().map(|t| t.side).max().unwrap_or(1) as u32;
    let columns = columns.clamp(1, tiles.len().max(1)) as u32;
    let rows = (tiles.len() as u32).div_ceil(columns).max(1);
    let (cell_w, cell_h) = ((side * scale + 16).max(150), side * scale + 30);
    let (w, h) = (columns * cell_w, rows * cell_h + 40);
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        root.draw(&Text::new(
            title.to_string(),
            (8, 8),
            (FAMILY, 20).into_font().color(&BLACK),
        ))
        .map_err(plot_error)?;
        for (i, t) in tiles.iter().enumerate() {
            let (col, row) = (i as u32 % columns, i as u32 / columns);
            let x0 = (col * cell_w + (cell_w - t.side as u32 * scale) / 2) as i32;
            let y0 = (40 + row * cell_h) as i32;
            for (p, c) in t.rgb.iter().enumerate().take(t.side * t.side) {
                let (x, y) = (
                    x0 + ((p % t.side) as u32 * scale) as i32,
                    y0 + ((p / t.side) as u32 * scale) as i32,
                );
                root.draw(&Rectangle::new(
                    [(x, y), (x + scale as i32, y + scale as i32)],
                    RGBColor(c[0], c[1], c[2]).filled(),
                ))
                .map_err(plot_error)?;
            }
            root.draw(&Text::new(
                t.caption.clone(),
                (
                    (col * cell_w + 6) as i32,
                    y0 + (t.side as u32 * scale) as i32 + 6,
                ),
                (FAMILY, 14).into_font().color(&BLACK),
            ))
            .map_err(plot_error)?;
        }
        root.present().map_err(plot_error)?;
    }
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::Checkpoint(format!("cannot write {}: {e}", path.display())))
}

/// Draws a heat map of `values` (`row_labels.len()` rows, row-major) into a PNG at `path`
/// (atomically): cells from blue (smallest) through white to red (largest), each with its
/// value, rows labelled on the left, columns headed by their index and, where `thumbnails`
/// holds one per column, that RGB image (`side × side` pixels, row-major). For CLIP's
/// image-caption similarity matrix: captions as rows, images as columns.
pub fn write_heatmap(
    values: &[f64],
    row_labels: &[String],
    thumbnails: &[Vec<[u8; 3]>],
    side: usize,
    title: &str,
    path: &Path,
) -> Result<(), Error> {
    plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| plot_error("the embedded font is unreadable"))?;
    let rows = row_labels.len().max(1);
    let cols = values.len() / rows;
    let (lo, hi) = span(values.iter().copied());
    // Room for the longest label (about 7 px a character at 12 px).
    let longest = row_labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0);
    let (cell, left, top) = (40i32, 40 + 7 * longest as i32, 60 + side as i32 + 22);
    let size = (
        (left + cell * cols as i32 + 20) as u32,
        (top + cell * rows as i32 + 20) as u32,
    );
    let colour = |v: f64| {
        let t = ((v - lo) / (hi - lo)).clamp(0.0, 1.0);
        // Blue (49, 54, 149) -> white -> red (165, 0, 38).
        let (a, b, f) = if t < 0.5 {
            ((49.0, 54.0, 149.0), (255.0, 255.0, 255.0), t * 2.0)
        } else {
            ((255.0, 255.0, 255.0), (165.0, 0.0, 38.0), t * 2.0 - 1.0)
        };
        let m = |x: f64, y: f64| (x + (y - x) * f) as u8;
        RGBColor(m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
    };
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        root.draw_text(title, &TextStyle::from((FAMILY, 20)), (10, 10))
            .map_err(plot_error)?;
        let small = TextStyle::from((FAMILY, 12));
        for j in 0..cols {
            let x = left + cell * j as i32;
            root.draw_text(&j.to_string(), &small, (x + cell / 2 - 6, 44))
                .map_err(plot_error)?;
            if let Some(img) = thumbnails.get(j) {
                let x0 = x + (cell - side as i32) / 2;
                for (k, p) in img.iter().enumerate().take(side * side) {
                    let (px, py) = (x0 + (k % side) as i32, 60 + (k / side) as i32);
                    root.draw_pixel((px, py), &RGBColor(p[0], p[1], p[2]))
                        .map_err(plot_error)?;
                }
            }
        }
        for (i, label) in row_labels.iter().enumerate() {
            let y = top + cell * i as i32;
            root.draw_text(&format!("{i:>2} {label}"), &small, (6, y + cell / 2 - 6))
                .map_err(plot_error)?;
            for j in 0..cols {
                let v = values[i * cols + j];
                let x = left + cell * j as i32;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell - 1, y + cell - 1)],
                    colour(v).filled(),
                ))
                .map_err(plot_error)?;
                root.draw_text(&format!("{v:.2}"), &small, (x + 6, y + cell / 2 - 6))
                    .map_err(plot_error)?;
            }
        }
        root.present().map_err(plot_error)?;
    }
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::Checkpoint(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_grid_of_pictures() -> Result<(), Error> {
        let tile = |c: u8| Tile {
            side: 4,
            rgb: vec![[c, 0, 255 - c]; 16],
            caption: format!("colour {c}"),
        };
        let path = std::env::temp_dir().join(format!("na-tiles-{}.png", std::process::id()));
        write_tiles(&[tile(0), tile(128), tile(255)], 2, 8, "tiles", &path)?;
        let bytes = std::fs::read(&path).map_err(|e| Error::Checkpoint(e.to_string()))?;
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::remove_file(path).ok();
        Ok(())
    }

    #[test]
    fn reads_metrics_and_draws_a_png() -> Result<(), Error> {
        let text = "{\"step\":1,\"loss\":3.0,\"lr\":0.1}\n{\"step\":2,\"loss\":2.0}\n\
                    {\"step\":2,\"eval_loss\":2.5,\"accuracy\":0.4}\nnot json\n";
        let c = Curves::from_jsonl(text);
        assert_eq!(c.train_loss, [(1.0, 3.0), (2.0, 2.0)]);
        assert_eq!(c.eval["eval_loss"], [(2.0, 2.5)]);
        assert_eq!(c.eval["accuracy"], [(2.0, 0.4)]);
        let path = std::env::temp_dir().join(format!("na-curves-{}.png", std::process::id()));
        write_png(&c, "test run", &path)?;
        let bytes = std::fs::read(&path).map_err(|e| Error::Checkpoint(e.to_string()))?;
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::remove_file(path).ok();
        Ok(())
    }

    #[test]
    fn draws_a_heatmap() -> Result<(), Error> {
        let path = std::env::temp_dir().join(format!("na-heat-{}.png", std::process::id()));
        let labels = vec!["a red circle".to_string(), "a blue square".to_string()];
        let thumbs = vec![vec![[255, 0, 0]; 4], vec![[0, 0, 255]; 4]];
        write_heatmap(
            &[0.9, 0.1, -0.2, 0.8],
            &labels,
            &thumbs,
            2,
            "similarity",
            &path,
        )?;
        let bytes = std::fs::read(&path).map_err(|e| Error::Checkpoint(e.to_string()))?;
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::remove_file(path).ok();
        Ok(())
    }
}
