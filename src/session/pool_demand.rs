//! How many kernels each language's pool should keep ready: a target that follows recent creates, between
//! the language's floor and ceiling from configuration, within one memory budget for every idle pooled
//! kernel together, and back to the floor after a quiet spell.
//!
//! The rule, per language: keep as many ready as the busiest [`RATE_WINDOW`] of the last `quiet` asked
//! for. A burst like the last one is then served from the pool whole, while the pool's boots (a fraction
//! of a second to a few seconds each) refill it for the next; a steady rate `r` keeps `10 r` ready, far
//! more than the `r × boot time` a refill needs, so the ceiling and the budget are what bound it. Pure:
//! the caller records the creates and asks at a given instant.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::config::PoolBounds as Bounds;

/// The window a peak rate is measured over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Creates remembered per language (a burst beyond it is counted as this many).
const MAX_REMEMBERED: usize = 4096;

/// The creates the targets follow.
#[derive(Debug, Default)]
pub struct Demand {
    creates: HashMap<String, VecDeque<Instant>>,
}

impl Demand {
    /// A create of `language` that a pooled kernel could have served (whether or not one did).
    pub fn record_create(&mut self, language: &str, at: Instant) {
        let times = self.creates.entry(language.to_owned()).or_default();
        if times.len() == MAX_REMEMBERED {
            times.pop_front();
        }
        times.push_back(at);
    }

    /// Forgets creates older than `quiet` before `now`.
    fn forget(&mut self, now: Instant, quiet: Duration) {
        for times in self.creates.values_mut() {
            while times.front().is_some_and(|t| now.saturating_duration_since(*t) > quiet) {
                times.pop_front();
            }
        }
    }

    /// Each language's target at `now`: `bounds` per language, `cost_mb` of memory per pooled kernel
    /// of a language, at most `budget_mb` for all of them together; what was asked for in the last
    /// `quiet`.
    pub fn targets(
        &mut self,
        bounds: &BTreeMap<String, Bounds>,
        cost_mb: impl Fn(&str) -> u64,
        budget_mb: u64,
        quiet: Duration,
        now: Instant,
    ) -> BTreeMap<String, usize> {
        self.forget(now, quiet);
        let wanted: BTreeMap<&str, usize> = bounds
            .iter()
            .map(|(language, b)| {
                let peak = self.creates.get(language).map_or(0, |t| busiest_window(t, RATE_WINDOW));
                (language.as_str(), peak.clamp(b.floor, b.ceiling.max(b.floor)))
            })
            .collect();
        fit_budget(bounds, &wanted, cost_mb, budget_mb)
    }
}

/// The most of `times` (in order) within any span of `window`.
pub fn busiest_window(times: &VecDeque<Instant>, window: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end].saturating_duration_since(times[start]) >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// The targets within the budget: every floor first, then what is wanted above the floors one kernel at a
/// time, to the language that lacks the most first, while it fits.
fn fit_budget(
    bounds: &BTreeMap<String, Bounds>,
    wanted: &BTreeMap<&str, usize>,
    cost_mb: impl Fn(&str) -> u64,
    budget_mb: u64,
) -> BTreeMap<String, usize> {
    let mut targets: BTreeMap<String, usize> = BTreeMap::new();
    let mut spent = 0u64;
    for (language, b) in bounds {
        // Floors were checked against the budget at start; a floor that does not fit still gets what does.
        let mut n = 0;
        while n < b.floor && spent + cost_mb(language) <= budget_mb {
            spent += cost_mb(language);
            n += 1;
        }
        targets.insert(language.clone(), n);
    }
    loop {
        let lacking = wanted
            .iter()
            .map(|(language, want)| (*language, want.saturating_sub(targets[*language])))
            .filter(|(language, lack)| *lack > 0 && spent + cost_mb(language) <= budget_mb)
            .max_by_key(|(language, lack)| (*lack, std::cmp::Reverse(*language)));
        let Some((language, _)) = lacking else { break };
        spent += cost_mb(language);
        *targets.get_mut(language).expect("every wanted language has bounds") += 1;
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(list: &[(&str, usize, usize)]) -> BTreeMap<String, Bounds> {
        list.iter().map(|(l, floor, ceiling)| (l.to_string(), Bounds { floor: *floor, ceiling: *ceiling })).collect()
    }

    #[test]
    fn the_busiest_window_counts_the_densest_run_of_creates() {
        let t0 = Instant::now();
        let at = |s: &[u64]| s.iter().map(|ms| t0 + Duration::from_millis(*ms)).collect::<VecDeque<_>>();
        assert_eq!(busiest_window(&at(&[]), RATE_WINDOW), 0);
        assert_eq!(busiest_window(&at(&[0, 20_000, 40_000]), RATE_WINDOW), 1);
        assert_eq!(busiest_window(&at(&[0, 1_000, 2_000, 30_000, 30_100]), RATE_WINDOW), 3);
        assert_eq!(busiest_window(&at(&[0, 9_999, 10_000]), RATE_WINDOW), 2, "a window is 10 s wide, not 10 s + 1 ms");
    }

    #[test]
    fn a_target_rises_under_a_burst_up_to_its_ceiling_and_falls_back_to_its_floor_after_a_quiet_spell() {
        let b = bounds(&[("python", 2, 8)]);
        let quiet = Duration::from_secs(60);
        let mut demand = Demand::default();
        let t0 = Instant::now();
        assert_eq!(demand.targets(&b, |_| 512, 100_000, quiet, t0)["python"], 2, "the floor with no demand");
        for i in 0..5 {
            demand.record_create("python", t0 + Duration::from_millis(500 * i));
        }
        let t = t0 + Duration::from_secs(10);
        assert_eq!(demand.targets(&b, |_| 512, 100_000, quiet, t)["python"], 5, "the busiest 10 s asked for 5");
        // Ten a second: capped at the ceiling.
        for i in 0..100 {
            demand.record_create("python", t + Duration::from_millis(100 * i));
        }
        let t = t + Duration::from_secs(10);
        assert_eq!(demand.targets(&b, |_| 512, 100_000, quiet, t)["python"], 8);
        // Held through the quiet spell, then back to the floor.
        assert_eq!(demand.targets(&b, |_| 512, 100_000, quiet, t + Duration::from_secs(30))["python"], 8);
        assert_eq!(demand.targets(&b, |_| 512, 100_000, quiet, t + Duration::from_secs(61))["python"], 2);
    }

    #[test]
    fn the_memory_budget_keeps_floors_first_and_shares_the_rest_by_what_each_lacks() {
        let b = bounds(&[("java", 0, 6), ("python", 2, 10)]);
        let mut demand = Demand::default();
        let t0 = Instant::now();
        for i in 0..50 {
            demand.record_create("python", t0 + Duration::from_millis(200 * i));
            demand.record_create("java", t0 + Duration::from_millis(200 * i));
        }
        let t = t0 + Duration::from_secs(10);
        let quiet = Duration::from_secs(60);
        // Unbounded: each wants its ceiling.
        let all = demand.targets(&b, |_| 512, 1 << 30, quiet, t);
        assert_eq!((all["python"], all["java"]), (10, 6));
        // 4 GiB for all: 8 kernels of 512 MiB; python's floor of 2 first, the other 6 where they lack most.
        let fitted = demand.targets(&b, |_| 512, 4096, quiet, t);
        assert_eq!((fitted["python"], fitted["java"]), (6, 2), "{fitted:?}");
        // A budget smaller than the floors: what fits.
        let tight = demand.targets(&b, |_| 512, 600, quiet, t);
        assert_eq!((tight["python"], tight["java"]), (1, 0));
    }
}
