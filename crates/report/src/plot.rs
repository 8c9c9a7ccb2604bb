//! Line charts of training runs rendered in Rust (plotters into an RGB buffer, text with the
//! embedded DejaVu Sans, so no system fonts), encoded as PNG. The same runs and settings give
//! the same bytes.

use crate::error::{ReportError, Result};
use crate::log::{Metric, Run, XAxis};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use std::sync::Once;

/// Series colours in run order (Tableau 10, chosen to be told apart, also in greyscale order).
pub const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// What to draw.
#[derive(Debug, Clone)]
pub struct PlotConfig {
    pub metric: Metric,
    pub x: XAxis,
    /// Trailing moving average over this many points (1 = raw).
    pub smooth: usize,
    pub log_y: bool,
    pub title: Option<String>,
    pub width: u32,
    pub height: u32,
}

impl Default for PlotConfig {
    fn default() -> Self {
        Self {
            metric: Metric::Loss,
            x: XAxis::Step,
            smooth: 1,
            log_y: false,
            title: None,
            width: 1000,
            height: 600,
        }
    }
}

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font shipped by the dejavu crate.
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err()
        {
            panic!("the embedded DejaVu Sans font does not parse");
        }
    });
}

fn draw_err(e: impl std::fmt::Display) -> ReportError {
    ReportError::Draw(e.to_string())
}

/// The series to draw, one per run, with points that cannot be drawn on a log axis left out.
fn series(runs: &[Run], cfg: &PlotConfig) -> Result<Vec<Vec<(f64, f64)>>> {
    runs.iter()
        .map(|r| {
            let s: Vec<(f64, f64)> = r
                .series(cfg.x, cfg.metric, cfg.smooth)
                .into_iter()
                .filter(|&(_, y)| !cfg.log_y || y > 0.0)
                .collect();
            if s.is_empty() {
                return Err(ReportError::NothingToPlot {
                    path: r.path.clone(),
                    why: format!(
                        "every {} is <= 0, which a log scale cannot show",
                        cfg.metric.field()
                    ),
                });
            }
            Ok(s)
        })
        .collect()
}

fn bounds(all: &[Vec<(f64, f64)>], log_y: bool) -> ((f64, f64), (f64, f64)) {
    let pts = all.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if log_y {
        if y1 <= y0 {
            y1 = y0 * 2.0;
        }
        ((x0, x1), (y0 / 1.1, y1 * 1.1))
    } else {
        let pad = if y1 > y0 {
            (y1 - y0) * 0.05
        } else {
            y0.abs().max(1.0) * 0.05
        };
        ((x0, x1), (y0 - pad, y1 + pad))
    }
}

fn title(runs: &[Run], cfg: &PlotConfig) -> String {
    if let Some(t) = &cfg.title {
        return t.clone();
    }
    let smooth = if cfg.smooth > 1 {
        format!(", moving average of {}", cfg.smooth)
    } else {
        String::new()
    };
    let what = if runs.len() > 1 {
        format!("{} runs", runs.len())
    } else {
        runs[0].label.clone()
    };
    format!("qat-distill {}: {what}{smooth}", cfg.metric.field())
}

/// Up to 4 decimals, trailing zeros dropped.
fn short(v: f64) -> String {
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e12).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 1e9 {
        format!("{}G", short(v / 1e9))
    } else if a >= 1e6 {
        format!("{}M", short(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", short(v / 1e3))
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        short(v)
    }
}

/// Draws the chart into an RGB buffer of `cfg.width * cfg.height * 3` bytes.
fn draw<Y>(
    buf: &mut [u8],
    runs: &[Run],
    all: &[Vec<(f64, f64)>],
    y_range: Y,
    x_range: (f64, f64),
    cfg: &PlotConfig,
) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let root = BitMapBackend::with_buffer(buf, (cfg.width, cfg.height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title(runs, cfg), (FONT, 22).into_font())
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x_range.0..x_range.1, y_range)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc(cfg.x.axis_label())
        .y_desc(cfg.metric.axis_label())
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(draw_err)?;
    for (i, (run, pts)) in runs.iter().zip(all).enumerate() {
        let (r, g, b) = PALETTE[i];
        let color = RGBColor(r, g, b);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(draw_err)?
            .label(run.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE)
        .border_style(RGBColor(160, 160, 160))
        .label_font((FONT, 14))
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

/// Renders `runs` on one chart and returns the PNG bytes.
pub fn render_png(runs: &[Run], cfg: &PlotConfig) -> Result<Vec<u8>> {
    if runs.len() > PALETTE.len() {
        return Err(ReportError::TooManyRuns(runs.len()));
    }
    if !(200..=8000).contains(&cfg.width) || !(200..=8000).contains(&cfg.height) {
        return Err(ReportError::ImageSize {
            width: cfg.width,
            height: cfg.height,
        });
    }
    register_font();
    let all = series(runs, cfg)?;
    let (x_range, (y0, y1)) = bounds(&all, cfg.log_y);
    let mut buf = vec![0u8; cfg.width as usize * cfg.height as usize * 3];
    if cfg.log_y {
        draw(&mut buf, runs, &all, (y0..y1).log_scale(), x_range, cfg)?;
    } else {
        draw(&mut buf, runs, &all, y0..y1, x_range, cfg)?;
    }
    encode_png(&buf, cfg.width, cfg.height)
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Balanced);
    let mut w = enc.write_header().map_err(draw_err)?;
    w.write_image_data(rgb).map_err(draw_err)?;
    w.finish().map_err(draw_err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(0.0005), "5.0e-4");
        assert_eq!(tick(0.125), "0.125");
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(4096.0), "4096");
        assert_eq!(tick(200_000.0), "200k");
        assert_eq!(tick(1_200_000.0), "1.2M");
        assert_eq!(tick(2.5e13), "2.5e13");
    }
}
