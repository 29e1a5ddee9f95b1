//! BENCHMARKS.svg: small multiples, one bar chart per main figure, every contender in each.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::contenders::Kind;
use crate::report::{FIGURES, Metric, Samples, num};

/// Small multiples: one bar chart per main figure, every contender in each.
pub(crate) fn chart(results: &BTreeMap<Kind, Samples>, kinds: &[Kind]) -> String {
    let panels = [
        Metric::Gbps1,
        Metric::Gbps8,
        Metric::Cpu,
        Metric::P99,
        Metric::Cps,
        Metric::ConnKib,
    ];
    let (pw, ph) = (300.0, 220.0);
    let cols = 3.0;
    let width = pw * cols;
    let height = ph * (panels.len() as f64 / cols).ceil();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, metric) in panels.into_iter().enumerate() {
        let Some(figure) = FIGURES.iter().find(|f| f.metric == metric) else {
            continue;
        };
        let x0 = (i as f64 % cols) * pw;
        let y0 = (i as f64 / cols).floor() * ph;
        let values: Vec<(Kind, f64)> = kinds
            .iter()
            .filter_map(|k| {
                results
                    .get(k)
                    .and_then(|s| s.stats(metric))
                    .map(|s| (*k, s.0.max(0.0)))
            })
            .collect();
        let max = values.iter().map(|v| v.1).fold(0.0f64, f64::max).max(1e-9);
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-weight=\"bold\">{} ({}{})</text>",
            x0 + 10.0,
            y0 + 18.0,
            figure.title,
            figure.unit,
            if figure.higher_is_better {
                ", higher is better"
            } else {
                ", lower is better"
            }
        );
        let bar_h = 20.0;
        for (j, (kind, v)) in values.iter().enumerate() {
            let y = y0 + 32.0 + j as f64 * (bar_h + 4.0);
            let w = (pw - 130.0) * v / max;
            let colour = match kind {
                Kind::Ferryd | Kind::FerrydCopy | Kind::FerrydBefore => "#2a7ab0",
                Kind::Direct => "#999999",
                _ => "#e0a040",
            };
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\">{}</text>",
                x0 + 10.0,
                y + 14.0,
                kind.name()
            );
            let _ = writeln!(
                svg,
                "<rect x=\"{}\" y=\"{y}\" width=\"{w:.1}\" height=\"{bar_h}\" fill=\"{colour}\"/>",
                x0 + 100.0
            );
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{}\">{}</text>",
                x0 + 104.0 + w,
                y + 14.0,
                num(*v)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
