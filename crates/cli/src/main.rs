//! `quorum`: the command-line front end. Thin: parses arguments and configs, calls the
//! libraries, prints results.

mod opts;
mod plot;
mod run_config;
mod sim_cmd;
mod topology;
mod train_cmd;

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
    Sim(Box<sim_cmd::SimArgs>),
    /// Train for real: a parameter server and N+b workers on this machine over loopback gRPC.
    Train(Box<train_cmd::TrainArgs>),
    /// Run the parameter server of a multi-host job.
    Ps(Box<train_cmd::PsArgs>),
    /// Run one worker of a multi-host job.
    Worker(Box<train_cmd::WorkerArgs>),
    /// Draw charts (PNG and SVG) from run directories or from a table of results.
    Plot(Box<plot::PlotArgs>),
    /// Run whatever role TF_CONFIG or Slurm gives this process (server or worker).
    Node(Box<train_cmd::NodeArgs>),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sim(args) => sim_cmd::run(*args),
        Command::Train(args) => train_cmd::train(*args),
        Command::Ps(args) => train_cmd::ps(*args),
        Command::Worker(args) => train_cmd::worker(*args),
        Command::Node(args) => train_cmd::node(*args),
        Command::Plot(args) => plot::run(*args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
