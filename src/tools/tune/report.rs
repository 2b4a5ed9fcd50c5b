//! The report of `reranker tune` as a Markdown table and an SVG plot.

use std::fmt::Write as _;

use super::{KRow, TuneReport};

/// The per-K table, Markdown (it goes into the README as printed).
pub fn table(r: &TuneReport) -> String {
    let mut s = String::new();
    let recall_h: String =
        r.ns.iter()
            .map(|n| format!(" recall@{n} before → after |"))
            .collect();
    let _ = writeln!(
        s,
        "| K | nDCG@10 before → after | MRR@10 before → after |{recall_h} pairs/s | latency per event p50 / p95 |"
    );
    let _ = writeln!(s, "|{}", " --- |".repeat(5 + r.ns.len()));
    for row in &r.rows {
        let recall: String =
            r.ns.iter()
                .map(|n| {
                    format!(
                        " {:.3} → {:.3} |",
                        row.before.recall_at_n[n], row.after.recall_at_n[n]
                    )
                })
                .collect();
        let _ = writeln!(
            s,
            "| {}{} | {:.3} → {:.3} | {:.3} → {:.3} |{recall} {:.1} | {:.0} / {:.0} ms |",
            row.k,
            if row.k == r.recommended_k { " ✓" } else { "" },
            row.before.ndcg_at_10,
            row.after.ndcg_at_10,
            row.before.mrr_at_10,
            row.after.mrr_at_10,
            row.pairs_per_s,
            row.latency_ms_p50,
            row.latency_ms_p95,
        );
    }
    let _ = writeln!(
        s,
        "\n{} queries, model {} @ {} (max_length {}, {}); recommended K = {} ({}; best nDCG@10 {:.3}).",
        r.queries,
        r.model,
        r.model_revision,
        r.max_length,
        r.device,
        r.recommended_k,
        r.rule,
        r.best_ndcg_at_10
    );
    s
}

/// Quality (nDCG@10 before and after) and cost (p50 latency per event) against K, as SVG.
pub fn svg(r: &TuneReport) -> String {
    let (w, h) = (760.0, 420.0);
    let (l, rt, top, bot) = (70.0, 80.0, 50.0, 60.0);
    let (pw, ph) = (w - l - rt, h - top - bot);
    let kmin = r.rows.first().map_or(1, |x| x.k) as f64;
    let kmax = r.rows.last().map_or(1, |x| x.k) as f64;
    // K on a log axis: the default 10, 20, 50, 100 spreads evenly.
    let x = |k: usize| {
        if kmax > kmin {
            l + pw * ((k as f64).ln() - kmin.ln()) / (kmax.ln() - kmin.ln())
        } else {
            l + pw / 2.0
        }
    };
    let qs: Vec<f64> = r
        .rows
        .iter()
        .flat_map(|x| [x.before.ndcg_at_10, x.after.ndcg_at_10])
        .collect();
    let qlo = (qs.iter().copied().fold(f64::INFINITY, f64::min) - 0.02).max(0.0);
    let qhi = (qs.iter().copied().fold(f64::NEG_INFINITY, f64::max) + 0.02).min(1.0);
    let yq = |v: f64| top + ph * (1.0 - (v - qlo) / (qhi - qlo).max(1e-9));
    let lmax = r
        .rows
        .iter()
        .map(|x| x.latency_ms_p50)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let yl = |v: f64| top + ph * (1.0 - v / lmax);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">reranker tune: {} ({} queries, max_length {})</text>"#,
        w / 2.0,
        esc(&r.model),
        r.queries,
        r.max_length
    );
    let _ = writeln!(
        s,
        r#"<rect x="{l}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    for i in 0..=4 {
        let v = qlo + (qhi - qlo) * i as f64 / 4.0;
        let lv = lmax * i as f64 / 4.0;
        let y = yq(v);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.3}</text><text x="{}" y="{:.1}">{lv:.0}</text>"##,
            l + pw,
            l - 6.0,
            y + 4.0,
            l + pw + 6.0,
            yl(lv) + 4.0
        );
    }
    for row in &r.rows {
        let xk = x(row.k);
        let _ = writeln!(
            s,
            r#"<text x="{xk:.1}" y="{}" text-anchor="middle">{}</text>"#,
            top + ph + 18.0,
            row.k
        );
    }
    let poly = |f: &dyn Fn(&KRow) -> f64, y: &dyn Fn(f64) -> f64| -> String {
        r.rows
            .iter()
            .map(|row| format!("{:.1},{:.1}", x(row.k), y(f(row))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for (pts, color, dash) in [
        (poly(&|r| r.before.ndcg_at_10, &yq), "#888", "6 4"),
        (poly(&|r| r.after.ndcg_at_10, &yq), "#1f77b4", "none"),
        (poly(&|r| r.latency_ms_p50, &yl), "#d62728", "2 3"),
    ] {
        let _ = writeln!(
            s,
            r#"<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#
        );
        for p in pts.split(' ') {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, r#"<circle cx="{px}" cy="{py}" r="3" fill="{color}"/>"#);
        }
    }
    let xr = x(r.recommended_k);
    let _ = writeln!(
        s,
        r##"<line x1="{xr:.1}" x2="{xr:.1}" y1="{top}" y2="{}" stroke="#2ca02c" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" fill="#2ca02c">recommended K = {}</text>"##,
        top + ph,
        xr + 4.0,
        top + 14.0,
        r.recommended_k
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">K (candidates reranked per event, log scale)</text>"#,
        l + pw / 2.0,
        h - 22.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">nDCG@10</text>"#,
        top + ph / 2.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate({},{}) rotate(90)" text-anchor="middle">latency per event, p50 (ms)</text>"#,
        w - 20.0,
        top + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{l}" y="{}"><tspan fill="#888">- - nDCG@10 first stage</tspan>   <tspan fill="#1f77b4">— nDCG@10 reranked</tspan>   <tspan fill="#d62728">··· latency p50</tspan></text>"##,
        h - 6.0
    );
    s.push_str("</svg>\n");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
