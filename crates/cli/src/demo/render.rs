//! The demo in a terminal: one table per scenario (a column per strategy,
//! every cell measured), the brief's table with the measured figures and a
//! verdict per claim, and the progress bar.

use std::time::Duration;

use super::measure::{claims, Row};
use super::sweep::SweepRow;
use super::{DemoConfig, Progress, Scenario};

/// A table line: its label, the scenarios it is shown for (all when
/// empty), and how to render a row's cell.
pub(crate) type Cell = (&'static str, &'static [Scenario], fn(&Row) -> String);

/// What a cell's figure means for the users, for the report's colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tone {
    /// Nothing to judge.
    Plain,
    /// Something lost (users, writes): red above zero, green at zero.
    Lost,
    /// Requests that failed: amber above zero.
    Failed,
}

/// How a line's figure reads for the users: its tone and its count.
pub(crate) fn tone(label: &str, r: &Row) -> (Tone, u64) {
    match label {
        "users logged out before {event}" => (Tone::Lost, r.users_logged_out_before_kill as u64),
        "users logged out by {event}" => (Tone::Lost, r.users_logged_out_after_kill as u64),
        "acknowledged writes lost" => (Tone::Lost, r.acknowledged_writes_lost),
        "users logged in" => (Tone::Lost, r.users_failed_login as u64),
        "still logged in on the next server" => {
            (Tone::Lost, u64::from(!r.still_logged_in_after_switch))
        }
        "failed requests after {event}" => (Tone::Failed, r.failed_after_kill),
        "users who saw a failure" => (Tone::Failed, r.users_failed_after_kill as u64),
        _ => (Tone::Plain, 0),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

/// A figure with `digits` decimals, or `-` when it was not measured.
pub(super) fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// `a → b`, for a figure at 3 nodes and at 4.
fn grew(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (None, None) => "-".into(),
        (a, b) => format!("{} → {}", opt(a, 2), opt(b, 2)),
    }
}

/// What the scenario's event is called in the labels.
pub(crate) fn the_event(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Kill => "the kill",
        Scenario::ScaleOut => "the join",
        Scenario::RollingRestart => "the deploy",
        Scenario::StoreOutage => "the outage",
    }
}

/// The lines of a scenario's table; `{event}` in a label is replaced
/// (the terminal and the report show the same lines).
pub(crate) fn cells() -> Vec<Cell> {
    use Scenario::*;
    vec![
        ("balancer policy", &[], |r| r.policy.clone()),
        ("still logged in on the next server", &[Kill], |r| {
            if r.next_node.is_empty() {
                // The login was refused, or the next page unanswered.
                return "not measured".into();
            }
            format!(
                "{} ({}→{})",
                yes_no(r.still_logged_in_after_switch),
                r.login_node,
                r.next_node
            )
        }),
        ("users logged in", &[], |r| match r.users_failed_login {
            0 => r.users.to_string(),
            n => format!("{} ({n} REFUSED)", r.users),
        }),
        ("users logged out before {event}", &[], |r| {
            format!("{} of {}", r.users_logged_out_before_kill, r.users)
        }),
        ("users logged out by {event}", &[], |r| {
            format!("{} of {}", r.users_logged_out_after_kill, r.users)
        }),
        ("acknowledged writes lost", &[], |r| {
            format!(
                "{} of {}",
                r.acknowledged_writes_lost, r.acknowledged_writes
            )
        }),
        ("failed requests after {event}", &[], |r| {
            r.failed_after_kill.to_string()
        }),
        (
            "users who saw a failure",
            &[RollingRestart, StoreOutage],
            |r| format!("{} of {}", r.users_failed_after_kill, r.users),
        ),
        ("trouble lasted, ms", &[], |r| {
            format!("{:.0}", r.disrupted_ms)
        }),
        ("Redis failover, ms", &[StoreOutage], |r| {
            opt(r.failover_ms, 0)
        }),
        ("deploy took, ms", &[RollingRestart], |r| {
            opt(r.deploy_ms, 0)
        }),
        ("D ready after, ms", &[ScaleOut], |r| opt(r.join_ms, 0)),
        ("state transfer bytes", &[ScaleOut], |r| {
            r.transfer_bytes.map_or("-".into(), |b| b.to_string())
        }),
        ("D's share after joining", &[ScaleOut], |r| {
            r.new_node_share
                .map_or("-".into(), |s| format!("{:.0}%", s * 100.0))
        }),
        ("requests per node", &[], |r| {
            r.requests_per_node
                .values()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("/")
        }),
        ("imbalance before {event}", &[Kill, ScaleOut], |r| {
            format!("{:.2}", r.imbalance)
        }),
        (
            "sessions per node before {event}",
            &[Kill, StoreOutage],
            |r| {
                let held: Vec<String> = r
                    .sessions_per_node
                    .values()
                    .map(|v| v.map_or("-".into(), |v| v.to_string()))
                    .collect();
                held.join("/")
            },
        ),
        (
            "replication msgs / write before {event}",
            &[Kill, RollingRestart],
            |r| opt(r.replication_messages_per_write, 2),
        ),
        ("replication msgs / write, 3 → 4", &[ScaleOut], |r| {
            grew(
                r.replication_messages_per_write,
                r.replication_messages_per_write_after_join,
            )
        }),
        ("replication bytes / write before {event}", &[Kill], |r| {
            opt(r.replication_bytes_per_write, 0)
        }),
        (
            "store round trips / request",
            &[Kill, RollingRestart, StoreOutage],
            |r| opt(r.store_round_trips_per_request, 2),
        ),
        ("store round trips / req, 3 → 4", &[ScaleOut], |r| {
            grew(
                r.store_round_trips_per_request,
                r.store_round_trips_per_request_after_join,
            )
        }),
        ("session bytes per node at the end", &[Kill], |r| {
            if r.session_bytes_per_node.is_empty() {
                "0 (none held)".into()
            } else {
                r.session_bytes_per_node
                    .values()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("/")
            }
        }),
        ("latency p50 / p99 ms", &[], |r| {
            format!("{:.2} / {:.2}", r.p50_ms, r.p99_ms)
        }),
        ("requests/s", &[], |r| format!("{:.0}", r.rps)),
    ]
}

/// A line shown for a scenario: the label as in [`cells`], the label to
/// print, the cell.
pub(crate) type Line = (&'static str, String, fn(&Row) -> String);

/// The lines shown for `scenario`.
pub(crate) fn cells_for(scenario: Scenario) -> Vec<Line> {
    cells()
        .into_iter()
        .filter(|(_, only, _)| only.is_empty() || only.contains(&scenario))
        .map(|(label, _, cell)| (label, label.replace("{event}", the_event(scenario)), cell))
        .collect()
}

const LABEL: usize = 44;
const COLUMN: usize = 20;

/// One scenario's table.
fn table(out: &mut String, scenario: Scenario, rows: &[&Row]) {
    out.push_str(&format!("{:<LABEL$}", ""));
    for r in rows {
        out.push_str(&format!("{:<COLUMN$}", r.strategy.name()));
    }
    out.push('\n');
    for (_, label, cell) in cells_for(scenario) {
        out.push_str(&format!("{label:<LABEL$}"));
        for r in rows {
            let text = if r.ran() { cell(r) } else { "(not run)".into() };
            out.push_str(&format!("{text:<COLUMN$}"));
        }
        out.push('\n');
    }
    for r in rows {
        if let Some(why) = &r.skipped {
            out.push_str(&format!("  {}: not run: {why}\n", r.strategy));
        }
        for f in &r.login_failures {
            out.push_str(&format!("  {}: a login was refused: {f}\n", r.strategy));
        }
    }
}

/// Breaks `text` into lines of at most `width` characters after `indent`.
fn wrap(text: &str, indent: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            out.push_str(indent);
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(indent);
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The tables of every scenario that ran, then the brief's table measured.
pub fn render(rows: &[Row], config: &DemoConfig) -> String {
    let mut out = format!(
        "tether demo: 3 nodes behind tether lb per strategy, {} users at {} requests/s (3 reads per write), on this machine\n",
        config.users, config.rate
    );
    for scenario in Scenario::ALL {
        let these: Vec<&Row> = rows.iter().filter(|r| r.scenario == scenario).collect();
        if these.is_empty() {
            continue;
        }
        out.push_str(&format!("\n== {scenario}: {} ==\n\n", scenario.title()));
        table(&mut out, scenario, &these);
    }
    out.push_str("\n== the brief's table, measured ==\n");
    let mut last_row = "";
    for c in claims(rows) {
        if c.row != last_row {
            out.push_str(&format!("\n{}\n", c.row));
            last_row = c.row;
        }
        out.push_str(&format!("  {} · the brief: {}\n", c.column, c.brief));
        out.push_str(&wrap(&c.measured, "      ", 96));
        out.push_str(&format!("      → {}\n", c.verdict.word().to_uppercase()));
    }
    out.push_str(
        "\nEvery figure was measured in this run; `--json` gives them to machines, `--report FILE.html` draws them.\n",
    );
    out
}

/// The sweep as a table.
pub fn render_sweep(rows: &[SweepRow]) -> String {
    let mut out =
        String::from("\nReplication cost against cluster size (writes at the owner):\n\n");
    out.push_str(&format!(
        "{:<20}{:>6}{:>16}{:>15}{:>14}{:>14}\n",
        "strategy", "nodes", "messages/write", "bytes/write", "p50 ms", "p99 ms"
    ));
    for r in rows {
        out.push_str(&format!(
            "{:<20}{:>6}{:>16.2}{:>15.0}{:>14.2}{:>14.2}\n",
            r.strategy.name(),
            r.nodes,
            r.messages_per_write,
            r.bytes_per_write,
            r.write_p50_ms,
            r.write_p99_ms
        ));
    }
    out
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

/// One line of progress: a bar of the runs done, the run under way, the
/// time spent and the time left.
pub fn progress_line(p: &Progress) -> String {
    const WIDTH: usize = 24;
    let filled = (p.done * WIDTH).checked_div(p.total).unwrap_or(WIDTH);
    let mut line = format!(
        "[{}{}] {}/{} runs",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        p.done,
        p.total
    );
    if !p.current.is_empty() {
        line.push_str(&format!(" · {}", p.current));
    }
    line.push_str(&format!(
        " · {} spent · ~{} left",
        clock(p.elapsed),
        clock(p.left)
    ));
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_shows_the_runs_and_the_time_left() {
        let p = Progress {
            done: 4,
            total: 16,
            current: "kill / redis".into(),
            elapsed: Duration::from_secs(15),
            left: Duration::from_secs(75),
        };
        let line = progress_line(&p);
        assert_eq!(
            line,
            "[######..................] 4/16 runs · kill / redis · 0:15 spent · ~1:15 left"
        );
    }

    #[test]
    fn long_measurements_wrap_under_their_indent() {
        let text = wrap("one two three four five", "  ", 9);
        assert_eq!(text, "  one two\n  three\n  four five\n");
    }
}
