//! `quorum`: the command-line front end. Thin: parses arguments and configs, calls the
//! libraries, prints results.

mod opts;
mod sim_cmd;
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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sim(args) => sim_cmd::run(*args),
        Command::Train(args) => train_cmd::run(*args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
