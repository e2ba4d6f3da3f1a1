//! `quorum`: the command-line front end. Thin: parses arguments and configs, calls the
//! libraries, prints results.

mod cluster;
mod cmd;
mod config;
mod opts;
mod restarts;
mod topology;

use clap::{Parser, Subcommand};

/// Synchronous SGD with backup workers (Chen et al., "Revisiting Distributed Synchronous SGD").
#[derive(Parser)]
#[command(name = "quorum", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate a cluster in virtual time (plan N and b before buying machines).
    Sim(Box<cmd::sim::SimArgs>),
    /// Train for real: a parameter server and N+b workers on this machine over loopback gRPC.
    Train(Box<cmd::train::TrainArgs>),
    /// Run the parameter server of a multi-host job.
    Ps(Box<cmd::ps::PsArgs>),
    /// Run one worker of a multi-host job.
    Worker(Box<cmd::worker::WorkerArgs>),
    /// Evaluate a multi-host job's parameters every K steps (every shard's part, put
    /// together) and report to the server.
    Evaluate(Box<cmd::evaluate::EvaluateArgs>),
    /// Draw charts (PNG and SVG) from run directories or from a table of results.
    Plot(Box<cmd::plot::PlotArgs>),
    /// Run whatever role TF_CONFIG or Slurm gives this process (server or worker).
    Node(Box<cmd::node::NodeArgs>),
    /// How many backups? Replays a run's measured gradient times through the simulator for
    /// every split N + b of its machines, and for a few more machines.
    Advise(Box<cmd::advise::AdviseArgs>),
}

/// Log lines from the libraries (a lost server, a worker that left, a failed checkpoint) go
/// to stderr through `tracing`: `RUST_LOG` chooses what (default: `info`).
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .try_init();
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sim(args) => cmd::sim::run(*args),
        Command::Train(args) => cmd::train::train(*args),
        Command::Ps(args) => cmd::ps::ps(*args),
        Command::Worker(args) => cmd::worker::worker(*args),
        Command::Evaluate(args) => cmd::evaluate::evaluate(*args),
        Command::Node(args) => cmd::node::node(*args),
        Command::Plot(args) => cmd::plot::run(*args),
        Command::Advise(args) => cmd::advise::run(*args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
