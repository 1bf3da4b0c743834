//! `tether demo --report FILE.html`: one self-contained page with the table
//! and charts (inline SVG drawn with plotters; no network resources).

use plotters::prelude::*;

use crate::demo::{Row, SweepRow};

const COLORS: [RGBColor; 7] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

type Chart<'a> = Result<(), Box<dyn std::error::Error + 'a>>;

type Frame<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A chart with the house style: a caption, margins, labelled axes.
fn frame<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<Frame<'a, 'b>, Box<dyn std::error::Error + 'static>> {
    Ok(ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(x, y)
        .map_err(|e| e.to_string())?)
}

fn latency_chart(rows: &[&Row], out: &mut String) -> Chart<'static> {
    let max = rows
        .iter()
        .flat_map(|r| r.latency_curve_ms.iter().copied())
        .fold(0.1, f64::max);
    let root = SVGBackend::with_string(out, (720, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = frame(
        &root,
        "Latency through the balancer, percentiles 0–99",
        0f64..100f64,
        0f64..max * 1.05,
    )?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .draw()?;
    for (i, r) in rows.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = r
            .latency_curve_ms
            .iter()
            .enumerate()
            .map(|(k, v)| (if k == 20 { 99.0 } else { k as f64 * 5.0 }, *v));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(r.strategy.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn nodes_chart(rows: &[&Row], out: &mut String) -> Chart<'static> {
    let max = rows
        .iter()
        .flat_map(|r| r.requests_per_node.values().copied())
        .max()
        .unwrap_or(1) as f64;
    let root = SVGBackend::with_string(out, (720, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = frame(
        &root,
        "Requests served per node (B was killed half-way)",
        0f64..rows.len() as f64,
        0f64..max * 1.1,
    )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|x| {
            rows.get(*x as usize)
                .map(|r| r.strategy.clone())
                .unwrap_or_default()
        })
        .y_desc("requests")
        .draw()?;
    for (i, r) in rows.iter().enumerate() {
        for (k, node) in ["A", "B", "C"].iter().enumerate() {
            let v = r.requests_per_node.get(*node).copied().unwrap_or(0) as f64;
            let x0 = i as f64 + 0.15 + k as f64 * 0.23;
            let color = [BLUE, RED, GREEN][k].mix(0.7);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, 0.0), (x0 + 0.2, v)],
                color.filled(),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}

fn logout_chart(rows: &[&Row], out: &mut String) -> Chart<'static> {
    let (lo, hi) = rows
        .iter()
        .flat_map(|r| r.logged_out_at_ms.iter().copied())
        .fold((-50.0f64, 50.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let users = rows.iter().map(|r| r.users).max().unwrap_or(1) as f64;
    let root = SVGBackend::with_string(out, (720, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = frame(
        &root,
        "Users logged out over time (kill at 0 ms)",
        lo * 1.05..hi * 1.05,
        0f64..users,
    )?;
    chart
        .configure_mesh()
        .x_desc("ms from the kill")
        .y_desc("users logged out")
        .draw()?;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, 0.0), (0.0, users)],
        BLACK.stroke_width(2),
    )))?;
    for (i, r) in rows.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut points = vec![(lo * 1.05, 0.0)];
        for (k, t) in r.logged_out_at_ms.iter().enumerate() {
            points.push((*t, k as f64));
            points.push((*t, (k + 1) as f64));
        }
        points.push((hi * 1.05, r.logged_out_at_ms.len() as f64));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(r.strategy.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn sweep_chart(sweep: &[SweepRow], out: &mut String) -> Chart<'static> {
    let max_n = sweep.iter().map(|r| r.nodes).max().unwrap_or(2) as f64;
    let max_m = sweep
        .iter()
        .map(|r| r.messages_per_write)
        .fold(1.0, f64::max);
    let root = SVGBackend::with_string(out, (720, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = frame(
        &root,
        "Replication messages per write against cluster size",
        1f64..max_n + 0.5,
        0f64..max_m * 1.15,
    )?;
    chart
        .configure_mesh()
        .x_desc("nodes")
        .y_desc("messages per write")
        .draw()?;
    for (i, strategy) in ["replicated-all", "replicated-backup"].iter().enumerate() {
        let color = COLORS[3 + i];
        let points: Vec<(f64, f64)> = sweep
            .iter()
            .filter(|r| r.strategy == *strategy)
            .map(|r| (r.nodes as f64, r.messages_per_write))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*strategy)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The whole page.
///
/// # Errors
/// If a chart cannot be drawn.
pub fn html(rows: &[Row], table: &str, sweep: Option<&[SweepRow]>) -> Result<String, String> {
    let ran: Vec<&Row> = rows.iter().filter(|r| r.skipped.is_none()).collect();
    let mut charts = Vec::new();
    for draw in [latency_chart, nodes_chart, logout_chart] {
        let mut svg = String::new();
        draw(&ran, &mut svg).map_err(|e| e.to_string())?;
        charts.push(svg);
    }
    if let Some(s) = sweep {
        let mut svg = String::new();
        sweep_chart(s, &mut svg).map_err(|e| e.to_string())?;
        charts.push(svg);
    }
    let mut page = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tether demo</title>\
         <style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}pre{background:#f6f6f6;padding:1em;overflow:auto}\
         svg{display:block;margin:1.5em 0}</style></head><body><h1>tether demo: every strategy, measured</h1>",
    );
    page.push_str(&format!("<pre>{}</pre>", escape(table)));
    for c in charts {
        page.push_str(&c);
    }
    page.push_str("</body></html>\n");
    Ok(page)
}
