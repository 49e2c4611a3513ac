//! `loadgen`: HTTP/1.1 load generator for the tokengate benchmarks. Sends one fixed POST request
//! over keep-alive connections, closed loop (`--concurrency`) or open loop (`--rate`), and prints
//! one JSON report on stdout. It does not speak TLS or HTTP/2 and does not parse response JSON.

mod plan;
mod report;
mod worker;

use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use clap::Parser;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::plan::{Args, Plan};
use crate::report::{Histograms, Report, Tally};
use crate::worker::{Run, connect, worker};

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Exit status: 0 clean run, 1 the report counts errors or unsent requests, 2 no report.
fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs the load and prints the report; false when the run had errors or fell behind.
fn run(args: &Args) -> Result<bool> {
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    let report = runtime.block_on(async { load(Plan::from_args(args).await?).await })?;
    println!("{}", serde_json::to_string(&report)?);
    if report.errors > 0 {
        eprintln!(
            "loadgen: {} of {} requests failed: {}",
            report.errors,
            report.requests,
            serde_json::to_string(&report.error_kinds)?
        );
    }
    if report.unsent > 0 {
        eprintln!(
            "loadgen: {} requests due were never sent: the server did not sustain {} req/s \
             with {} connections",
            report.unsent,
            report.target_rps.unwrap_or_default(),
            report.concurrency
        );
    }
    Ok(report.errors == 0 && report.unsent == 0)
}

async fn load(plan: Plan) -> Result<Report> {
    // Open every connection before the clock starts, and fail fast if nothing listens.
    let mut connecting = JoinSet::new();
    let plan = Arc::new(plan);
    for _ in 0..plan.concurrency {
        let plan = Arc::clone(&plan);
        connecting.spawn(async move { connect(&plan).await });
    }
    let mut conns = Vec::with_capacity(plan.concurrency);
    while let Some(joined) = connecting.join_next().await {
        conns.push(joined?.map_err(|e| format!("connecting to {}: {e}", plan.addr))?);
    }
    let plan = Arc::into_inner(plan).ok_or("plan still shared")?;

    let t0 = Instant::now();
    let run = Arc::new(Run {
        t0,
        warm_end: t0 + plan.warmup,
        end: t0 + plan.warmup + plan.duration,
        next_slot: AtomicU64::new(0),
        hists: Mutex::new(Histograms::new()?),
        plan,
    });
    let mut workers = JoinSet::new();
    for conn in conns {
        workers.spawn(worker(Arc::clone(&run), conn));
    }
    let mut tally = Tally::default();
    while let Some(joined) = workers.join_next().await {
        tally.merge(joined?);
    }

    let unsent = match run.plan.rate {
        Some(rate) => {
            // Slots due before the end: the estimate, corrected for rounding in `due`.
            let span = (run.end - run.t0).as_secs_f64();
            let mut slots = (span * rate).ceil() as u64;
            while slots > 0 && run.due(rate, slots - 1) >= run.end {
                slots -= 1;
            }
            while run.due(rate, slots) < run.end {
                slots += 1;
            }
            slots.saturating_sub(tally.started)
        }
        None => 0,
    };
    let last = tally.last_done.unwrap_or(run.end).max(run.end);
    let duration_s = (last - run.warm_end).as_secs_f64();
    let hists = run.hists.lock().unwrap_or_else(PoisonError::into_inner);
    Ok(Report::new(
        run.plan.concurrency,
        run.plan.rate,
        run.plan.stream,
        &tally,
        unsent,
        duration_s,
        &hists,
    ))
}
