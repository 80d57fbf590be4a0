//! PostgreSQL transaction snapshots (`pg_current_snapshot()`), the basis of
//! the gap-safe tail.
//!
//! Why a missing position can be resolved: an appending transaction obtains
//! its transaction id before it allocates positions (the batch's first
//! statement, which locks its stream rows, calls `pg_current_xact_id()`;
//! see `append.rs`) and positions are handed out in call order.
//! So if a reader's snapshot S1 sees the event at position r but not position
//! p < r, the transaction holding p had its id before r was committed, hence
//! before S1 was taken: it was still running at S1 or it rolled back. A
//! snapshot does not list every such transaction (its `xmax` is the latest
//! *completed* id + 1, and running transactions above it are not listed), so
//! the reader bounds them instead: right after S1 it takes a transaction id N
//! of its own, which is larger than every id assigned before S1. Once a later
//! snapshot's `xmin` is at least N, every transaction that could hold p has
//! finished, and a read under that snapshot shows every committed event up
//! to r: whatever is still missing below r never comes.
//!
//! A gap is a property of the log, not of one reader, so the bounds are
//! kept in one [`GapBook`] per log and outlive a read: each missing
//! position is bounded once, by the first read that meets it. Taking a new
//! bound on every read instead would never resolve a permanent hole (a
//! rolled-back append) while transactions keep overlapping, e.g. readers
//! that hold a transaction id of their own around the read.

/// A parsed `pg_snapshot` (`xmin:xmax:xip,...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct XidSnapshot {
    pub(crate) xmin: u64,
    pub(crate) xmax: u64,
}

impl XidSnapshot {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        // The in-progress list is not needed: it omits running transactions
        // above `xmax`, so gaps are resolved by `xmin` alone.
        parts.next()?;
        Some(Self { xmin, xmax })
    }
}

/// Missing positions up to `upto`, final once every transaction id below
/// `bound` has finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingGap {
    pub(crate) upto: u64,
    pub(crate) bound: u64,
}

impl PendingGap {
    /// Whether, under `now`, every missing position up to `upto` is final.
    pub(crate) fn resolved_by(&self, now: &XidSnapshot) -> bool {
        now.xmin >= self.bound
    }
}

/// The gaps of one log: the position up to which every missing position is
/// known final, and the pending bounds of the later ones.
#[derive(Debug, Default)]
pub(crate) struct GapBook {
    final_upto: u64,
    pending: Vec<PendingGap>,
}

/// Pending gaps kept at most; a read past them bounds its gap anew.
const MAX_PENDING: usize = 64;

impl GapBook {
    /// Up to where missing positions are final under `now`, taking in the
    /// gaps that `now` resolves.
    pub(crate) fn final_upto(&mut self, now: &XidSnapshot) -> u64 {
        let resolved = self.pending.iter().filter(|g| g.resolved_by(now)).map(|g| g.upto).max();
        if let Some(upto) = resolved {
            self.final_upto = self.final_upto.max(upto);
        }
        let final_upto = self.final_upto;
        self.pending.retain(|g| !g.resolved_by(now) && g.upto > final_upto);
        self.final_upto
    }

    /// Whether missing position `position` already has a bound.
    pub(crate) fn covers(&self, position: u64) -> bool {
        position <= self.final_upto || self.pending.iter().any(|g| g.upto >= position)
    }

    /// Records a new bound.
    pub(crate) fn add(&mut self, gap: PendingGap) {
        if self.pending.len() >= MAX_PENDING {
            // The bound of the latest gap is the one that resolves last.
            self.pending.remove(0);
        }
        self.pending.push(gap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snapshots() {
        assert_eq!(XidSnapshot::parse("10:15:10,12"), Some(XidSnapshot { xmin: 10, xmax: 15 }));
        assert_eq!(XidSnapshot::parse("7:7:"), Some(XidSnapshot { xmin: 7, xmax: 7 }));
        assert_eq!(XidSnapshot::parse("nonsense"), None);
    }

    #[test]
    fn a_gap_resolves_when_every_older_transaction_finished() {
        let gap = PendingGap { upto: 40, bound: 20 };
        // A transaction below the bound is still running (listed or not).
        assert!(!gap.resolved_by(&XidSnapshot::parse("12:16:12").unwrap()));
        assert!(!gap.resolved_by(&XidSnapshot::parse("19:19:").unwrap()));
        assert!(gap.resolved_by(&XidSnapshot::parse("20:25:21").unwrap()));
        assert!(gap.resolved_by(&XidSnapshot::parse("26:26:").unwrap()));
    }

    #[test]
    fn a_gap_book_keeps_the_first_bound_of_a_gap_until_it_resolves() {
        let mut book = GapBook::default();
        let busy = XidSnapshot::parse("15:30:15").unwrap();
        assert_eq!(book.final_upto(&busy), 0);
        assert!(!book.covers(10));
        book.add(PendingGap { upto: 40, bound: 20 });
        assert!(book.covers(10) && book.covers(40) && !book.covers(41));
        // Later reads meet the same hole: it keeps its first bound, and a
        // later gap gets its own.
        book.add(PendingGap { upto: 60, bound: 35 });
        assert_eq!(book.final_upto(&busy), 0);
        assert_eq!(book.final_upto(&XidSnapshot::parse("25:30:25").unwrap()), 40);
        assert!(book.covers(40) && book.covers(55));
        // Final is final: an older snapshot cannot take it back.
        assert_eq!(book.final_upto(&busy), 40);
        assert_eq!(book.final_upto(&XidSnapshot::parse("36:40:").unwrap()), 60);
        assert!(!book.covers(61));
    }
}
