//! Relevance judgments and the ranking metrics `reranker tune` reports.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde_json::Value;

use super::Quality;

/// Relevance judgments: query id → document id → grade.
pub type Qrels = HashMap<String, HashMap<String, f64>>;

pub fn read_qrels(path: &Path) -> anyhow::Result<Qrels> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut q: Qrels = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').map(str::trim).collect();
        if line.trim().is_empty() {
            continue;
        }
        let grade = f.get(2).and_then(|s| s.parse::<f64>().ok());
        match (f.len(), grade) {
            (3, Some(g)) => {
                q.entry(f[0].to_string())
                    .or_default()
                    .insert(f[1].to_string(), g);
            }
            _ if i == 0 => {} // header
            _ => bail!(
                "{}:{}: expected `query-id<TAB>corpus-id<TAB>score`",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(q)
}

pub struct LabelledQuery {
    pub id: String,
    pub query: String,
    /// (id, text) in first-stage order.
    pub candidates: Vec<(String, String)>,
}

fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Queries that have at least one relevant judgment, in file order, at most `limit` (0 = all).
pub fn read_queries(
    path: &Path,
    qrels: &Qrels,
    limit: usize,
) -> anyhow::Result<Vec<LabelledQuery>> {
    let mut out = Vec::new();
    for (i, row) in crate::demo::read_jsonl(path)?.into_iter().enumerate() {
        let id = id_of(&row["query_id"])
            .or_else(|| id_of(&row["request_id"]))
            .with_context(|| {
                format!(
                    "{} line {}: no query_id or request_id",
                    path.display(),
                    i + 1
                )
            })?;
        if !qrels.get(&id).is_some_and(|j| j.values().any(|&g| g > 0.0)) {
            continue;
        }
        let candidates = row["candidates"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        (
                            id_of(&c["id"]).unwrap_or_default(),
                            c["text"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(LabelledQuery {
            id,
            query: row["query"].as_str().unwrap_or_default().to_string(),
            candidates,
        });
        if limit > 0 && out.len() == limit {
            break;
        }
    }
    if out.is_empty() {
        bail!(
            "no query in {} has a relevant judgment in the qrels",
            path.display()
        );
    }
    Ok(out)
}

/// nDCG@10 with linear gains (as trec_eval / BEIR); the ideal ranking is over every judged
/// document of the query, retrieved or not.
pub fn ndcg_at_10(ranked: &[&str], judged: &HashMap<String, f64>) -> f64 {
    let dcg: f64 = ranked
        .iter()
        .take(10)
        .enumerate()
        .map(|(i, d)| judged.get(*d).copied().unwrap_or(0.0) / ((i + 2) as f64).log2())
        .sum();
    let mut ideal: Vec<f64> = judged.values().copied().filter(|&g| g > 0.0).collect();
    ideal.sort_by(|a, b| b.total_cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(10)
        .enumerate()
        .map(|(i, g)| g / ((i + 2) as f64).log2())
        .sum();
    if idcg > 0.0 {
        dcg / idcg
    } else {
        0.0
    }
}

pub(super) fn mrr_at_10(ranked: &[&str], judged: &HashMap<String, f64>) -> f64 {
    ranked
        .iter()
        .take(10)
        .position(|d| judged.get(*d).is_some_and(|&g| g > 0.0))
        .map_or(0.0, |i| 1.0 / (i + 1) as f64)
}

pub(super) fn recall_at(ranked: &[&str], judged: &HashMap<String, f64>, n: usize) -> f64 {
    let relevant = judged.values().filter(|&&g| g > 0.0).count();
    let found = ranked
        .iter()
        .take(n)
        .filter(|d| judged.get(**d).is_some_and(|&g| g > 0.0))
        .count();
    if relevant == 0 {
        0.0
    } else {
        found as f64 / relevant as f64
    }
}

pub(super) fn quality(lists: &[(Vec<&str>, &HashMap<String, f64>)], ns: &[usize]) -> Quality {
    let m = lists.len().max(1) as f64;
    Quality {
        ndcg_at_10: lists.iter().map(|(r, j)| ndcg_at_10(r, j)).sum::<f64>() / m,
        mrr_at_10: lists.iter().map(|(r, j)| mrr_at_10(r, j)).sum::<f64>() / m,
        recall_at_n: ns
            .iter()
            .map(|&n| {
                (
                    n,
                    lists.iter().map(|(r, j)| recall_at(r, j, n)).sum::<f64>() / m,
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(pairs: &[(&str, f64)]) -> HashMap<String, f64> {
        pairs.iter().map(|(d, g)| (d.to_string(), *g)).collect()
    }

    #[test]
    fn ndcg_counts_relevant_documents_that_were_not_retrieved() {
        let j = judged(&[("a", 1.0), ("b", 1.0)]);
        assert!((ndcg_at_10(&["a", "b"], &j) - 1.0).abs() < 1e-12);
        // Only one of two relevant documents retrieved, at rank 2.
        let want = (1.0 / 3f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!((ndcg_at_10(&["x", "a"], &j) - want).abs() < 1e-12);
        assert_eq!(mrr_at_10(&["x", "a"], &j), 0.5);
        assert_eq!(recall_at(&["x", "a"], &j, 1), 0.0);
        assert_eq!(recall_at(&["x", "a"], &j, 2), 0.5);
    }

    #[test]
    fn qrels_skip_the_header_and_reject_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.tsv");
        std::fs::write(&p, "query-id\tcorpus-id\tscore\n1\td1\t1\n1\td2\t0\n").unwrap();
        let q = read_qrels(&p).unwrap();
        assert_eq!(q["1"].len(), 2);
        std::fs::write(&p, "query-id\tcorpus-id\tscore\n1 d1 1\n").unwrap();
        assert!(read_qrels(&p).is_err());
    }
}
