//! Counters tagged with their window: one key per counter whose value carries the window it
//! counts (`window × 2^bits + count`), so a new window reuses the key instead of adding one and
//! the number of keys stays bounded without a TTL. Quotas (per minute, per day), budgets (per
//! day, per month) and AIMD leases (per lease period) all count this way.
//!
//! A value tagged with an earlier window counts as zero. The first increment of a new window
//! lands on the old value and replaces it with a compare-and-swap ([`perform`]); every increment
//! is counted exactly once in its window, across any number of concurrent instances.

use crate::kv::{self, decode_counter, Kv, KvError, KvOp, KvResult};

/// Where the count ends and the window tag begins in a stored i64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bits that hold the count; the bits above (up to bit 62) hold the window.
    pub count_bits: u32,
}

impl Layout {
    const fn mask(self) -> u64 {
        (1 << self.count_bits) - 1
    }

    /// The largest window a tag holds.
    pub const fn max_window(self) -> u64 {
        (1 << (63 - self.count_bits)) - 1
    }

    /// A stored value: `window × 2^bits + count` (non-negative; a count past 2^bits would spill
    /// into the tag, so layouts are chosen with room to spare).
    pub fn encode(self, window: u64, count: u64) -> i64 {
        ((window.min(self.max_window()) << self.count_bits) | (count & self.mask())) as i64
    }

    /// (window, count) of a stored value; `None` for a negative value (never written by us).
    pub fn decode(self, value: i64) -> Option<(u64, u64)> {
        let v = u64::try_from(value).ok()?;
        Some((v >> self.count_bits, v & self.mask()))
    }

    /// The count a stored value holds for `window`: zero when absent, unreadable or from an
    /// earlier window.
    pub fn count_in(self, window: u64, stored: Option<&[u8]>) -> u64 {
        match stored.and_then(decode_counter).and_then(|v| self.decode(v)) {
            Some((tag, count)) if tag >= window.min(self.max_window()) => count,
            _ => 0,
        }
    }

    /// The window tag of a stored value.
    pub fn tag(self, stored: &[u8]) -> Option<u64> {
        decode_counter(stored)
            .and_then(|v| self.decode(v))
            .map(|(t, _)| t)
    }
}

/// One increment of a windowed counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Windowed {
    pub key: String,
    pub delta: i64,
    pub window: u64,
    pub layout: Layout,
}

impl Windowed {
    /// The count in this window from the value `Kv::increment` returned; `None` when the
    /// increment landed on an earlier window's value (or on garbage). A later tag is a window
    /// another instance already started (its clock a few ms ahead): counting into it is
    /// conservative and keeps the counter monotonic.
    pub fn settle(&self, new_value: i64) -> Option<u64> {
        let (tag, count) = self.layout.decode(new_value)?;
        (tag >= self.window.min(self.layout.max_window())).then_some(count)
    }

    /// Starts this increment's window: writes `window × 2^bits + 0` unless the stored tag is
    /// already this window or a later one, so only a stale value is ever cleared, once per
    /// window however many instances race to do it.
    pub fn reset(&self) -> KvOp {
        KvOp::CounterMax {
            key: self.key.clone(),
            value: self.layout.encode(self.window, 0),
            rank: match self.layout.count_bits {
                QUOTA_BITS => rank_quota,
                MONEY_BITS => rank_money,
                _ => rank_lease,
            },
        }
    }
}

/// Count bits of quota counters (requests and tokens; windows are minutes or days).
pub const QUOTA_BITS: u32 = 36;
/// Count bits of money counters (micro-dollars, up to $70 million per window; windows are days
/// or months).
pub const MONEY_BITS: u32 = 46;
/// Count bits of lease counters (requests in flight; windows are lease periods).
pub const LEASE_BITS: u32 = 24;

pub const QUOTA: Layout = Layout {
    count_bits: QUOTA_BITS,
};
pub const MONEY: Layout = Layout {
    count_bits: MONEY_BITS,
};
pub const LEASE: Layout = Layout {
    count_bits: LEASE_BITS,
};

fn rank_quota(v: i64) -> Option<u64> {
    QUOTA.decode(v).map(|(t, _)| t)
}
fn rank_money(v: i64) -> Option<u64> {
    MONEY.decode(v).map(|(t, _)| t)
}
fn rank_lease(v: i64) -> Option<u64> {
    LEASE.decode(v).map(|(t, _)| t)
}

/// Performs one increment and returns the count in its window, this increment included:
/// `Kv::increment`, and if it landed on an earlier window's value (the first increment of a
/// window, or the first ever: an absent counter reads as window 0), [`Windowed::reset`] starts
/// the window and the increment is made again.
///
/// Exact under concurrency: a value tagged with an earlier window is only ever replaced as a
/// whole, and only by `window × 2^bits + 0` (the reset writes only over an older tag, by
/// compare-and-swap). Every increment that landed on the stale value was told so and repeats
/// itself after the window has started, and none that landed on the current window's value is
/// ever wiped. The reset is idempotent — a value ranked by its tag only ever moves up — so it
/// stays exact on a store whose compare-and-swap misreports its outcome (Spin's Redis store
/// reports every swap as failed, written or not: see `components/gateway/src/kv.rs`), where a
/// "swap from exactly the value my increment returned" could neither be trusted nor retried.
pub fn perform(kv: &(impl Kv + ?Sized), inc: &Windowed) -> KvResult<u64> {
    if let Some(c) = inc.settle(kv.increment(&inc.key, inc.delta)?) {
        return Ok(c);
    }
    kv::apply(kv, &inc.reset())?;
    inc.settle(kv.increment(&inc.key, inc.delta)?)
        .ok_or_else(|| KvError(format!("{}: still an earlier window after reset", inc.key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;

    fn inc(window: u64, delta: i64) -> Windowed {
        Windowed {
            key: "c".into(),
            delta,
            window,
            layout: MONEY,
        }
    }

    #[test]
    fn layouts_round_trip_and_clamp() {
        for l in [QUOTA, MONEY, LEASE] {
            let v = l.encode(20_000, 12_345);
            assert_eq!(l.decode(v), Some((20_000, 12_345)));
            assert_eq!(
                l.decode(l.encode(l.max_window() + 9, 1)),
                Some((l.max_window(), 1))
            );
            assert_eq!(l.decode(-1), None);
        }
        // Money: a month of spend in micro-dollars far beyond any budget fits.
        assert_eq!(
            MONEY.decode(MONEY.encode(700, 50_000_000_000_000)),
            Some((700, 50_000_000_000_000))
        );
    }

    /// Both stores' encodings: a window starts, counts, and the next window starts again, with
    /// the counter kept in the store's own encoding (so its `increment` keeps working).
    #[test]
    fn windows_start_in_either_encoding() {
        for (kv, decimal) in [(MemKv::default(), false), (MemKv::redis_like(), true)] {
            assert_eq!(perform(&kv, &inc(5, 7)).unwrap(), 7);
            assert_eq!(perform(&kv, &inc(5, 3)).unwrap(), 10);
            assert_eq!(perform(&kv, &inc(6, 2)).unwrap(), 2);
            assert_eq!(perform(&kv, &inc(6, 1)).unwrap(), 3);
            let raw = kv.get("c").unwrap().unwrap();
            assert_eq!(decode_counter(&raw), Some(MONEY.encode(6, 3)));
            assert_eq!(raw.iter().all(u8::is_ascii_digit), decimal, "{raw:?}");
            assert_eq!(MONEY.count_in(6, Some(&raw)), 3);
            assert_eq!(MONEY.count_in(7, Some(&raw)), 0);
        }
    }

    #[test]
    fn concurrent_increments_across_a_window_change_are_each_counted_once() {
        for redis in [false, true] {
            let kv = std::sync::Arc::new(if redis {
                MemKv::redis_like()
            } else {
                MemKv::default()
            });
            perform(&*kv, &inc(1, 100)).unwrap();
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let kv = kv.clone();
                    std::thread::spawn(move || {
                        for _ in 0..100 {
                            perform(&*kv, &inc(2, 1)).unwrap();
                        }
                    })
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
            let raw = kv.get("c").unwrap().unwrap();
            assert_eq!(MONEY.count_in(2, Some(&raw)), 800);
        }
    }
}
