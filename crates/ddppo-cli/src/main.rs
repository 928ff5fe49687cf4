//! The `ddppo` command-line tool. It parses, validates, wires and reports;
//! the algorithms live in the library crates.

mod chart;
mod cmd_env;
mod cmd_eval;
mod cmd_grad_error;
mod cmd_plot;
mod cmd_table;
mod cmd_train;
mod cmd_variant;
mod device;
mod run_dir;
mod tensorboard;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ddppo", version, about = "DDPPO: policy optimisation by back-propagating through a learned model")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an agent (preset per task; --set overrides any key).
    Train(cmd_train::TrainArgs),
    /// Evaluate a run's newest checkpoint (deterministic policy).
    Eval(cmd_eval::EvalArgs),
    /// List the environments, or replay actions through one.
    Env(cmd_env::EnvArgs),
    /// The gradient-error study (paper Figure 2) on an analytic env.
    GradError(cmd_grad_error::GradErrorArgs),
    /// Learning curves of run directories (mean and std band over seeds).
    Plot(cmd_plot::PlotArgs),
    /// A Markdown table of returns (mean ± std over seeds) at fixed step counts.
    Table(cmd_table::TableArgs),
    /// List the algorithm variants (`--variant`).
    Variant(cmd_variant::VariantArgs),
}

fn main() {
    // candle's CPU matmuls and the neighbour queries run on rayon's pool; its
    // workers spin-wait, and with the evaluation threads beside them that was
    // up to 50x slower on 2 busy cores (ddppo-agent's and ddppo-models'
    // benches). One thread unless the user asks for more.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: no other thread exists yet this early in main.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    let cli = Cli::parse();
    let result = match cli.cmd {
        Command::Train(args) => cmd_train::run(args),
        Command::Eval(args) => cmd_eval::run(args),
        Command::Env(args) => cmd_env::run(args),
        Command::GradError(args) => cmd_grad_error::run(args),
        Command::Plot(args) => cmd_plot::run(args),
        Command::Table(args) => cmd_table::run(args),
        Command::Variant(args) => cmd_variant::run(args),
    };
    if let Err(e) = result {
        if e.is::<cmd_train::Interrupted>() {
            eprintln!("{e}");
            std::process::exit(cmd_train::EXIT_INTERRUPTED);
        }
        // One line: the cause chain, no backtrace (some causes, e.g. TOML
        // errors with a source excerpt, span several lines).
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error's cause chain on one line. Library errors that wrap another
/// crate's error already print it, so a cause whose text the previous message
/// contains is not repeated; multi-line causes are folded.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if parts.last().is_some_and(|prev| prev.contains(&text)) {
            continue;
        }
        parts.push(text);
    }
    let joined = parts.join(": ");
    joined.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}
