//! `--plot FILE.svg`: aggregate output tok/s and TTFT p50 against the sweep's x (concurrency
//! or request rate), one line per target; in the swap scenario, each request's TTFT (one line
//! per target and one for the in-process reference) and each server's memory after it. SVG only: plotters' bitmap and font backends would
//! pull in system libraries, and SVG text needs no font at draw time.

use std::path::Path;

use plotters::prelude::*;

use super::report::Report;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One line: a target's (x, y) points.
type Series = (String, Vec<(f64, f64)>);

/// The series of one figure for every target, from the report.
fn series(report: &Report, y: impl Fn(&super::stats::Summary) -> Option<f64>) -> Vec<Series> {
    report
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let points = report
                .results
                .iter()
                .filter_map(|p| p.targets.get(i).and_then(|r| y(&r.summary)).map(|v| (p.x, v)))
                .collect();
            (t.name.clone(), points)
        })
        .collect()
}

pub fn write(report: &Report, path: &Path) -> Result<(), String> {
    if let Some(swap) = &report.swap {
        return write_swap(swap, path);
    }
    let x_label = match report.config.mode {
        "open_loop" => "request rate (req/s)",
        _ => "concurrent streams",
    };
    let throughput = series(report, |s| Some(s.output_tok_s));
    let ttft = series(report, |s| s.ttft_ms.map(|d| d.p50));
    let root = SVGBackend::new(path, (1100, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(550);
    panel(&left, "Aggregate output tokens/s", x_label, "tokens/s", &throughput)?;
    panel(&right, "Time to first token, p50", x_label, "ms", &ttft)?;
    root.present().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn write_swap(swap: &super::swap::SwapReport, path: &Path) -> Result<(), String> {
    let per_request = |f: fn(&super::stats::RequestRecord) -> Option<f64>| -> Vec<Series> {
        let line = |t: &super::swap::SwapTarget| {
            t.requests.iter().enumerate().filter_map(|(i, r)| f(r).map(|y| ((i + 1) as f64, y))).collect()
        };
        swap.targets.iter().map(|t| (t.target.clone(), line(t))).collect()
    };
    let ttft = per_request(|r| r.ok().then_some(r.ttft_ms).flatten());
    // The reference's line is the benchmark's own process with the model loaded.
    let rss: Vec<Series> =
        per_request(|r| r.rss_kib.map(|k| k as f64 / 1024.0)).into_iter().filter(|(_, p)| !p.is_empty()).collect();
    let x_label = "request (each names the next model)";
    let root = SVGBackend::new(path, (1100, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(550);
    panel(&left, "Swap: time to first token", x_label, "ms", &ttft)?;
    panel(&right, "Resident memory after each request", x_label, "MiB", &rss)?;
    root.present().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[Series],
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let xs = lines.iter().flat_map(|(_, p)| p.iter().map(|&(x, _)| x));
    let ys = lines.iter().flat_map(|(_, p)| p.iter().map(|&(_, y)| y));
    let x_max = xs.fold(0.0f64, f64::max).max(1.0);
    let y_max = ys.fold(0.0f64, f64::max).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max * 1.05, 0.0..y_max * 1.15)
        .map_err(err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    for (i, (name, points)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)).point_size(4))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    Ok(())
}
