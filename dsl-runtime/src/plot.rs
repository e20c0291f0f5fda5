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

/// Draws `curves` into a 1200×450 PNG at `path` (atomically: a temporary file, then a rename).
pub fn write_png(curves: &Curves, title: &str, path: &Path) -> Result<(), Error> {
    // Registering the same family again is harmless; the bytes are 'static.
    plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| plot_error("the embedded font is unreadable"))?;
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (1200, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let root = root.titled(title, (FAMILY, 22)).map_err(plot_error)?;
        let (left, right) = root.split_horizontally(600);
        let is_loss = |k: &str| k.contains("loss");
        let losses: Vec<(&String, &Vec<(f64, f64)>)> =
            curves.eval.iter().filter(|(k, _)| is_loss(k)).collect();
        let others: Vec<(&String, &Vec<(f64, f64)>)> =
            curves.eval.iter().filter(|(k, _)| !is_loss(k)).collect();
        let last_step = curves
            .train_loss
            .iter()
            .chain(curves.eval.values().flatten())
            .map(|p| p.0)
            .fold(1.0, f64::max);
        let (lo, hi) = span(
            curves
                .train_loss
                .iter()
                .chain(losses.iter().flat_map(|(_, v)| v.iter()))
                .map(|p| p.1),
        );
        let mut chart = ChartBuilder::on(&left)
            .margin(12)
            .caption("loss", (FAMILY, 18))
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
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        chart
            .draw_series(LineSeries::new(
                curves.train_loss.iter().copied(),
                BLUE.mix(0.6),
            ))
            .map_err(plot_error)?
            .label("train loss")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE));
        for (i, (name, series)) in losses.iter().enumerate() {
            let c = colors[(i + 1) % colors.len()];
            chart
                .draw_series(LineSeries::new(series.iter().copied(), c.stroke_width(2)))
                .map_err(plot_error)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c));
        }
        chart
            .configure_series_labels()
            .label_font((FAMILY, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        if !others.is_empty() {
            let (lo, hi) = span(others.iter().flat_map(|(_, v)| v.iter()).map(|p| p.1));
            let mut chart = ChartBuilder::on(&right)
                .margin(12)
                .caption("evaluation", (FAMILY, 18))
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
            for (i, (name, series)) in others.iter().enumerate() {
                let c = colors[(i + 2) % colors.len()];
                chart
                    .draw_series(LineSeries::new(series.iter().copied(), c.stroke_width(2)))
                    .map_err(plot_error)?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c));
            }
            chart
                .configure_series_labels()
                .label_font((FAMILY, 13))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(plot_error)?;
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
}
