//! `--plot`: decode-output error against effective bits per value, one labelled point per
//! row, as SVG: the trade-off a user looks at when choosing a cache type.

use std::path::Path;

use plotters::prelude::*;

use super::Row;
use crate::Error;

/// Plot coordinates `(mean bits, output NMSE, label)` and the log y range. A zero error (the
/// f16 reference) is drawn a decade under the smallest non-zero one, a non-finite one (an
/// all-zero reference output) at the top.
fn points(rows: &[Row]) -> (Vec<(f64, f64, String)>, f64, f64) {
    let shown = rows
        .iter()
        .map(|r| r.nmse_out)
        .filter(|e| e.is_finite() && *e > 0.0);
    let lo = shown.clone().fold(f64::INFINITY, f64::min);
    let hi = shown.fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() {
        (lo, hi)
    } else {
        (1e-3, 1.0)
    };
    let floor = lo / 10.0;
    // Whole decades around the points.
    let y0 = 10f64.powf((floor.log10() - 0.2).floor());
    let y1 = 10f64.powf((hi.log10() + 0.2).ceil());
    let pts = rows
        .iter()
        .map(|r| {
            let x = (r.bits_k + r.bits_v) / 2.0;
            match r.nmse_out {
                e if !e.is_finite() => (x, y1, format!("{} (inf)", r.name)),
                e if e > 0.0 => (x, e, r.name.clone()),
                _ => (x, floor, format!("{} (0)", r.name)),
            }
        })
        .collect();
    (pts, y0, y1)
}

/// Label font size, and a generous width per character for placing labels.
const FONT: i32 = 13;
const CHAR_W: i32 = 7;

/// Offsets of each point's label from the point (pixels), chosen greedily among right/left,
/// above/below so that labels do not cover each other where a free place exists.
fn place_labels(at: &[(i32, i32)], len: &[usize]) -> Vec<(i32, i32)> {
    let mut boxes: Vec<[i32; 4]> = Vec::new();
    let mut out = Vec::new();
    for (&(x, y), &n) in at.iter().zip(len) {
        let w = CHAR_W * n as i32;
        let options = [(7, -FONT - 2), (7, 3), (-7 - w, -FONT - 2), (-7 - w, 3)];
        let rect = |(dx, dy): (i32, i32)| [x + dx, y + dy, x + dx + w, y + dy + FONT];
        let free = |r: [i32; 4]| {
            boxes
                .iter()
                .all(|b| r[2] <= b[0] || b[2] <= r[0] || r[3] <= b[1] || b[3] <= r[1])
        };
        let off = options
            .iter()
            .copied()
            .find(|&o| free(rect(o)))
            .unwrap_or(options[0]);
        boxes.push(rect(off));
        out.push(off);
    }
    out
}

/// Write the plot of `rows` to `path`, with `title` on top.
pub fn plot(rows: &[Row], title: &str, path: &Path) -> Result<(), Error> {
    let err = |e: &dyn std::fmt::Display| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    };
    let (pts, y0, y1) = points(rows);
    let xs = pts.iter().map(|p| p.0);
    let x0 = xs.clone().fold(f64::INFINITY, f64::min).min(16.0);
    let x1 = xs.fold(0.0, f64::max).max(1.0);
    let root = SVGBackend::new(path, (960, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(24)
        .x_label_area_size(44)
        .y_label_area_size(80)
        // Room on the right for the labels of the widest types.
        .build_cartesian_2d((x0 * 0.9).max(0.0)..x1 * 1.15, (y0..y1).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("effective bits per value (mean of K and V)")
        .y_desc("decode output NMSE vs f16")
        .y_label_formatter(&|y| format!("{y:.0e}"))
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| err(&e))?;
    let at: Vec<(i32, i32)> = pts
        .iter()
        .map(|p| chart.backend_coord(&(p.0, p.1)))
        .collect();
    let offsets = place_labels(&at, &pts.iter().map(|p| p.2.len()).collect::<Vec<_>>());
    chart
        .draw_series(pts.iter().zip(offsets).map(|((x, y, name), off)| {
            EmptyElement::at((*x, *y))
                + Circle::new((0, 0), 4, BLUE.filled())
                + Text::new(name.clone(), off, ("sans-serif", FONT))
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, bits: f64, nmse_out: f64) -> Row {
        Row {
            name: name.into(),
            bits_k: bits,
            bits_v: bits,
            nmse_k: 0.0,
            nmse_v: 0.0,
            nmse_out,
            kl: 0.0,
            top32: 1.0,
        }
    }

    #[test]
    fn zero_error_sits_a_decade_below_the_rest() {
        let rows = [
            row("f16", 16.0, 0.0),
            row("q4_0", 4.5, 2e-3),
            row("k", 1.2, 0.3),
            row("z", 2.0, f64::INFINITY),
        ];
        let (pts, y0, y1) = points(&rows);
        assert_eq!(pts[0].1, 2e-4);
        assert_eq!(pts[0].2, "f16 (0)");
        assert_eq!(pts[2], (1.2, 0.3, "k".to_string()));
        assert_eq!((y0, y1), (1e-4, 1.0));
        assert_eq!(pts[3], (2.0, 1.0, "z (inf)".to_string()));
    }

    #[test]
    fn labels_avoid_each_other() {
        // Three points on top of each other: right-above, right-below, left-above.
        let off = place_labels(&[(100, 100), (100, 100), (100, 100)], &[4, 4, 4]);
        assert_eq!(off, [(7, -15), (7, 3), (-35, -15)]);
        // Points far apart keep the first place.
        let off = place_labels(&[(0, 0), (500, 500)], &[10, 10]);
        assert_eq!(off, [(7, -15), (7, -15)]);
    }

    #[test]
    fn writes_an_svg_with_every_label() {
        let rows = [
            row("f16", 16.0, 0.0),
            row("q8_0", 8.5, 1e-5),
            row("k1_5_mix/f16", 8.8, 0.02),
            row("preset:vidkv", 1.7, 0.1),
        ];
        let path = std::env::temp_dir().join(format!("kvbits-plot-{}.svg", std::process::id()));
        plot(&rows, "test data", &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        for label in [
            "f16 (0)",
            "q8_0",
            "k1_5_mix/f16",
            "preset:vidkv",
            "test data",
        ] {
            assert!(svg.contains(label), "no '{label}' in the SVG");
        }
        let e = plot(&rows, "x", Path::new("/nonexistent/dir/p.svg")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir/p.svg"), "{e}");
    }
}
