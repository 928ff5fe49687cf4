//! The `ddppo` command-line tool. It parses, validates, wires and reports;
//! the algorithms live in the library crates.

mod cmd_env;
mod cmd_grad_error;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ddppo", version, about = "DDPPO: policy optimisation by back-propagating through a learned model")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the environments, or replay actions through one.
    Env(cmd_env::EnvArgs),
    /// The gradient-error study (paper Figure 2) on an analytic env.
    GradError(cmd_grad_error::GradErrorArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Command::Env(args) => cmd_env::run(args),
        Command::GradError(args) => cmd_grad_error::run(args),
    };
    if let Err(e) = result {
        // One line: the cause chain, no backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
