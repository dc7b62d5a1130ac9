//! PNG charts of a results JSON (the one `pgferry-bench` writes), drawn with `plotters`:
//!
//! ```text
//! results.json ──► basebackup.png   pg_basebackup median time per contender, one panel per link
//!              ├─► streams.png      raw tunnel MB/s per contender and stream count, per link
//!              └─► wal-lag.png      standby lag over time (s and MB), one line per contender
//! path-run.json ─► path-run.png     pg_basebackup time per contender, one panel per loss
//! ```
//!
//! A chart whose data is absent is skipped, not an error. Text is rasterised with `ab_glyph`
//! from DejaVu Sans, read at runtime (no fontconfig, no system libraries); without that file
//! the error names it and the package that installs it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

/// The font every chart uses, registered with plotters as [`FAMILY`].
pub const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FAMILY: &str = "sans-serif";
const WIDTH: u32 = 1000;

/// Writes the charts the data in `results` allows into `out_dir`; returns their paths.
pub fn render(results: &Value, out_dir: &Path) -> Result<Vec<PathBuf>> {
    register_font()?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("while creating {}", out_dir.display()))?;
    let mut written = Vec::new();
    type Chart = fn(&Value, &Path) -> Result<bool>;
    // The path run's results carry a `path`; its lag chart gets its own name.
    let wal_chart = if results["path"].is_object() {
        "path-wal-lag.png"
    } else {
        "wal-lag.png"
    };
    let charts: [(&str, Chart); 5] = [
        ("basebackup.png", basebackup),
        ("streams.png", streams),
        ("cpu.png", cpu),
        (wal_chart, wal_lag),
        ("path-run.png", path_run),
    ];
    for (name, chart) in charts {
        let path = out_dir.join(name);
        if chart(results, &path).with_context(|| format!("while drawing {}", path.display()))? {
            written.push(path);
        }
    }
    Ok(written)
}

/// Registers [`FONT_FILE`] once per process; plotters' `ab_glyph` backend wants `'static` bytes,
/// so they are leaked (one font, a few hundred KB, for the life of the process).
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT_FILE).map_err(|e| {
                format!(
                    "cannot read the chart font {FONT_FILE} ({e}); install the package \
                     fonts-dejavu-core (apt-get install fonts-dejavu-core)"
                )
            })?;
            plotters::style::register_font(FAMILY, FontStyle::Normal, bytes.leak())
                .map_err(|_| format!("{FONT_FILE} is not a TrueType font plotters can read"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// One bar of a horizontal bar chart.
struct Bar {
    label: String,
    value: f64,
    color: RGBColor,
}

/// One link's bars, drawn as one panel.
struct Panel {
    caption: String,
    bars: Vec<Bar>,
}

/// `basebackup.png`: median `pg_basebackup` time per contender, one panel per link.
fn basebackup(r: &Value, path: &Path) -> Result<bool> {
    let panels = links(r)
        .map(|l| Panel {
            caption: link_name(l),
            bars: rows(&l["basebackup"])
                .filter_map(|b| {
                    let contender = b["contender"].as_str()?;
                    Some(Bar {
                        label: contender.to_string(),
                        value: b["median_s"].as_f64()?,
                        color: color(contender),
                    })
                })
                .collect(),
        })
        .collect();
    let title = format!(
        "pg_basebackup -X stream, {:.0} MB database: median time of {}",
        r["dataset"]["database_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        reps(r)
    );
    bar_chart(path, &title, "time (s), shorter is better", "s", panels)
}

/// `path-run.png`: `pg_basebackup` time per contender on the emulated WAN path, one panel per
/// loss; a measurement stopped at the limit is drawn at the limit and labelled so.
fn path_run(r: &Value, path: &Path) -> Result<bool> {
    let (losses, names) = crate::path::losses_and_contenders(r);
    let limit = r["limit_s"].as_f64().unwrap_or(0.0);
    let panels = losses
        .iter()
        .map(|&loss| Panel {
            caption: format!("{loss}% random loss each way"),
            bars: names
                .iter()
                .filter_map(|n| {
                    let runs: Vec<&Value> = rows(&r["basebackup"])
                        .filter(|c| {
                            c["loss_percent"].as_f64() == Some(loss) && c["contender"] == n.as_str()
                        })
                        .collect();
                    if runs.is_empty() {
                        return None;
                    }
                    let secs: Option<Vec<f64>> =
                        runs.iter().map(|c| c["seconds"].as_f64()).collect();
                    let (label, value) = match secs {
                        Some(mut v) => {
                            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                            (n.clone(), v[v.len() / 2])
                        }
                        None => (format!("{n} (stopped at the limit)"), limit),
                    };
                    Some(Bar {
                        label,
                        value,
                        color: color(if n.starts_with("ssh") {
                            "ssh -L"
                        } else {
                            "pgferry"
                        }),
                    })
                })
                .collect(),
        })
        .collect();
    let p = &r["path"];
    let title = format!(
        "pg_basebackup -X stream, {:.0} MB, {} ms RTT, {} Mbit/s: time",
        r["dataset"]["database_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        p["rtt_ms"],
        p["rate_mbit"]
    );
    bar_chart(path, &title, "time (s), shorter is better", "s", panels)
}

/// `streams.png`: raw tunnel throughput per contender and stream count, one panel per link.
fn streams(r: &Value, path: &Path) -> Result<bool> {
    let title = format!("Raw tunnel throughput: median of {}", reps(r));
    stream_bars(
        r,
        path,
        "median_mb_per_s",
        &title,
        "throughput (MB/s), longer is better",
        "MB/s",
    )
}

/// `cpu.png`: CPU seconds per GB of the raw streams, both ends of the tunnel together.
fn cpu(r: &Value, path: &Path) -> Result<bool> {
    let title = format!(
        "CPU per GB through the tunnel, both ends: median of {}",
        reps(r)
    );
    stream_bars(
        r,
        path,
        "cpu_s_per_gb_median",
        &title,
        "CPU seconds per GB, shorter is better",
        "s",
    )
}

/// One bar per contender and stream count of each link's raw streams: their `field`.
fn stream_bars(
    r: &Value,
    path: &Path,
    field: &str,
    title: &str,
    axis: &str,
    unit: &str,
) -> Result<bool> {
    let panels = links(r)
        .map(|l| Panel {
            caption: match l["stream_mib"].as_u64() {
                Some(mib) => format!("{}: {mib} MiB per measurement", link_name(l)),
                None => link_name(l),
            },
            bars: rows(&l["streams"])
                .filter_map(|s| {
                    let contender = s["contender"].as_str()?;
                    let n = s["streams"].as_u64()?;
                    Some(Bar {
                        label: format!("{contender}, {n} stream{}", if n == 1 { "" } else { "s" }),
                        value: s[field].as_f64()?,
                        color: color(contender),
                    })
                })
                .collect(),
        })
        .collect();
    bar_chart(path, title, axis, unit, panels)
}

/// Horizontal bars, the value printed at the end of each; panels stacked. `false` if there
/// is nothing to draw.
fn bar_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    unit: &str,
    panels: Vec<Panel>,
) -> Result<bool> {
    let panels: Vec<Panel> = panels.into_iter().filter(|p| !p.bars.is_empty()).collect();
    if panels.is_empty() {
        return Ok(false);
    }
    let bars: usize = panels.iter().map(|p| p.bars.len()).sum();
    let height = 50 + 90 * panels.len() as u32 + 40 * bars as u32;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FAMILY, 24))?;
    let label_font = TextStyle::from((FAMILY, 16).into_font());
    let mut label_width = 0;
    for b in panels.iter().flat_map(|p| &p.bars) {
        label_width = label_width.max(root.estimate_text_size(&b.label, &label_font)?.0);
    }
    for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(&panels) {
        let n = panel.bars.len();
        let max = panel.bars.iter().map(|b| b.value).fold(0.0, f64::max);
        // Room on the right for the longest value label.
        let x_max = if max > 0.0 { max * 1.15 } else { 1.0 };
        // Bar i from the top is centred on y = n - 1 - i (the y axis grows upwards), with a
        // label exactly there and nowhere else.
        let y_of = |i: usize| (n - 1 - i) as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.caption, (FAMILY, 19))
            .margin(8)
            .margin_right(30)
            .x_label_area_size(45)
            .y_label_area_size(label_width + 16)
            .build_cartesian_2d(0.0..x_max, BarSlots(n))?;
        let label = |y: &f64| {
            let i = n as i64 - 1 - y.round() as i64;
            usize::try_from(i)
                .ok()
                .and_then(|i| panel.bars.get(i))
                .map_or(String::new(), |b| b.label.clone())
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_label_formatter(&label)
            .x_label_formatter(&|x| tick(*x))
            .x_max_light_lines(4)
            .x_desc(x_desc)
            .label_style(label_font.clone())
            .axis_desc_style((FAMILY, 16))
            .light_line_style(BLACK.mix(0.05))
            .bold_line_style(BLACK.mix(0.15))
            .draw()?;
        chart.draw_series(panel.bars.iter().enumerate().map(|(i, b)| {
            let y = y_of(i);
            let mut bar = Rectangle::new([(0.0, y - 0.5), (b.value, y + 0.5)], b.color.filled());
            bar.set_margin(6, 6, 0, 0);
            bar
        }))?;
        let value_font = (FAMILY, 16)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Left, VPos::Center));
        chart.draw_series(panel.bars.iter().enumerate().map(|(i, b)| {
            EmptyElement::at((b.value, y_of(i)))
                + Text::new(
                    format!("{} {unit}", tidy(b.value)),
                    (6, 0),
                    value_font.clone(),
                )
        }))?;
    }
    root.present()?;
    Ok(true)
}

/// The y axis of a bar panel: `n` slots of height 1 centred on 0 .. n - 1, a key point (a
/// label) at each centre. (plotters' `with_key_points` drops the label formatter.)
struct BarSlots(usize);

impl Ranged for BarSlots {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let share = (value + 0.5) / self.0.max(1) as f64;
        limit.0 + (share * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _: Hint) -> Vec<f64> {
        (0..self.0).map(|i| i as f64).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        -0.5..self.0 as f64 - 0.5
    }
}

/// One lag sample: seconds since the load started, lag in seconds and in MB.
struct LagSample {
    t: f64,
    lag_s: f64,
    lag_mb: f64,
}

/// One contender's lag samples.
struct LagLine {
    contender: String,
    detail: String,
    color: RGBColor,
    samples: Vec<LagSample>,
}

/// `wal-lag.png`: the standby's lag during and after the write load, in seconds (top) and MB
/// (bottom), one line per contender, a dashed marker where the load stopped.
fn wal_lag(r: &Value, path: &Path) -> Result<bool> {
    let lines = lag_lines(r);
    if lines.is_empty() {
        return Ok(false);
    }
    let load_s = rows(&r["wal"])
        .filter_map(|w| w["load_s"].as_f64())
        .fold(0.0, f64::max);
    let t_max = lines
        .iter()
        .flat_map(|l| &l.samples)
        .map(|s| s.t)
        .fold(load_s, f64::max)
        .max(1.0);
    let p = &r["path"];
    let link = if p.is_object() {
        format!(
            "{} ms RTT, {} Mbit/s, {}% loss",
            p["rtt_ms"],
            p["rate_mbit"],
            rows(&r["wal"])
                .next()
                .map_or(Value::Null, |w| w["loss_percent"].clone())
        )
    } else {
        links(r)
            .find(|l| l["label"] == "limited")
            .map_or("the limited link".to_string(), link_name)
    };
    let root = BitMapBackend::new(path, (WIDTH, 680)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!("Standby lag while streaming WAL over {link} under a write load"),
        (FAMILY, 24),
    )?;
    let (top, bottom) = root.split_vertically(320);
    // The top panel (seconds) carries the detailed legend, the bottom one (MB) the time axis.
    for (area, detailed) in [(top, true), (bottom, false)] {
        lag_panel(&area, &lines, load_s, t_max, detailed)?;
    }
    root.present()?;
    Ok(true)
}

/// Each contender's lag samples from the results' `wal` part, with a legend line of its
/// figures; contenders without samples are left out.
fn lag_lines(r: &Value) -> Vec<LagLine> {
    rows(&r["wal"])
        .filter_map(|w| {
            let contender = w["contender"].as_str()?.to_string();
            let samples: Vec<_> = rows(&w["samples"])
                .filter_map(|s| {
                    Some(LagSample {
                        t: s["t"].as_f64()?,
                        lag_s: s["lag_s"].as_f64()?,
                        lag_mb: s["lag_bytes"].as_f64()? / 1e6,
                    })
                })
                .collect();
            let detail = format!(
                "{contender} (WAL {:.1} MB/s, lag p99 {:.1} s, max {:.0} MB, drain {})",
                w["wal_mb_per_s"].as_f64().unwrap_or(0.0),
                w["lag_p99_s"].as_f64().unwrap_or(0.0),
                w["lag_max_bytes"].as_f64().unwrap_or(0.0) / 1e6,
                w["drain_s"]
                    .as_f64()
                    .map_or("> 300 s".to_string(), |d| format!("{d:.1} s"))
            );
            (!samples.is_empty()).then(|| LagLine {
                color: color(&contender),
                contender,
                detail,
                samples,
            })
        })
        .collect()
}

/// One panel of `wal-lag.png`: lag in seconds with the detailed legend (`detailed`), or in MB
/// with the time axis; the marker where the load stopped at `load_s`.
fn lag_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    lines: &[LagLine],
    load_s: f64,
    t_max: f64,
    detailed: bool,
) -> Result<()> {
    let y = |s: &LagSample| if detailed { s.lag_s } else { s.lag_mb };
    let y_desc = if detailed { "lag (s)" } else { "lag (MB)" };
    let y_max = lines
        .iter()
        .flat_map(|l| &l.samples)
        .map(y)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .margin_right(30)
        .x_label_area_size(if detailed { 30 } else { 45 })
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max * 1.02, 0.0..y_max)?;
    let mut mesh = chart.configure_mesh();
    mesh.y_desc(y_desc)
        .x_label_formatter(&|x| tick(*x))
        .y_label_formatter(&|v| tick(*v))
        .max_light_lines(4)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.15));
    if !detailed {
        mesh.x_desc("time since the write load started (s)");
    }
    mesh.draw()?;
    if load_s > 0.0 {
        chart.draw_series(DashedLineSeries::new(
            [(load_s, 0.0), (load_s, y_max)],
            8,
            5,
            BLACK.mix(0.55).stroke_width(1),
        ))?;
        // At the foot of the marker: the legend holds the upper left, and the lines that
        // keep rising after the load are high up by then.
        chart.draw_series(std::iter::once(
            EmptyElement::at((load_s, 0.0))
                + Text::new(
                    format!("load stops ({load_s:.0} s)"),
                    (6, -6),
                    (FAMILY, 15)
                        .into_font()
                        .color(&BLACK.mix(0.7))
                        .pos(Pos::new(HPos::Left, VPos::Bottom)),
                ),
        ))?;
    }
    for line in lines {
        let color = line.color;
        chart
            .draw_series(LineSeries::new(
                line.samples.iter().map(|s| (s.t, y(s))),
                color.stroke_width(2),
            ))?
            .label(if detailed {
                &line.detail
            } else {
                &line.contender
            })
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 22, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .margin(12)
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}

/// The links of a results JSON, in the order measured.
fn links(r: &Value) -> impl Iterator<Item = &Value> {
    rows(&r["links"])
}

fn rows(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

fn link_name(l: &Value) -> String {
    l["link"]
        .as_str()
        .or(l["label"].as_str())
        .unwrap_or("?")
        .to_string()
}

fn reps(r: &Value) -> String {
    match r["reps"].as_u64() {
        Some(1) => "1 repetition".to_string(),
        Some(n) => format!("{n} repetitions"),
        None => "the repetitions".to_string(),
    }
}

/// A number with as many decimals as its size deserves: 1.19, 23.0, 372.
fn tidy(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_string()
    } else if a < 10.0 {
        format!("{v:.2}")
    } else if a < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// An axis tick: 20, 2.5, 0.25 (no trailing zeros).
fn tick(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// One colour per contender, the same in every chart; pgferry stands out.
fn color(contender: &str) -> RGBColor {
    match contender {
        "pgferry" => RGBColor(230, 115, 20),
        "direct TCP" => RGBColor(140, 140, 140),
        "ssh -L" => RGBColor(50, 110, 190),
        "ssh -C -L" => RGBColor(120, 170, 225),
        "server-zstd via ssh -L" => RGBColor(130, 90, 175),
        // The path cases' contenders.
        "ssh -L CUBIC" => RGBColor(120, 170, 225),
        "ssh -L BBR" => RGBColor(50, 110, 190),
        "pgferry cubic" => RGBColor(230, 115, 20),
        "pgferry bbr" => RGBColor(190, 60, 70),
        "pgferry newreno" => RGBColor(110, 110, 40),
        other => {
            const SPARE: [RGBColor; 4] = [
                RGBColor(40, 150, 90),
                RGBColor(190, 60, 70),
                RGBColor(110, 110, 40),
                RGBColor(20, 140, 150),
            ];
            SPARE[other.bytes().map(usize::from).sum::<usize>() % SPARE.len()]
        }
    }
}

/// `--charts-from FILE`: renders the charts of a results JSON into FILE's directory.
pub fn render_from(file: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("while reading {}", file.display()))?;
    let results: Value = serde_json::from_str(&text)
        .with_context(|| format!("while parsing {} as JSON", file.display()))?;
    if !results.is_object() {
        bail!("{} is not a pgferry-bench results object", file.display());
    }
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    render(&results, dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_pngs_from_a_small_result() {
        if !Path::new(FONT_FILE).exists() {
            println!("skipped: {FONT_FILE} is missing (install fonts-dejavu-core)");
            return;
        }
        let results = json!({
            "reps": 1, "dataset": {"database_bytes": 50_000_000},
            "links": [{"label": "limited", "link": "100 Mbit/s (tc tbf)", "rate_mbit": 100,
                "stream_mib": 96,
                "basebackup": [{"contender": "ssh -L", "median_s": 8.4},
                               {"contender": "pgferry", "median_s": 2.5}],
                "streams": [{"contender": "ssh -L", "streams": 1, "median_mb_per_s": 11.9},
                            {"contender": "pgferry", "streams": 8, "median_mb_per_s": 31.4}]}],
            "wal": [{"contender": "pgferry", "load_s": 2.0, "drain_s": 0.5, "lag_p99_s": 1.0,
                "lag_max_bytes": 4e6, "wal_mb_per_s": 20.0,
                "samples": [{"t": 0.0, "lag_bytes": 0.0, "lag_s": 0.0},
                            {"t": 1.0, "lag_bytes": 4e6, "lag_s": 1.0},
                            {"t": 2.5, "lag_bytes": 0.0, "lag_s": 0.0}]}],
        });
        let dir = tempfile::tempdir().unwrap();
        let written = render(&results, dir.path()).unwrap();
        let names: Vec<_> = written.iter().map(|p| p.file_name().unwrap()).collect();
        assert_eq!(names, ["basebackup.png", "streams.png", "wal-lag.png"]);
        for p in &written {
            let bytes = std::fs::read(p).unwrap();
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{}", p.display());
        }
        // Without a WAL part (as in runs before it existed) that chart is skipped.
        let mut no_wal = results.clone();
        no_wal["wal"] = json!([]);
        let other = tempfile::tempdir().unwrap();
        assert_eq!(render(&no_wal, other.path()).unwrap().len(), 2);
    }
}
