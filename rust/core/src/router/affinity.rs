//! `prefix_affinity`: consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam,
//! 2018) over the eligible workers, keyed by the request's prefix (`prefix`), so that requests
//! sharing a prompt prefix meet the KV blocks it left on a worker, and every gateway replica
//! makes the same choice with no state shared between them.
//!
//! The ring holds `VNODES` points per worker, placed by a hash of the worker's URL (not its place
//! in the configuration, so replicas configured in another order agree). A request walks the ring
//! clockwise from its key's hash, over the eligible workers only: the first is its home. The home
//! takes it unless its load (as `score` weighs it: the gateway's requests in flight there or the
//! worker's own running and waiting, whichever is larger) is at the bound
//! `max(ceil(c × (total load + 1) / workers), floor)`, or it is saturated (vLLM queues requests or
//! its KV cache is 95% full); then the request spills to the next worker on the walk that is
//! neither. Some worker is always under the bound (c ≥ 1); when every such worker is saturated,
//! the first of them on the walk takes it. Removing a worker moves only the keys it held.
//!
//! The ring names workers by id (`Worker::id`) and is built anew whenever the set of workers
//! changes (`set_workers`); until then a worker off the ring is skipped, and a request with no
//! worker on it goes by least load.
//!
//! The floor is ours, not the paper's: with few requests in flight the paper's bound is tight
//! (two workers, three requests in flight: a home holding all three spills the fourth), and a
//! spilled request computes its whole prefix again on a worker that then caches it in another
//! conversation's place, while a vLLM worker with a handful of requests in its batch is nowhere
//! near full. Below the floor only saturation spills.
//!
//! It does not learn where prefixes actually are (no radix tree of what each worker cached): the
//! hash decides, and the bound keeps a hot prefix from piling onto one worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::policy::{Candidate, Features, LeastLoad, RoutingPolicy, score};
use super::prefix::DEFAULT_BLOCK_TOKENS;
use super::worker::{Worker, WorkerId};

/// Points per worker on the ring: enough that two workers split the keys within a few percent.
const VNODES: u64 = 160;

/// The ring: each worker's points, by hash.
#[derive(Debug)]
struct Ring {
    /// (hash, the worker's id), sorted by hash then by the worker's URL, so that a tie orders
    /// alike everywhere.
    points: Vec<(u64, WorkerId)>,
}

impl Ring {
    fn new(workers: &[Arc<Worker>]) -> Self {
        let mut points: Vec<(u64, &str, WorkerId)> = Vec::new();
        for worker in workers {
            let url = &*worker.url;
            for vnode in 0..VNODES {
                points.push((xxh3_64_with_seed(url.as_bytes(), vnode), url, worker.id));
            }
        }
        points.sort_unstable();
        Self {
            points: points
                .into_iter()
                .map(|(hash, _, index)| (hash, index))
                .collect(),
        }
    }

    /// The workers' ids in ring order from `key` clockwise, each once.
    fn walk(&self, key: u64) -> impl Iterator<Item = WorkerId> + '_ {
        let start = self.points.partition_point(|&(hash, _)| hash < key);
        let (after, before) = self.points.split_at(start);
        let mut seen: Vec<WorkerId> = Vec::new();
        before
            .iter()
            .chain(after)
            .map(|&(_, index)| index)
            .filter(move |index| {
                let new = !seen.contains(index);
                if new {
                    seen.push(*index);
                }
                new
            })
    }
}

/// Whether a request went to its home worker or spilled past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Spill,
}

/// Hits and spills of one model.
#[derive(Debug, Default)]
struct Counts {
    // Relaxed: independent tallies, read only by a metrics scrape.
    hits: AtomicU64,
    spills: AtomicU64,
}

/// One model's tally, as `/metrics` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinityCount {
    pub model: Arc<str>,
    pub hits: u64,
    pub spills: u64,
}

/// How much load a worker takes before requests spill past it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadBound {
    /// `c`: a worker takes up to `c` times its share of the load (at least 1).
    pub factor: f64,
    /// A worker with fewer requests than this is never past the bound.
    pub floor: usize,
}

impl LoadBound {
    /// A worker takes a request while its load is under this:
    /// `max(ceil(c × (total + 1) / workers), floor)`.
    fn of(&self, total: usize, workers: usize) -> usize {
        let share = self.factor.max(1.0) * (total as f64 + 1.0) / workers.max(1) as f64;
        // Finite and at least 1 for c ≥ 1; the cast saturates.
        (share.ceil() as usize).max(self.floor)
    }
}

#[derive(Debug)]
pub struct PrefixAffinity {
    ring: ArcSwap<Ring>,
    bound: ArcSwap<LoadBound>,
    /// Per model, created at its first placement (only models some worker serves get here).
    counts: ArcSwap<HashMap<Arc<str>, Arc<Counts>>>,
    /// For requests without a key (nothing to hash).
    fallback: LeastLoad,
}

impl PrefixAffinity {
    /// Over `workers`, whatever their order.
    pub fn new(workers: &[Arc<Worker>], bound: LoadBound) -> Self {
        Self {
            ring: ArcSwap::from_pointee(Ring::new(workers)),
            bound: ArcSwap::from_pointee(bound),
            counts: ArcSwap::default(),
            fallback: LeastLoad::default(),
        }
    }

    /// Over `workers` from now on: the keys of a worker that left move to the next on the ring,
    /// a worker that came takes its share; the others keep theirs.
    pub fn set_workers(&self, workers: &[Arc<Worker>]) {
        self.ring.store(Arc::new(Ring::new(workers)));
    }

    pub fn set_bound(&self, bound: LoadBound) {
        self.bound.store(Arc::new(bound));
    }

    /// Each model's hits and spills so far, by model name.
    pub fn counts(&self) -> Vec<AffinityCount> {
        let mut counts: Vec<_> = self
            .counts
            .load()
            .iter()
            .map(|(model, counts)| AffinityCount {
                model: model.clone(),
                hits: counts.hits.load(Ordering::Relaxed),
                spills: counts.spills.load(Ordering::Relaxed),
            })
            .collect();
        counts.sort_unstable_by(|a, b| a.model.cmp(&b.model));
        counts
    }

    fn count(&self, model: &str, outcome: Outcome) {
        let counts = match self.counts.load().get(model) {
            Some(counts) => counts.clone(),
            None => {
                let mut created = None;
                self.counts.rcu(|map| {
                    let mut map = HashMap::clone(map);
                    let entry = map.entry(Arc::from(model)).or_default().clone();
                    created = Some(entry);
                    map
                });
                match created {
                    Some(counts) => counts,
                    None => return,
                }
            }
        };
        match outcome {
            Outcome::Hit => counts.hits.fetch_add(1, Ordering::Relaxed),
            Outcome::Spill => counts.spills.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// The position in `candidates` for a request with `key`, and whether that is its home.
    fn place(&self, key: u64, candidates: &[Candidate<'_>]) -> Option<(usize, Outcome)> {
        let scores: Vec<(bool, usize)> = candidates.iter().map(|c| score(c.worker)).collect();
        let total = scores
            .iter()
            .fold(0usize, |total, &(_, load)| total.saturating_add(load));
        let bound = self.bound.load().of(total, candidates.len());
        let mut home = None;
        let mut under_bound = None;
        let mut left = candidates.len();
        let ring = self.ring.load();
        for id in ring.walk(key) {
            let Some(position) = candidates.iter().position(|c| c.id == id) else {
                continue;
            };
            home.get_or_insert(position);
            let (saturated, load) = scores[position];
            if load < bound {
                if !saturated {
                    under_bound = Some(position);
                    break;
                }
                under_bound.get_or_insert(position);
            }
            left -= 1;
            if left == 0 {
                break;
            }
        }
        // A candidate off the ring (none should be) leaves `home` empty: least load decides.
        let home = home?;
        let chosen = under_bound.unwrap_or(home);
        let outcome = if chosen == home {
            Outcome::Hit
        } else {
            Outcome::Spill
        };
        Some((chosen, outcome))
    }
}

impl RoutingPolicy for PrefixAffinity {
    fn choose(&self, features: &Features<'_>, candidates: &[Candidate<'_>]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let block = candidates
            .iter()
            .filter_map(|c| c.worker.block_size())
            .max()
            .unwrap_or(DEFAULT_BLOCK_TOKENS);
        let placed = features
            .prefix
            .key(features.endpoint, block)
            .and_then(|key| self.place(key, candidates));
        match placed {
            Some((position, outcome)) => {
                self.count(features.model, outcome);
                Some(position)
            }
            None => self.fallback.choose(features, candidates),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::super::load::Load;
    use super::super::prefix::Prefix;
    use super::super::registry::tests::worker;
    use super::super::worker::Worker;
    use super::*;
    use crate::request::Endpoint;

    const URLS: [&str; 4] = ["http://a:1", "http://b:2", "http://c:3", "http://d:4"];

    /// The policy over `all` with factor `c` and no floor (the paper's bound).
    fn paper(all: &[Arc<Worker>], factor: f64) -> PrefixAffinity {
        PrefixAffinity::new(all, LoadBound { factor, floor: 0 })
    }

    fn workers(urls: &[&str]) -> Vec<Arc<Worker>> {
        urls.iter().map(|url| worker(url, &["m"], true)).collect()
    }

    fn candidates<'a>(workers: &'a [Arc<Worker>], indices: &[usize]) -> Vec<Candidate<'a>> {
        indices
            .iter()
            .map(|&index| Candidate {
                id: workers[index].id,
                worker: &workers[index],
            })
            .collect()
    }

    fn features<'a>(body: &'a Bytes, session: Option<&'a Arc<str>>) -> Features<'a> {
        Features {
            model: "m",
            endpoint: Endpoint::Completions,
            prompt_bytes: body.len(),
            sequences: 1,
            prefix: Prefix { body, session },
        }
    }

    fn prompt(i: usize) -> Bytes {
        Bytes::from(format!(
            r#"{{"model":"m","prompt":"conversation {i} opens here"}}"#
        ))
    }

    /// The worker (its place in `all`) `policy` chooses among `indices` for prompt `i`.
    fn chosen(policy: &PrefixAffinity, all: &[Arc<Worker>], indices: &[usize], i: usize) -> usize {
        let body = prompt(i);
        let candidates = candidates(all, indices);
        let position = policy.choose(&features(&body, None), &candidates);
        position
            .and_then(|p| all.iter().position(|w| w.id == candidates[p].id))
            .unwrap_or(usize::MAX)
    }

    #[test]
    fn a_key_lands_on_the_same_worker_whatever_the_order_or_the_replica() {
        let all = workers(&URLS);
        let policy = paper(&all, 1.25);
        // Another replica, configured in the reverse order: registry indices differ, URLs not.
        let reversed: Vec<&str> = URLS.iter().rev().copied().collect();
        let all_reversed = workers(&reversed);
        let bound = LoadBound {
            factor: 1.25,
            floor: 0,
        };
        let replica = PrefixAffinity::new(&all_reversed, bound);
        let mut used = [0usize; 4];
        for i in 0..200 {
            let here = chosen(&policy, &all, &[0, 1, 2, 3], i);
            assert_eq!(chosen(&policy, &all, &[3, 1, 0, 2], i), here);
            let there = chosen(&replica, &all_reversed, &[0, 1, 2, 3], i);
            assert_eq!(reversed[there], URLS[here]);
            used[here] += 1;
        }
        // Every worker holds a fair share of 200 keys.
        assert!(used.iter().all(|&n| (25..=75).contains(&n)), "{used:?}");
        assert_eq!(
            policy.counts(),
            [AffinityCount {
                model: Arc::from("m"),
                hits: 400,
                spills: 0
            }]
        );
    }

    #[test]
    fn removing_a_worker_moves_only_its_keys() {
        let all = workers(&URLS);
        let policy = paper(&all, 1.25);
        let mut moved = 0;
        for i in 0..300 {
            let before = chosen(&policy, &all, &[0, 1, 2, 3], i);
            let after = chosen(&policy, &all, &[0, 1, 3], i);
            if before == 2 {
                assert_ne!(after, 2);
                moved += 1;
            } else {
                assert_eq!(after, before, "key {i} moved off a worker that stayed");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn a_new_set_of_workers_moves_only_the_keys_of_those_that_left_or_came() {
        let all = workers(&URLS);
        let policy = paper(&all[..3], 1.25);
        let before: Vec<usize> = (0..300)
            .map(|i| chosen(&policy, &all, &[0, 1, 2], i))
            .collect();
        // Worker 1 leaves, worker 3 comes; the ring is rebuilt from their ids.
        let next = [all[0].clone(), all[2].clone(), all[3].clone()];
        policy.set_workers(&next);
        let (mut to_new, mut kept) = (0, 0);
        for (i, &was) in before.iter().enumerate() {
            let now = chosen(&policy, &all, &[0, 2, 3], i);
            match (was, now) {
                (1, now) => assert_ne!(now, 1),
                (was, 3) => {
                    assert_ne!(was, 1);
                    to_new += 1;
                }
                (was, now) => {
                    assert_eq!(was, now, "key {i} moved between workers that stayed");
                    kept += 1;
                }
            }
        }
        assert!(to_new > 0 && kept > 0, "{to_new} {kept}");
    }

    #[test]
    fn a_worker_at_its_bound_spills_to_the_next_on_the_ring() {
        let all = workers(&URLS[..2]);
        let policy = paper(&all, 1.25);
        let home = chosen(&policy, &all, &[0, 1], 7);
        let other = 1 - home;
        // Home has 2 in flight, the other none: bound ceil(1.25 × 3 / 2) = 2, so home is full.
        let _busy = [all[home].begin(), all[home].begin()];
        assert_eq!(chosen(&policy, &all, &[0, 1], 7), other);
        // With one on the other worker too, the bound is ceil(1.25 × 4 / 2) = 3: home again.
        let _also = all[other].begin();
        assert_eq!(chosen(&policy, &all, &[0, 1], 7), home);
        // A looser factor lets home take more.
        let loose = paper(&all, 3.0);
        let _more = [all[home].begin(), all[home].begin()];
        assert_eq!(chosen(&loose, &all, &[0, 1], 7), home);
        assert_eq!(chosen(&policy, &all, &[0, 1], 7), other);
        let counts = policy.counts();
        assert_eq!((counts[0].hits, counts[0].spills), (2, 2));
    }

    #[test]
    fn reported_load_counts_toward_the_bound() {
        let all = workers(&URLS[..2]);
        let policy = paper(&all, 1.25);
        let home = chosen(&policy, &all, &[0, 1], 3);
        // Another replica's requests, as vLLM reports them: 4 running at home, none elsewhere.
        all[home].set_load(Some(Load {
            running: 4,
            waiting: 0,
            kv_cache_usage: 0.1,
        }));
        assert_eq!(chosen(&policy, &all, &[0, 1], 3), 1 - home);
    }

    #[test]
    fn a_saturated_home_spills_and_all_saturated_stays_home() {
        let all = workers(&URLS[..3]);
        let policy = paper(&all, 1.25);
        let home = chosen(&policy, &all, &[0, 1, 2], 11);
        let saturated = |waiting, kv_cache_usage| {
            Some(Load {
                running: 0,
                waiting,
                kv_cache_usage,
            })
        };
        all[home].set_load(saturated(1, 0.1));
        let spilled = chosen(&policy, &all, &[0, 1, 2], 11);
        assert_ne!(spilled, home);
        all[spilled].set_load(saturated(0, 0.97));
        let third = chosen(&policy, &all, &[0, 1, 2], 11);
        assert!(third != home && third != spilled);
        // Every worker saturated: the first under the bound on the walk, home.
        all[third].set_load(saturated(2, 0.5));
        // Home's load (1 waiting) is under the bound ceil(1.25 × 4 / 3) = 2.
        assert_eq!(chosen(&policy, &all, &[0, 1, 2], 11), home);
    }

    #[test]
    fn a_session_id_places_unrelated_prompts_together() {
        let all = workers(&URLS);
        let policy = paper(&all, 1.25);
        let session: Arc<str> = Arc::from("conversation-9");
        let candidates = candidates(&all, &[0, 1, 2, 3]);
        let places: Vec<_> = (0..20)
            .filter_map(|i| {
                let body = prompt(i);
                policy.choose(&features(&body, Some(&session)), &candidates)
            })
            .collect();
        assert_eq!(places.len(), 20);
        assert!(places.iter().all(|p| *p == places[0]), "{places:?}");
        let spread: std::collections::BTreeSet<_> = (0..20)
            .map(|i| chosen(&policy, &all, &[0, 1, 2, 3], i))
            .collect();
        assert!(spread.len() > 1);
    }

    #[test]
    fn a_request_without_a_key_goes_by_least_load() {
        let all = workers(&URLS[..2]);
        let policy = paper(&all, 1.25);
        let _busy = all[0].begin();
        let body = Bytes::from_static(br#"{"model":"m","prompt":""}"#);
        let candidates = candidates(&all, &[0, 1]);
        assert_eq!(policy.choose(&features(&body, None), &candidates), Some(1));
        assert_eq!(policy.choose(&features(&body, None), &[]), None);
        assert!(policy.counts().is_empty());
    }

    #[test]
    fn the_bound_is_the_papers_above_the_floor() {
        let bound = |factor, floor, total, workers| LoadBound { factor, floor }.of(total, workers);
        assert_eq!(bound(1.25, 0, 0, 2), 1);
        assert_eq!(bound(1.25, 0, 2, 2), 2);
        assert_eq!(bound(1.25, 0, 3, 2), 3);
        assert_eq!(bound(1.0, 0, 7, 4), 2);
        assert_eq!(bound(1.25, 0, usize::MAX, 1), usize::MAX);
        assert_eq!(bound(1.25, 0, 5, 0), 8);
        assert_eq!(bound(0.5, 0, 3, 2), 2, "a factor under 1 counts as 1");
        assert_eq!(bound(1.25, 8, 3, 2), 8);
        assert_eq!(bound(1.25, 8, 100, 2), 64);
    }

    #[test]
    fn under_the_floor_only_saturation_spills() {
        let all = workers(&URLS[..2]);
        let bound = LoadBound {
            factor: 1.25,
            floor: 4,
        };
        let policy = PrefixAffinity::new(&all, bound);
        let home = chosen(&policy, &all, &[0, 1], 5);
        // Three in flight at home, none elsewhere: the paper's bound (3) would spill.
        let _busy = [all[home].begin(), all[home].begin(), all[home].begin()];
        assert_eq!(chosen(&policy, &all, &[0, 1], 5), home);
        let _fourth = all[home].begin();
        assert_eq!(chosen(&policy, &all, &[0, 1], 5), 1 - home);
        drop(_fourth);
        all[home].set_load(Some(Load {
            running: 1,
            waiting: 1,
            kv_cache_usage: 0.2,
        }));
        assert_eq!(chosen(&policy, &all, &[0, 1], 5), 1 - home);
    }
}
