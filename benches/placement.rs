//! Placement alone: the pool's scheduler with no process, no QUIC and no lock, at 1, 100 and
//! 10,000 runners and with 100,000 callers waiting. Each figure is set against the same
//! operation at 1 runner, measured in the same run.
//!
//! ```sh
//! cargo bench --bench placement && python3 benches/summary.py
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use firebrand::internals::{Action, Arrival, Rules, Scheduler, Waiter};
use firebrand::{Limits, Placement, RunnerId};

/// A caller that never leaves.
struct Caller;

impl Waiter for Caller {
    fn is_gone(&self) -> bool {
        false
    }
}

type Bench = Scheduler<Caller, RunnerId>;

/// Calls each runner can run at once.
const CAPACITY: u32 = 4;

fn rules(placement: Placement) -> Rules {
    Rules {
        placement,
        single_use: false,
        prewarm_at: None,
        max_queued: None,
        boot_attempts: 3,
        boot_retry_after: Duration::from_millis(100),
        parks: false,
    }
}

fn limits(runners: usize) -> Limits {
    Limits::new(0, runners, CAPACITY)
}

/// A scheduler with `runners` ready, each running one call fewer than its capacity, so that
/// every grant has a choice to make.
fn with_runners(placement: Placement, runners: usize) -> (Bench, Vec<RunnerId>) {
    let mut s = Bench::new(rules(placement), limits(runners));
    let ids: Vec<RunnerId> = (0..runners)
        .map(|_| RunnerId(uuid::Uuid::new_v4()))
        .collect();
    for id in &ids {
        s.runner_up(*id, *id, CAPACITY);
    }
    for _ in 0..runners * (CAPACITY as usize - 1) {
        let Arrival::Granted(_) = s.call_arrived(|| Caller) else {
            panic!("a free slot");
        };
    }
    drain(&mut s);
    (s, ids)
}

fn drain(s: &mut Bench) {
    let mut actions: Vec<Action<Caller, RunnerId>> = Vec::new();
    s.drain_actions(&mut actions);
    black_box(actions);
}

fn grant(c: &mut Criterion) {
    let mut group = c.benchmark_group("placement/grant");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for placement in [Placement::Spread, Placement::Pack] {
        for runners in [1usize, 100, 10_000] {
            let (mut s, _) = with_runners(placement, runners);
            let name = format!("{placement:?}").to_lowercase();
            // One call placed and its slot freed: the whole of a call's placement work.
            group.bench_function(BenchmarkId::new(name, runners), |b| {
                b.iter(|| {
                    let Arrival::Granted(runner) = s.call_arrived(|| Caller) else {
                        panic!("a free slot");
                    };
                    s.slot_freed(black_box(runner));
                })
            });
        }
    }
    group.finish();
}

fn queued(c: &mut Criterion) {
    let mut group = c.benchmark_group("placement/handoff");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for waiters in [1usize, 100_000] {
        // Every slot taken and `waiters` callers queued: a freed slot goes to the oldest, and a
        // new caller joins the back, so the queue stays as long.
        let (mut s, ids) = with_runners(Placement::Spread, 10_000);
        let mut running: Vec<RunnerId> = ids.clone();
        for _ in &ids {
            let Arrival::Granted(_) = s.call_arrived(|| Caller) else {
                panic!("a free slot");
            };
        }
        for _ in 0..waiters {
            assert!(matches!(s.call_arrived(|| Caller), Arrival::Queued(_)));
        }
        drain(&mut s);
        let mut next = 0;
        group.bench_function(BenchmarkId::from_parameter(waiters), |b| {
            b.iter(|| {
                let at = next % running.len();
                next += 1;
                s.slot_freed(running[at]);
                let mut actions: Vec<Action<Caller, RunnerId>> = Vec::new();
                s.drain_actions(&mut actions);
                if let Some(Action::Grant { runner, .. }) = actions.first() {
                    running[at] = *runner;
                }
                black_box(s.call_arrived(|| Caller));
            })
        });
        group.bench_function(BenchmarkId::new("stats", waiters), |b| {
            b.iter(|| black_box(s.stats()))
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    grant(&mut c);
    queued(&mut c);
    c.final_summary();
}
