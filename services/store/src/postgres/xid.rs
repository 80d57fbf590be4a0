//! PostgreSQL transaction snapshots (`pg_current_snapshot()`), the basis of
//! the gap-safe tail.
//!
//! Why a missing position can be resolved with snapshots: an appending
//! transaction obtains its transaction id before it allocates positions
//! (`append_batch` calls `pg_current_xact_id()` first) and positions are
//! handed out in call order. So if a reader's snapshot S1 sees the event at
//! position r but not position p < r, the transaction holding p had its id
//! before r was committed, hence before S1: it was either still running at S1
//! (its id is in S1's in-progress list) or it rolled back. Once every
//! transaction in S1's in-progress list has finished, a read shows every
//! committed event up to r, and whatever is still missing below r never
//! comes.

/// A parsed `pg_snapshot` (`xmin:xmax:xip,...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct XidSnapshot {
    pub(crate) xmin: u64,
    pub(crate) xmax: u64,
    pub(crate) in_progress: Vec<u64>,
}

impl XidSnapshot {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let list = parts.next()?;
        let in_progress = if list.is_empty() {
            Vec::new()
        } else {
            list.split(',').map(str::parse).collect::<Result<_, _>>().ok()?
        };
        Some(Self { xmin, xmax, in_progress })
    }

    /// Whether transaction `xid` had finished (committed or aborted) when
    /// this snapshot was taken.
    pub(crate) fn finished(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.in_progress.contains(&xid))
    }
}

/// Missing positions up to `upto` seen under a snapshot whose in-progress
/// transactions were `waiting_for`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingGap {
    pub(crate) upto: u64,
    pub(crate) waiting_for: Vec<u64>,
}

impl PendingGap {
    /// Whether, under `now`, every missing position up to `upto` is final.
    pub(crate) fn resolved_by(&self, now: &XidSnapshot) -> bool {
        self.waiting_for.iter().all(|&xid| now.finished(xid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snapshots() {
        assert_eq!(
            XidSnapshot::parse("10:15:10,12"),
            Some(XidSnapshot { xmin: 10, xmax: 15, in_progress: vec![10, 12] })
        );
        assert_eq!(XidSnapshot::parse("7:7:"), Some(XidSnapshot { xmin: 7, xmax: 7, in_progress: vec![] }));
        assert_eq!(XidSnapshot::parse("nonsense"), None);
    }

    #[test]
    fn a_gap_resolves_when_its_transactions_finish() {
        let s1 = XidSnapshot::parse("10:15:10,12").unwrap();
        let gap = PendingGap { upto: 40, waiting_for: s1.in_progress.clone() };
        assert!(!gap.resolved_by(&s1));
        assert!(!gap.resolved_by(&XidSnapshot::parse("12:16:12").unwrap()));
        assert!(gap.resolved_by(&XidSnapshot::parse("13:16:13").unwrap()));
        assert!(gap.resolved_by(&XidSnapshot::parse("11:16:11").unwrap()));
        let empty = PendingGap { upto: 3, waiting_for: vec![] };
        assert!(empty.resolved_by(&s1));
    }
}
