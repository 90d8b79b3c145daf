//! SVG charts (plotters' SVG backend: text as SVG <text>, no system fonts needed).

use plotters::prelude::*;
use sepconv::{Error, Result};

/// One named series of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel: title, axis labels, series, whether to join points with lines, log-scale x.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub lines: bool,
    pub log_x: bool,
    /// Integer tick labels on the x axis (epochs).
    pub integer_x: bool,
    /// Legend in the upper right (else lower right).
    pub legend_upper: bool,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn range(values: impl Iterator<Item = f64> + Clone, log: bool) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if log {
        return (lo / 1.5, hi * 1.5);
    }
    let pad = ((hi - lo) * 0.08).max(1e-3 * hi.abs().max(1e-3));
    (lo - pad, hi + pad)
}

fn draw_err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Runtime(format!("drawing the chart: {e:?}"))
}

/// Renders panels side by side into an SVG document.
pub fn svg(panels: &[Panel], width_per_panel: u32, height: u32) -> Result<String> {
    let mut out = String::new();
    {
        let root =
            SVGBackend::with_string(&mut out, (width_per_panel * panels.len() as u32, height))
                .into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let areas = root.split_evenly((1, panels.len()));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            let xs = panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.0))
                .collect::<Vec<_>>();
            let ys = panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.1))
                .collect::<Vec<_>>();
            let (x0, x1) = range(xs.iter().copied(), panel.log_x);
            let (y0, y1) = range(ys.iter().copied(), false);
            let mut builder = ChartBuilder::on(area);
            builder
                .caption(&panel.title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60);
            macro_rules! draw {
                ($chart:expr) => {{
                    let mut chart = $chart;
                    let ticks = panel
                        .series
                        .iter()
                        .map(|s| s.points.len())
                        .max()
                        .unwrap_or(1)
                        .clamp(2, 10);
                    let int_fmt = |x: &f64| format!("{x:.0}");
                    let mut mesh = chart.configure_mesh();
                    if panel.integer_x {
                        mesh.x_labels(ticks).x_label_formatter(&int_fmt);
                    }
                    mesh.x_desc(&panel.x_label)
                        .y_desc(&panel.y_label)
                        .draw()
                        .map_err(draw_err)?;
                    for (i, s) in panel.series.iter().enumerate() {
                        let color = COLORS[i % COLORS.len()];
                        if panel.lines {
                            chart
                                .draw_series(LineSeries::new(
                                    s.points.iter().copied(),
                                    color.stroke_width(2),
                                ))
                                .map_err(draw_err)?
                                .label(s.name.clone())
                                .legend(move |(x, y)| {
                                    PathElement::new(
                                        vec![(x, y), (x + 16, y)],
                                        color.stroke_width(2),
                                    )
                                });
                        }
                        let anno = chart
                            .draw_series(
                                s.points.iter().map(|&p| Circle::new(p, 4, color.filled())),
                            )
                            .map_err(draw_err)?;
                        if !panel.lines {
                            anno.label(s.name.clone())
                                .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
                        }
                    }
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK)
                        .position(if panel.legend_upper {
                            SeriesLabelPosition::UpperRight
                        } else {
                            SeriesLabelPosition::LowerRight
                        })
                        .draw()
                        .map_err(draw_err)?;
                }};
            }
            if panel.log_x {
                draw!(
                    builder
                        .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                        .map_err(draw_err)?
                );
            } else {
                draw!(
                    builder
                        .build_cartesian_2d(x0..x1, y0..y1)
                        .map_err(draw_err)?
                );
            }
        }
        root.present().map_err(draw_err)?;
    }
    Ok(out)
}
