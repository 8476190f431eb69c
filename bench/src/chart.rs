//! A hand-made SVG bar chart of a run: framework and raw lapin side by side (or any number of
//! series, for the peers), medians as bars, min..max as whiskers.

use crate::stats::Stat;
use std::fmt::Write;

/// Which panel a bar pair goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Panel {
    /// Tasks or requests per second (higher is better).
    Throughput,
    /// Microseconds (lower is better).
    Latency,
    /// MiB of resident memory (lower is better).
    Memory,
}

impl Panel {
    fn title(self) -> &'static str {
        match self {
            Panel::Throughput => "Throughput (per second, higher is better)",
            Panel::Latency => "Call latency (µs, lower is better)",
            Panel::Memory => "Worker resident memory (MiB, lower is better)",
        }
    }
}

/// A framework/raw pair of bars.
#[derive(Clone, Debug)]
pub struct Bar {
    /// Where it goes.
    pub panel: Panel,
    /// Its label under the pair.
    pub label: String,
    /// amqp-tasks.
    pub framework: Stat,
    /// Raw lapin.
    pub baseline: Stat,
}

/// A group of bars, one per series (a series not measured has a `Stat` of count 0: no bar).
#[derive(Clone, Debug)]
pub struct Group {
    /// Where it goes.
    pub panel: Panel,
    /// Its label under the group.
    pub label: String,
    /// One per series, in the order of the series.
    pub values: Vec<Stat>,
}

const WIDTH: f64 = 860.0;
const PANEL_HEIGHT: f64 = 250.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
/// Series colours: amqp-tasks first, then raw lapin (or the peers).
const COLOURS: [&str; 6] = [
    "#2f6db5", "#9a9a9a", "#e08a2c", "#4c9a4c", "#b54a8a", "#6b4fb5",
];

/// The SVG document for `bars`, with a title and a subtitle (where the numbers come from).
pub fn svg(title: &str, subtitle: &str, bars: &[Bar]) -> String {
    let groups: Vec<Group> = bars
        .iter()
        .map(|bar| Group {
            panel: bar.panel,
            label: bar.label.clone(),
            values: vec![bar.framework, bar.baseline],
        })
        .collect();
    grouped_svg(title, subtitle, &["amqp-tasks", "raw lapin"], &groups)
}

/// The SVG document for groups of bars, one bar per series in each group; with two series, the
/// ratio of the first to the second is written under each group.
pub fn grouped_svg(title: &str, subtitle: &str, series: &[&str], groups: &[Group]) -> String {
    let panels: Vec<Panel> = [Panel::Throughput, Panel::Latency, Panel::Memory]
        .into_iter()
        .filter(|panel| groups.iter().any(|group| group.panel == *panel))
        .collect();
    let rows = legend_rows(series);
    // A subtitle may have several lines.
    let subtitles: Vec<&str> = subtitle.lines().collect();
    let below_subtitle = SUBTITLE_ROW * (subtitles.len().max(1) - 1) as f64;
    let extra = below_subtitle + LEGEND_ROW * (rows.len().max(1) - 1) as f64;
    let height = 80.0 + extra + PANEL_HEIGHT * panels.len() as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>"##,
        escape(title)
    );
    for (index, line) in subtitles.iter().enumerate() {
        let _ = writeln!(
            out,
            r##"<text x="{LEFT}" y="{}" fill="#555">{}</text>"##,
            40.0 + SUBTITLE_ROW * index as f64,
            escape(line)
        );
    }
    legend(&mut out, series, &rows, 62.0 + below_subtitle);
    for (index, panel) in panels.iter().enumerate() {
        let top = 70.0 + extra + PANEL_HEIGHT * index as f64;
        let in_panel: Vec<&Group> = groups.iter().filter(|g| g.panel == *panel).collect();
        draw_panel(&mut out, *panel, &in_panel, series.len(), top);
    }
    out.push_str("</svg>\n");
    out
}

fn colour(index: usize) -> &'static str {
    COLOURS[index % COLOURS.len()]
}

const LEGEND_ROW: f64 = 18.0;
const SUBTITLE_ROW: f64 = 15.0;

fn legend_width(name: &str) -> f64 {
    34.0 + 7.0 * name.chars().count() as f64
}

/// The series on each legend line: as many as fit in the width.
fn legend_rows(series: &[&str]) -> Vec<Vec<usize>> {
    let available = WIDTH - LEFT - RIGHT;
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = 0.0;
    for (index, name) in series.iter().enumerate() {
        let width = legend_width(name);
        match rows.last_mut() {
            Some(row) if used + width <= available => row.push(index),
            _ => {
                rows.push(vec![index]);
                used = 0.0;
            }
        }
        used += width;
    }
    rows
}

/// One entry per series, right-aligned, on as many lines as needed.
fn legend(out: &mut String, series: &[&str], rows: &[Vec<usize>], y: f64) {
    for (line, row) in rows.iter().enumerate() {
        let y = y + LEGEND_ROW * line as f64;
        let total: f64 = row.iter().map(|&index| legend_width(series[index])).sum();
        let mut x = (WIDTH - RIGHT - total).max(LEFT);
        for &index in row {
            let name = series[index];
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{}" width="14" height="14" fill="{}"/><text x="{:.1}" y="{y}">{}</text>"#,
                y - 11.0,
                colour(index),
                x + 20.0,
                escape(name)
            );
            x += legend_width(name);
        }
    }
}

fn draw_panel(out: &mut String, panel: Panel, groups: &[&Group], series: usize, top: f64) {
    let plot_top = top + 30.0;
    let plot_bottom = top + PANEL_HEIGHT - 40.0;
    let plot_height = plot_bottom - plot_top;
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
        top + 16.0,
        panel.title()
    );
    let highest = groups
        .iter()
        .flat_map(|group| group.values.iter().map(|stat| stat.max.max(stat.median)))
        .fold(0.0f64, f64::max);
    let step = nice_ceiling(highest * 1.1 / 5.0);
    let steps = ((highest * 1.1 / step).ceil() as u32).max(1);
    let scale_max = step * f64::from(steps);
    let y = |value: f64| plot_bottom - value / scale_max * plot_height;
    for index in 0..=steps {
        let value = step * f64::from(index);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e2e2e2"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y(value) + 4.0,
            short(value),
            y = y(value)
        );
    }
    let slot = (WIDTH - LEFT - RIGHT) / groups.len().max(1) as f64;
    let series = series.max(1);
    let bar_width = (slot * 0.7 / series as f64).min(60.0);
    let gap = 4.0;
    for (index, group) in groups.iter().enumerate() {
        let centre = LEFT + slot * (index as f64 + 0.5);
        let first = centre - (bar_width * series as f64 + gap * (series - 1) as f64) / 2.0;
        for (position, stat) in group.values.iter().enumerate().take(series) {
            let x = first + position as f64 * (bar_width + gap);
            if stat.count == 0 {
                let _ = writeln!(
                    out,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#777">n/a</text>"##,
                    x + bar_width / 2.0,
                    plot_bottom - 5.0
                );
                continue;
            }
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{:.1}" width="{bar_width:.1}" height="{:.1}" fill="{}"/>"#,
                y(stat.median),
                plot_bottom - y(stat.median),
                colour(position)
            );
            if stat.count > 1 {
                let middle = x + bar_width / 2.0;
                let _ = writeln!(
                    out,
                    r#"<line x1="{middle:.1}" x2="{middle:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
                    y(stat.min),
                    y(stat.max),
                    middle - 4.0,
                    middle + 4.0,
                    y(stat.min),
                    y(stat.min),
                    middle - 4.0,
                    middle + 4.0,
                    y(stat.max),
                    y(stat.max)
                );
            }
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                x + bar_width / 2.0,
                y(stat.max.max(stat.median)) - 5.0,
                short(stat.median)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{centre:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            plot_bottom + 16.0,
            escape(&group.label)
        );
        if let [framework, baseline] = group.values.as_slice()
            && series == 2
        {
            let ratio = if baseline.median > 0.0 {
                framework.median / baseline.median
            } else {
                0.0
            };
            let _ = writeln!(
                out,
                r##"<text x="{centre:.1}" y="{:.1}" text-anchor="middle" fill="#555">ratio {ratio:.2}</text>"##,
                plot_bottom + 30.0
            );
        }
    }
    let _ = writeln!(
        out,
        r#"<line x1="{LEFT}" x2="{}" y1="{plot_bottom}" y2="{plot_bottom}" stroke="black"/>"#,
        WIDTH - RIGHT
    );
}

/// 1, 2 or 5 times a power of ten, at least `value`.
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let power = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|candidate| *candidate >= value)
        .unwrap_or(10.0 * power)
}

fn short(value: f64) -> String {
    if value >= 10_000.0 && value % 1000.0 == 0.0 {
        format!("{:.0}k", value / 1000.0)
    } else if value >= 10_000.0 {
        format!("{:.1}k", value / 1000.0)
    } else if value >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(17.0), 20.0);
        assert_eq!(nice_ceiling(23_000.0), 25_000.0);
        assert_eq!(nice_ceiling(51.0), 100.0);
    }

    #[test]
    fn a_chart_is_one_svg_document() {
        let stat = Stat::of(&[1.0, 2.0, 3.0]);
        let svg = svg(
            "t <noisy>",
            "sub",
            &[Bar {
                panel: Panel::Latency,
                label: "call-1 p50".into(),
                framework: stat,
                baseline: stat,
            }],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;noisy&gt;"));
        assert!(!svg.contains("Throughput"));
    }

    #[test]
    fn a_grouped_chart_has_a_legend_per_series_and_skips_what_was_not_measured() {
        let stat = Stat::of(&[10.0, 20.0]);
        let svg = grouped_svg(
            "peers",
            "sub",
            &["amqp-tasks", "Celery", "aio-pika"],
            &[Group {
                panel: Panel::Throughput,
                label: "calls".into(),
                values: vec![stat, Stat::default(), stat],
            }],
        );
        assert!(svg.contains("Celery") && svg.contains("aio-pika") && svg.contains("n/a"));
        assert_eq!(
            svg.matches("<rect x=").count(),
            3 + 2,
            "3 legend boxes, 2 bars"
        );
        assert!(!svg.contains("ratio"), "no ratio with more than two series");
    }
}
