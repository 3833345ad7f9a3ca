//! fps and p50 latency by frame size, one line per path (BGRx, motion).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::{PathKind, Report};

const COLOURS: [RGBColor; 7] = [BLACK, BLUE, CYAN, GREEN, MAGENTA, RED, RGBColor(255, 140, 0)];

pub fn draw(r: &Report, file: &Path) -> Result<()> {
    let root = SVGBackend::new(file, (1100, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(550);
    let paths: Vec<PathKind> = {
        let mut v: Vec<PathKind> = r.cells.iter().map(|c| c.path).collect();
        v.dedup();
        v.sort_by_key(|p| *p as u8);
        v.dedup();
        v
    };
    let series = |path: PathKind, y: fn(&crate::Cell) -> f64| -> Vec<(f64, f64)> {
        r.cells
            .iter()
            .filter(|c| c.path == path && c.format == "BGRx" && c.content == "motion")
            .map(|c| ((c.width * c.height) as f64 / 1e6, y(c)))
            .collect()
    };
    let max_mp = r.cells.iter().map(|c| (c.width * c.height) as f64 / 1e6).fold(0.5, f64::max);
    for (area, title, y, label) in [
        (&left, "Throughput (BGRx, motion)", (|c: &crate::Cell| c.fps) as fn(&crate::Cell) -> f64, "fps (log)"),
        (&right, "Latency at 30 fps (BGRx, motion)", |c: &crate::Cell| c.p50_ms, "p50 ms, frame in → H.264 out (log)"),
    ] {
        let max_y = r.cells.iter().map(y).fold(1.0, f64::max) * 1.5;
        let min_y = r.cells.iter().map(y).filter(|v| *v > 0.0).fold(f64::MAX, f64::min).max(0.1) / 1.5;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..max_mp * 1.05, (min_y..max_y).log_scale())
            .map_err(|e| anyhow!("{e}"))?;
        chart.configure_mesh().x_desc("megapixels per frame").y_desc(label).draw().map_err(|e| anyhow!("{e}"))?;
        for (i, p) in paths.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let pts = series(*p, y);
            chart
                .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label(p.label())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
            chart
                .draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 3, colour.filled())))
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
