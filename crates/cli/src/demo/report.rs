//! `tether demo --report FILE.html`: one self-contained page (no network
//! resources): the brief's table with the measured figures and verdicts,
//! one real table per scenario with cells coloured by what the users lost,
//! and charts, each with its legend: per-scenario timelines of every
//! strategy (answers per 100 ms, the scenario's events marked), requests per
//! node (node colours), latency, and the replication sweep. Charts are
//! inline SVG drawn with plotters and scale to the page, which fits a
//! laptop's width without scrolling sideways.

use std::fmt::Write as _;

use plotters::prelude::*;

use super::measure::{claims, Row, Verdict};
use super::render::{cells_for, tone, Tone};
use super::sweep::SweepRow;
use super::{DemoConfig, Scenario};
use crate::strategy::Strategy;

/// One colour per strategy, in the brief's order.
const STRATEGY_COLORS: [RGBColor; 8] = [
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x94, 0x67, 0xbd),
];

/// One colour per node.
const NODE_COLORS: [(&str, RGBColor); 4] = [
    ("A", RGBColor(0x1f, 0x77, 0xb4)),
    ("B", RGBColor(0xd6, 0x27, 0x28)),
    ("C", RGBColor(0x2c, 0xa0, 0x2c)),
    ("D", RGBColor(0x94, 0x67, 0xbd)),
];

/// Answers that were fine, showed a logout, failed.
const OK: RGBColor = RGBColor(0x5a, 0xae, 0x61);
const OUT: RGBColor = RGBColor(0xf0, 0x8c, 0x00);
const FAILED: RGBColor = RGBColor(0xc0, 0x1c, 0x28);

fn strategy_color(s: Strategy) -> RGBColor {
    let i = Strategy::ALL.iter().position(|x| *x == s).unwrap_or(0);
    STRATEGY_COLORS[i % STRATEGY_COLORS.len()]
}

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
        .margin(10)
        .x_label_area_size(34)
        .y_label_area_size(46)
        .build_cartesian_2d(x, y)
        .map_err(|e| e.to_string())?)
}

/// Draws the chart's legend at `position`, over a light background.
fn legend<'a, 'b: 'a>(chart: &mut Frame<'a, 'b>, position: SeriesLabelPosition) -> Chart<'static> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn legend_box(color: RGBColor) -> impl Fn((i32, i32)) -> Rectangle<(i32, i32)> {
    move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
}

/// Answers per window for one strategy in one scenario, stacked (ok, logged
/// out, failed), with the scenario's events as numbered dashed lines.
fn timeline_chart(r: &Row, out: &mut String) -> Chart<'static> {
    let t = &r.timeline;
    let w = t.window_ms as f64 / 1e3;
    let end = (t.ok.len() as f64 * w).max(w);
    let top = (0..t.ok.len())
        .map(|i| t.ok[i] + t.logged_out[i] + t.failed[i])
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let root = SVGBackend::with_string(out, (560, 250)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "{}: {} of {} users logged out",
        r.strategy, r.users_logged_out, r.users
    );
    // Headroom above the bars for the legend and the events' numbers.
    let mut chart = frame(&root, &caption, 0f64..end, 0f64..top * 2.0)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("seconds")
        .y_desc("answers / 100 ms")
        .draw()?;
    let stacks: [(&str, RGBColor, usize); 3] =
        [("ok", OK, 0), ("logged out", OUT, 1), ("failed", FAILED, 2)];
    for (label, color, layer) in stacks {
        let bars = (0..t.ok.len()).filter_map(move |i| {
            let parts = [t.ok[i], t.logged_out[i], t.failed[i]];
            let below: u32 = parts[..layer].iter().sum();
            let v = parts[layer];
            (v > 0).then(|| {
                let x = i as f64 * w;
                Rectangle::new(
                    [(x, f64::from(below)), (x + w * 0.9, f64::from(below + v))],
                    color.filled(),
                )
            })
        });
        chart
            .draw_series(bars)?
            .label(label)
            .legend(legend_box(color));
    }
    for (k, e) in r.events.iter().enumerate() {
        let x = e.at_ms / 1e3;
        let series = chart.draw_series(DashedLineSeries::new(
            [(x, 0.0), (x, top * 1.04)],
            4,
            3,
            BLACK.stroke_width(1),
        ))?;
        if k == 0 {
            series.label("event (numbered below)").legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 12, y)], BLACK.stroke_width(1))
            });
        }
        chart.draw_series(std::iter::once(Text::new(
            format!("{}", k + 1),
            (x, top * 1.16),
            ("sans-serif", 13).into_font().color(&BLACK),
        )))?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present()?;
    Ok(())
}

/// Requests served per node, a group of bars per strategy, a colour per node.
fn nodes_chart(rows: &[&Row], out: &mut String) -> Chart<'static> {
    let max = rows
        .iter()
        .flat_map(|r| r.requests_per_node.values().copied())
        .max()
        .unwrap_or(1) as f64;
    let root = SVGBackend::with_string(out, (1120, 340)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "Requests served per node ({})",
        rows.first()
            .map_or("", |r| super::render::the_event(r.scenario))
    );
    let mut chart = frame(&root, &caption, 0f64..rows.len() as f64, 0f64..max * 1.25)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                rows.get(i)
                    .map(|r| r.strategy.to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("requests")
        .draw()?;
    for (k, (node, color)) in NODE_COLORS.iter().enumerate() {
        let color = *color;
        let bars = rows.iter().enumerate().filter_map(move |(i, r)| {
            let v = *r.requests_per_node.get(*node)? as f64;
            let x0 = i as f64 + 0.1 + k as f64 * 0.2;
            Some(Rectangle::new([(x0, 0.0), (x0 + 0.18, v)], color.filled()))
        });
        chart
            .draw_series(bars)?
            .label(format!("node {node}"))
            .legend(legend_box(color));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present()?;
    Ok(())
}

/// Latency by percentile, a line per strategy.
fn latency_chart(rows: &[&Row], out: &mut String) -> Chart<'static> {
    let max = rows
        .iter()
        .flat_map(|r| r.latency_curve_ms.iter().copied())
        .fold(0.1, f64::max);
    let root = SVGBackend::with_string(out, (560, 320)).into_drawing_area();
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
    for r in rows {
        let color = strategy_color(r.strategy);
        let points = r
            .latency_curve_ms
            .iter()
            .enumerate()
            .map(|(k, v)| (if k == 20 { 99.0 } else { k as f64 * 5.0 }, *v));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(r.strategy.to_string())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(())
}

/// Replication messages per write against cluster size.
fn sweep_chart(sweep: &[SweepRow], out: &mut String) -> Chart<'static> {
    let max_n = sweep.iter().map(|r| r.nodes).max().unwrap_or(2) as f64;
    let max_m = sweep
        .iter()
        .map(|r| r.messages_per_write)
        .fold(1.0, f64::max);
    let root = SVGBackend::with_string(out, (560, 320)).into_drawing_area();
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
    for strategy in [Strategy::ReplicatedAll, Strategy::ReplicatedBackup] {
        let color = strategy_color(strategy);
        let points: Vec<(f64, f64)> = sweep
            .iter()
            .filter(|r| r.strategy == strategy)
            .map(|r| (r.nodes as f64, r.messages_per_write))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(strategy.to_string())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn svg(draw: impl FnOnce(&mut String) -> Chart<'static>) -> Result<String, String> {
    let mut s = String::new();
    draw(&mut s).map_err(|e| e.to_string())?;
    Ok(s)
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 16px;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;width:100%;table-layout:fixed;font-size:13px;margin:1em 0}
th,td{border:1px solid #ddd;padding:4px 6px;vertical-align:top;overflow-wrap:anywhere;text-align:left}
th{background:#f3f3f3}
td.lost{background:#f8d3d3;color:#7a0c0c;font-weight:600}td.kept{background:#d9f0d9;color:#14521b}
td.failed{background:#fde9c8}td.confirmed{background:#d9f0d9;font-weight:600}
td.corrected{background:#f8d3d3;font-weight:600}td.not-measured{background:#eee;color:#666}
figure{margin:0}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:12px}
.chart{border:1px solid #e3e3e3;padding:4px;min-width:0}
.chart svg{display:block;width:100%;height:auto}
.wide svg{display:block;width:100%;height:auto}
.events{font-size:12px;margin:2px 4px 4px;padding-left:1.4em}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border-radius:3px}
";

/// The brief's table, measured, as an HTML table.
fn brief_table(rows: &[Row], page: &mut String) {
    page.push_str(
        "<h2 id=\"brief\">The brief's table, measured</h2>\
         <p class=\"legend\">Each claim of the brief beside what this run measured: \
         <span class=\"confirmed\" style=\"background:#d9f0d9\">confirmed</span>\
         <span style=\"background:#f8d3d3\">corrected</span>\
         <span style=\"background:#eee\">not measured</span> (a scenario that measures it did not run).</p>\
         <table class=\"brief\"><colgroup><col style=\"width:14%\"><col style=\"width:14%\">\
         <col style=\"width:20%\"><col style=\"width:42%\"><col style=\"width:10%\"></colgroup>\
         <thead><tr><th>row</th><th>column</th><th>the brief says</th><th>measured</th><th>verdict</th></tr></thead><tbody>",
    );
    for c in claims(rows) {
        let class = match c.verdict {
            Verdict::Confirmed => "confirmed",
            Verdict::Corrected => "corrected",
            Verdict::NotMeasured => "not-measured",
        };
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{class}\">{}</td></tr>",
            escape(c.row),
            escape(c.column),
            escape(c.brief),
            escape(&c.measured),
            c.verdict.word()
        );
    }
    page.push_str("</tbody></table>");
}

/// One scenario's figures as an HTML table, a column per strategy.
fn scenario_table(scenario: Scenario, rows: &[&Row], page: &mut String) {
    let _ = write!(
        page,
        "<table class=\"scenario\" data-scenario=\"{scenario}\"><colgroup><col style=\"width:19%\"></colgroup><thead><tr><th></th>"
    );
    for r in rows {
        let _ = write!(page, "<th>{}</th>", r.strategy);
    }
    page.push_str("</tr></thead><tbody>");
    for (raw, label, cell) in cells_for(scenario) {
        let _ = write!(page, "<tr><th>{}</th>", escape(&label));
        for r in rows {
            if !r.ran() {
                page.push_str("<td>(not run)</td>");
                continue;
            }
            let class = match tone(raw, r) {
                (Tone::Lost, 0) => " class=\"kept\"",
                (Tone::Lost, _) => " class=\"lost\"",
                (Tone::Failed, n) if n > 0 => " class=\"failed\"",
                _ => "",
            };
            let _ = write!(page, "<td{class}>{}</td>", escape(&cell(r)));
        }
        page.push_str("</tr>");
    }
    page.push_str("</tbody></table>");
    for r in rows {
        if let Some(why) = &r.skipped {
            let _ = write!(page, "<p>{}: not run: {}</p>", r.strategy, escape(why));
        }
        for f in &r.login_failures {
            let _ = write!(
                page,
                "<p>{}: a login was refused: {}</p>",
                r.strategy,
                escape(f)
            );
        }
    }
}

/// The whole page.
///
/// # Errors
/// If a chart cannot be drawn.
pub fn html(
    rows: &[Row],
    config: &DemoConfig,
    sweep: Option<&[SweepRow]>,
) -> Result<String, String> {
    let mut page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>tether demo</title><style>{STYLE}</style></head><body>\
         <h1>tether demo: every strategy, measured</h1>\
         <p>Three <code>tether node</code> processes behind <code>tether lb</code> per strategy and scenario, \
         {} users at {} requests/s (three reads of <code>/mypage</code> per write to <code>/cart</code>), \
         every answer counted per 100 ms; every acknowledged cart item checked at the end. \
         Cells: <span style=\"background:#f8d3d3\">users or writes lost</span> \
         <span style=\"background:#d9f0d9\">none lost</span> \
         <span style=\"background:#fde9c8\">requests failed</span>.</p>",
        config.users, config.rate
    );
    brief_table(rows, &mut page);
    for scenario in Scenario::ALL {
        let these: Vec<&Row> = rows.iter().filter(|r| r.scenario == scenario).collect();
        if these.is_empty() {
            continue;
        }
        let _ = write!(
            page,
            "<section class=\"scenario\" id=\"{scenario}\"><h2>{scenario}: {}</h2>",
            escape(scenario.title())
        );
        scenario_table(scenario, &these, &mut page);
        let ran: Vec<&Row> = these.iter().copied().filter(|r| r.ran()).collect();
        page.push_str("<h3>Answers over time</h3><div class=\"charts\">");
        for r in &ran {
            let chart = svg(|s| timeline_chart(r, s))?;
            let _ = write!(
                page,
                "<figure class=\"chart timeline\" data-strategy=\"{}\">{chart}<ol class=\"events\">",
                r.strategy
            );
            for e in &r.events {
                let _ = write!(page, "<li>{:.1} s: {}</li>", e.at_ms / 1e3, escape(&e.what));
            }
            page.push_str("</ol></figure>");
        }
        page.push_str("</div>");
        if !ran.is_empty() {
            let nodes = svg(|s| nodes_chart(&ran, s))?;
            let _ = write!(page, "<div class=\"chart wide\">{nodes}</div>");
            if scenario == Scenario::Kill {
                let latency = svg(|s| latency_chart(&ran, s))?;
                let _ = write!(
                    page,
                    "<div class=\"charts\"><div class=\"chart\">{latency}</div></div>"
                );
            }
        }
        page.push_str("</section>");
    }
    if let Some(s) = sweep {
        let chart = svg(|out| sweep_chart(s, out))?;
        let _ = write!(
            page,
            "<section id=\"sweep\"><h2>Replication cost against cluster size</h2><div class=\"charts\"><div class=\"chart\">{chart}</div></div></section>"
        );
    }
    page.push_str("</body></html>\n");
    Ok(page)
}
