//! The queue's claim order in memory, for queue positions: SQLite's store mirrors it commit by
//! commit; PostgreSQL's builds it from a snapshot of the queued rows after each change it hears of.

use std::collections::{HashMap, VecDeque};

/// The queue as the claim sees it, mirrored in memory (changed only under the writer lock, after a
/// commit), so a job's position is found without a count over the queue: each stream's queued seqs
/// in order, and each stream's turn (`stream_turns.served`, 0 for never served).
///
/// [`Store::claim_next`] takes the head of the stream with the smallest (turn, head seq) and gives
/// that stream the newest turn, so while nothing is submitted the claims go round: in round `k`,
/// every stream with more than `k` queued jobs gives its `k`-th job, streams in (turn, head) order.
/// A job's position follows from that in one pass over the streams that have queued jobs.
#[derive(Debug, Default)]
pub(crate) struct QueueIndex {
    waiting: HashMap<String, VecDeque<i64>>,
    turns: HashMap<String, i64>,
    pub(crate) len: usize,
}

impl QueueIndex {
    fn turn(&self, stream: &str) -> i64 {
        self.turns.get(stream).copied().unwrap_or(0)
    }

    /// 1-based place of queued job `seq` of `stream` in the claim order (0 if it is not queued).
    pub(crate) fn position(&self, stream: &str, seq: i64) -> u64 {
        let Some(own) = self.waiting.get(stream) else { return 0 };
        let round = own.partition_point(|&s| s < seq);
        if own.get(round) != Some(&seq) {
            return 0;
        }
        let own_order = (self.turn(stream), own[0]);
        let mut ahead = 0;
        for (other, seqs) in &self.waiting {
            // Every stream gives one job per earlier round while it has one...
            ahead += seqs.len().min(round);
            // ...and in this round, the streams ordered before this one give theirs first.
            if other != stream && seqs.len() > round && (self.turn(other), seqs[0]) < own_order {
                ahead += 1;
            }
        }
        ahead as u64 + 1
    }

    pub(crate) fn apply(&mut self, delta: QueueDelta) {
        for change in delta.changes {
            match change {
                Change::Queued(seq, stream, queued) => {
                    let seqs = self.waiting.entry(stream.clone()).or_default();
                    let at = seqs.partition_point(|&s| s < seq);
                    let present = seqs.get(at) == Some(&seq);
                    match (queued, present) {
                        (true, false) => {
                            seqs.insert(at, seq);
                            self.len += 1;
                        }
                        (false, true) => {
                            seqs.remove(at);
                            self.len -= 1;
                        }
                        _ => {}
                    }
                    if seqs.is_empty() {
                        self.waiting.remove(&stream);
                    }
                }
                Change::Served(stream, turn) => {
                    self.turns.insert(stream, turn);
                }
                Change::Forgot(stream) => {
                    self.turns.remove(&stream);
                }
            }
        }
    }
}

#[derive(Debug)]
enum Change {
    /// `(seq, stream, now queued?)`.
    Queued(i64, String, bool),
    /// The stream's new turn.
    Served(String, i64),
    /// The stream's turn was forgotten (it counts as never served).
    Forgot(String),
}

/// What one write transaction did to the queue, in order.
#[derive(Debug, Default)]
pub(crate) struct QueueDelta {
    changes: Vec<Change>,
}

impl QueueDelta {
    pub(crate) fn added(&mut self, seq: i64, stream: &str) {
        self.changes.push(Change::Queued(seq, stream.to_owned(), true));
    }

    pub(crate) fn removed(&mut self, seq: i64, stream: &str) {
        self.changes.push(Change::Queued(seq, stream.to_owned(), false));
    }

    pub(crate) fn served(&mut self, stream: String, turn: i64) {
        self.changes.push(Change::Served(stream, turn));
    }

    pub(crate) fn forgot(&mut self, stream: String) {
        self.changes.push(Change::Forgot(stream));
    }
}
