//! Failure isolation for one batch: retry what may be transient, then split the batch until the
//! rows that fail on their own are found, so one poisoned pair does not take down the events of
//! every other pair it happened to share a batch with.

use std::time::Duration;

use super::{InferError, Score, TensorBatch};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Whole-batch retries after the first failure, before splitting.
    pub max_retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub backoff: Duration,
}

/// What scoring one batch came to: a score or an error for every row.
#[derive(Debug)]
pub struct Isolated {
    pub rows: Vec<Result<Score, InferError>>,
    /// Whole-batch retries spent.
    pub retries: u32,
    /// Session runs on parts of the batch while splitting it.
    pub split_runs: u32,
    /// A failure looked like an allocation failure on the device (or host): the batch was too big.
    pub out_of_memory: bool,
}

impl Isolated {
    pub fn failed_rows(&self) -> usize {
        self.rows.iter().filter(|r| r.is_err()).count()
    }
}

/// ONNX Runtime reports allocation failures as plain error text: the CUDA provider's BFC arena
/// ("Failed to allocate memory", "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"), the CPU allocator
/// (`bad_alloc`).
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "out of memory",
        "failed to allocate",
        "bad_alloc",
        "out_of_memory",
    ]
    .iter()
    .any(|s| m.contains(s))
}

/// Scores `t` with `score`. A failure of the whole batch is retried up to `policy.max_retries`
/// times with doubling backoff (not when it is an allocation failure: the same batch would fail
/// the same way); if it still fails, the batch is halved recursively, each part scored once, so a
/// row fails only when it fails alone. Costs about 2·log2(rows) extra runs per bad row.
pub fn score_isolating(
    score: &mut dyn FnMut(&TensorBatch) -> anyhow::Result<Vec<Score>>,
    t: &TensorBatch,
    policy: RetryPolicy,
    sleep: &mut dyn FnMut(Duration),
) -> Isolated {
    let mut out = Isolated {
        rows: Vec::new(),
        retries: 0,
        split_runs: 0,
        out_of_memory: false,
    };
    let mut last = match score(t) {
        Ok(s) => {
            out.rows = s.into_iter().map(Ok).collect();
            return out;
        }
        Err(e) => e.to_string(),
    };
    out.out_of_memory = is_out_of_memory(&last);
    if !out.out_of_memory {
        let mut wait = policy.backoff;
        while out.retries < policy.max_retries {
            sleep(wait);
            wait = wait.saturating_mul(2);
            out.retries += 1;
            match score(t) {
                Ok(s) => {
                    out.rows = s.into_iter().map(Ok).collect();
                    return out;
                }
                Err(e) => last = e.to_string(),
            }
        }
    }
    out.rows = vec![Err(InferError::Run(last.clone())); t.rows];
    if t.rows > 1 {
        split(score, t, 0, t.rows, &mut out);
    }
    out
}

/// Rows `lo..hi` are known to fail together: score each half on its own.
fn split(
    score: &mut dyn FnMut(&TensorBatch) -> anyhow::Result<Vec<Score>>,
    t: &TensorBatch,
    lo: usize,
    hi: usize,
    out: &mut Isolated,
) {
    let mid = lo + (hi - lo) / 2;
    for (a, b) in [(lo, mid), (mid, hi)] {
        out.split_runs += 1;
        match score(&t.rows_range(a, b)) {
            Ok(s) => {
                for (slot, s) in out.rows[a..b].iter_mut().zip(s) {
                    *slot = Ok(s);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                out.out_of_memory |= is_out_of_memory(&msg);
                if b - a == 1 {
                    out.rows[a] = Err(InferError::Run(msg));
                } else {
                    split(score, t, a, b, out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch whose row `r` holds the single token id `r + 10` (rows of different lengths).
    fn batch(rows: usize) -> TensorBatch {
        let pairs: Vec<crate::tokenize::EncodedPair> = (0..rows)
            .map(|r| crate::tokenize::EncodedPair {
                ids: vec![r as u32 + 10; 1 + r % 3],
                type_ids: vec![0; 1 + r % 3],
                truncated: false,
            })
            .collect();
        TensorBatch::from_pairs(pairs.iter(), 0)
    }

    /// Fails any run that holds a row starting with one of `poison`; scores a row by its id.
    fn scorer(
        poison: Vec<i64>,
        runs: &mut Vec<usize>,
    ) -> impl FnMut(&TensorBatch) -> anyhow::Result<Vec<Score>> + '_ {
        move |t| {
            runs.push(t.rows);
            let firsts: Vec<i64> = (0..t.rows).map(|r| t.input_ids[r * t.seq_len]).collect();
            // A part is re-padded to its own longest row.
            let longest = (0..t.rows)
                .map(|r| {
                    t.attention_mask[r * t.seq_len..(r + 1) * t.seq_len]
                        .iter()
                        .sum::<i64>()
                })
                .max()
                .unwrap_or(0);
            assert_eq!(longest as usize, t.seq_len);
            if let Some(p) = firsts.iter().find(|f| poison.contains(f)) {
                anyhow::bail!("poisoned token {p}");
            }
            Ok(firsts
                .iter()
                .map(|&f| Score {
                    logit: f as f32,
                    relevance: 0.5,
                })
                .collect())
        }
    }

    fn policy(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            backoff: Duration::from_millis(5),
        }
    }

    #[test]
    fn only_the_rows_that_fail_alone_fail() {
        let t = batch(32);
        let mut runs = Vec::new();
        let mut sleeps = Vec::new();
        let out = score_isolating(
            &mut scorer(vec![10 + 7, 10 + 20], &mut runs),
            &t,
            policy(2),
            &mut |d| sleeps.push(d),
        );
        for (r, row) in out.rows.iter().enumerate() {
            match row {
                Ok(s) => assert_eq!(s.logit, (r + 10) as f32),
                Err(e) => {
                    assert!([7, 20].contains(&r), "row {r} failed: {e}");
                    assert!(e.to_string().contains("poisoned token"), "{e}");
                }
            }
        }
        assert_eq!(out.failed_rows(), 2);
        assert_eq!(out.retries, 2);
        assert_eq!(
            sleeps,
            [Duration::from_millis(5), Duration::from_millis(10)]
        );
        // 1 + 2 retries, then at most 2 runs per level for each bad row.
        assert!(out.split_runs <= 2 * 2 * 5, "{}", out.split_runs);
        assert!(!out.out_of_memory);
    }

    #[test]
    fn a_transient_failure_is_retried_without_splitting() {
        let t = batch(4);
        let mut calls = 0;
        let mut flaky = |t: &TensorBatch| {
            calls += 1;
            if calls == 1 {
                anyhow::bail!("transient");
            }
            Ok(vec![
                Score {
                    logit: 1.0,
                    relevance: 0.7
                };
                t.rows
            ])
        };
        let out = score_isolating(&mut flaky, &t, policy(1), &mut |_| {});
        assert!(out.rows.iter().all(|r| r.is_ok()));
        assert_eq!((out.retries, out.split_runs), (1, 0));
    }

    #[test]
    fn an_allocation_failure_splits_at_once_and_is_flagged() {
        let t = batch(8);
        let mut too_big = |t: &TensorBatch| {
            if t.rows > 2 {
                anyhow::bail!("Failed to allocate memory for requested buffer of size 123");
            }
            Ok(vec![
                Score {
                    logit: 0.0,
                    relevance: 0.5
                };
                t.rows
            ])
        };
        let out = score_isolating(&mut too_big, &t, policy(3), &mut |_| panic!("no retry"));
        assert!(out.out_of_memory);
        assert_eq!(out.retries, 0);
        assert_eq!(out.failed_rows(), 0);
    }

    #[test]
    fn a_batch_that_fails_everywhere_fails_every_row() {
        let t = batch(5);
        let mut broken = |_: &TensorBatch| -> anyhow::Result<Vec<Score>> { anyhow::bail!("gone") };
        let out = score_isolating(&mut broken, &t, policy(0), &mut |_| {});
        assert_eq!(out.failed_rows(), 5);
    }

    #[test]
    fn recognises_allocation_failures() {
        assert!(is_out_of_memory(
            "CUDA failure 2: out of memory ; GPU=0 ; hostname=x"
        ));
        assert!(is_out_of_memory("std::bad_alloc"));
        assert!(!is_out_of_memory(
            "indices element out of data bounds, idx=1 must be within the inclusive range [-1,0]"
        ));
    }
}
