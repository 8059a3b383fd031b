//! PNG charts of the benchmark results: grouped bar charts drawn with plotters' bitmap
//! backend. Text is drawn from font8x8's bitmap glyphs (scaled), so no font files or
//! fontconfig are needed on the machine that renders them.
use std::path::Path;

use plotters::prelude::*;

/// One series of a grouped bar chart: a name and a value per category (`None`: no bar).
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

/// A grouped bar chart.
pub struct BarChart<'a> {
    pub title: &'a str,
    /// What the y axis counts, e.g. "packets/s".
    pub unit: &'a str,
    pub categories: Vec<String>,
    pub series: Vec<Series>,
    /// How a value is written above its bar and on the axis.
    pub format: fn(f64) -> String,
}

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 560;
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

#[derive(Debug, thiserror::Error)]
#[error("drawing {path}: {message}")]
pub struct ChartError {
    path: String,
    message: String,
}

type Area<'b> = DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>;
type DrawError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

/// Width in pixels of `text` at `scale`.
#[expect(clippy::cast_possible_wrap, reason = "chart labels are short")]
fn text_width(text: &str, scale: i32) -> i32 {
    text.chars().count() as i32 * 8 * scale
}

/// Draws `text` with its top-left corner at (x, y); characters outside ASCII become '?'.
#[expect(clippy::cast_possible_wrap, reason = "chart labels are short")]
fn text(
    area: &Area<'_>,
    (x, y): (i32, i32),
    text: &str,
    scale: i32,
    color: RGBColor,
) -> Result<(), DrawError> {
    for (i, c) in text.chars().enumerate() {
        let code = if c.is_ascii() {
            c as usize
        } else {
            '?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        let x0 = x + i as i32 * 8 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let px = x0 + col * scale;
                    let py = y + row as i32 * scale;
                    area.draw(&Rectangle::new(
                        [(px, py), (px + scale, py + scale)],
                        color.filled(),
                    ))?;
                }
            }
        }
    }
    Ok(())
}

/// A round axis step near `max / 5`.
fn nice_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let f = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    f * mag
}

impl BarChart<'_> {
    /// Renders the chart to a PNG at `path`.
    pub fn render(&self, path: &Path) -> Result<(), ChartError> {
        let err = |e: &dyn std::fmt::Display| ChartError {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
        self.draw(&root).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))
    }

    #[expect(
        clippy::cast_possible_wrap,
        reason = "pixel sizes and bar counts are small"
    )]
    fn draw(&self, root: &Area<'_>) -> Result<(), DrawError> {
        let black = RGBColor(20, 20, 20);
        let grey = RGBColor(200, 200, 200);
        root.fill(&WHITE)?;
        text(root, (20, 14), self.title, 2, black)?;
        let (left, right, top, bottom) = (110, 20, 90, 70);
        let (width, height) = (WIDTH as i32, HEIGHT as i32);
        let plot_w = width - left - right;
        let plot_h = height - top - bottom;
        let max = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten().copied())
            .fold(0.0f64, f64::max);
        let step = nice_step(max * 1.1);
        let top_value = (max * 1.1 / step).ceil().max(1.0) * step;
        let y_of = |v: f64| top + plot_h - (v / top_value * f64::from(plot_h)) as i32;
        // Grid and y labels.
        let mut tick = 0.0;
        while tick <= top_value + step / 2.0 {
            let y = y_of(tick);
            root.draw(&PathElement::new(vec![(left, y), (left + plot_w, y)], grey))?;
            let label = (self.format)(tick);
            text(
                root,
                (left - 8 - text_width(&label, 1), y - 4),
                &label,
                1,
                black,
            )?;
            tick += step;
        }
        text(root, (20, top - 24), self.unit, 1, black)?;
        // Legend.
        let mut lx = left;
        for (i, s) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            root.draw(&Rectangle::new([(lx, 42), (lx + 14, 56)], color.filled()))?;
            text(root, (lx + 20, 45), &s.name, 1, black)?;
            lx += 20 + text_width(&s.name, 1) + 24;
        }
        // Bars.
        let groups = self.categories.len().max(1) as i32;
        let group_w = plot_w / groups;
        let bars = self.series.len().max(1) as i32;
        let bar_w = ((group_w - 30) / bars).clamp(4, 90);
        for (g, cat) in self.categories.iter().enumerate() {
            let gx = left + g as i32 * group_w;
            let start = gx + (group_w - bar_w * bars) / 2;
            for (i, s) in self.series.iter().enumerate() {
                let Some(Some(value)) = s.values.get(g) else {
                    continue;
                };
                let bar_x = start + i as i32 * bar_w;
                let color = PALETTE[i % PALETTE.len()];
                root.draw(&Rectangle::new(
                    [(bar_x + 2, y_of(*value)), (bar_x + bar_w - 2, top + plot_h)],
                    color.filled(),
                ))?;
                let label = (self.format)(*value);
                let tw = text_width(&label, 1);
                if tw <= bar_w + 8 {
                    text(
                        root,
                        (bar_x + (bar_w - tw) / 2, y_of(*value) - 11),
                        &label,
                        1,
                        black,
                    )?;
                }
            }
            let tw = text_width(cat, 1);
            text(
                root,
                (gx + (group_w - tw) / 2, top + plot_h + 12),
                cat,
                1,
                black,
            )?;
        }
        root.draw(&PathElement::new(
            vec![
                (left, top),
                (left, top + plot_h),
                (left + plot_w, top + plot_h),
            ],
            black,
        ))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::nice_step;

    #[test]
    fn axis_steps_are_round() {
        assert!((nice_step(500_000.0) - 100_000.0).abs() < 1e-6);
        assert!((nice_step(7.0) - 2.0).abs() < 1e-9);
        assert!((nice_step(0.9) - 0.2).abs() < 1e-9);
    }
}
